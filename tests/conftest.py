"""Fixtures on real PostgreSQL and RabbitMQ: a database and a vhost per test session.

Queues and tables are emptied before every test, so tests may assume a clean slate.
"""

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator, Iterator

import aio_pika
import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from api.app import create_app
from api.keys import create_key
from shared.db import migrate
from shared.settings import Settings
from shared.topology import declare_topology
from tests.support.services import VhostFactory, postgres_server, rabbitmq_vhosts, scratch_database
from worker.worker import ScoreWorker

ENTITY = "acme"
PROJECT = "evals"


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture(scope="session")
def database_url(postgres_server_url: str) -> Iterator[str]:
    """A migrated database of this session's own."""
    with scratch_database(postgres_server_url) as url:
        asyncio.run(migrate(url))
        yield url


@pytest.fixture(scope="session")
def vhosts() -> Iterator[VhostFactory | str]:
    with rabbitmq_vhosts() as found:
        yield found


@pytest.fixture(scope="session")
def amqp_url(vhosts: VhostFactory | str) -> str:
    """A vhost of this session's own (or TEST_AMQP_URL as given)."""
    return vhosts.create() if isinstance(vhosts, VhostFactory) else vhosts


@pytest.fixture
def settings(database_url: str, amqp_url: str) -> Settings:
    """Settings pointing at the session's database and vhost, with short timeouts."""
    return Settings(
        database_url=database_url,
        amqp_url=amqp_url,
        publish_timeout_seconds=3,
        worker_flush_interval_seconds=0.01,
        worker_retry_max_seconds=0.5,
        worker_shutdown_grace_seconds=5,
        worker_health_port=0,
    )


async def _empty_queues(settings: Settings) -> None:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        topology = await declare_topology(channel, settings)
        await topology.queue.purge()
        await topology.dead_letter_queue.purge()


@pytest.fixture(autouse=True)
async def clean_slate(request: pytest.FixtureRequest) -> None:
    """Empty tables and queues before each test that touches the services."""
    if "settings" not in request.fixturenames:
        return
    settings: Settings = request.getfixturevalue("settings")
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute("TRUNCATE scores, api_keys, score_tombstones, idempotency_keys")
    finally:
        await conn.close()
    await _empty_queues(settings)


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    """A connection for arranging and asserting on rows."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def api_key(db: asyncpg.Connection) -> str:
    """A key for entity ENTITY, all projects."""
    _, secret = await create_key(db, ENTITY, name="tests")
    return secret


def basic_auth(key: str) -> dict[str, str]:
    """The header W&B clients send: HTTP Basic with user `api` and the key as password."""
    token = base64.b64encode(f"api:{key}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def bearer_auth(key: str) -> dict[str, str]:
    """The key as a bearer token."""
    return {"Authorization": f"Bearer {key}"}


@contextlib.asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[FastAPI]:
    """An API app built from settings, its lifespan running and its publisher connected."""
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        await asyncio.wait_for(application.state.services.publisher.wait_ready(), timeout=10)
        yield application


def client_for(app: FastAPI) -> httpx.AsyncClient:
    """An HTTP client talking to an in-process app."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://score-ingest")


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A client on an app of its own, built from settings."""
    async with running_app(settings) as application, client_for(application) as c:
        yield c


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    """The API app with its lifespan running and the publisher connected."""
    async with running_app(settings) as application:
        yield application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client talking to the in-process app."""
    async with client_for(app) as c:
        yield c


@pytest.fixture
async def worker(settings: Settings) -> AsyncIterator[ScoreWorker]:
    """A worker consuming in the background for the length of the test."""
    score_worker = ScoreWorker(settings)
    task = asyncio.create_task(score_worker.run())
    yield score_worker
    score_worker.request_stop()
    await asyncio.wait_for(task, timeout=15)


async def wait_for_count(
    conn: asyncpg.Connection, query: str, expected: int, *args: object, timeout: float = 10.0
) -> int:
    """Poll a count(*) query until it returns expected or timeout passes; returns the last count."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        count: int = await conn.fetchval(query, *args)
        if count == expected or loop.time() > deadline:
            return count
        await asyncio.sleep(0.05)


def score_body(**overrides: object) -> dict[str, object]:
    """A valid ScoreCreateBody, with fields overridden."""
    body: dict[str, object] = {
        "prediction_id": "0192f0b4-6b7e-7c2a-9f3e-1a2b3c4d5e6f",
        "scorer": f"weave:///{ENTITY}/{PROJECT}/op/exact_match:abc123",
        "value": {"correct": True, "score": 0.75},
        "evaluation_run_id": "run-1",
    }
    body.update(overrides)
    return body
