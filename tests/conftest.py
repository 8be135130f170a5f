"""Fixtures on real PostgreSQL and RabbitMQ: a database and a vhost per test session.

Queues and tables are emptied before every test, so tests may assume a clean slate. Under
pytest-xdist every worker is a session of its own, with its own database and vhost.

Every test gets one of three markers here, from what it uses, so that a new test is marked
without anyone thinking of it:

- fault: it cuts a connection (TcpProxy), boots a broker node of its own (rabbitmq_node),
  or lives in a module of faults and hostile runs (FAULT_MODULES).
- integration: it needs PostgreSQL or RabbitMQ (a fixture it uses needs one of them).
- unit: neither. A run that selects only unit tests refuses the services: their fixtures
  fail and connections to their ports are refused, so a unit test that needs one fails.

A marker written on a test by hand wins. Tests that load the whole machine (the hostile
run, faults under load: MACHINE_LOADING_MODULES) are also marked serial: `make test` runs
them one at a time after the rest, which runs in parallel, so that their bounds on answer
times measure the service and not the other tests. Tests under tests/cluster/ run nodes of
their own (a PostgreSQL pair, a RabbitMQ cluster): they are marked cluster, and serial too.
"""

import asyncio
import base64
import contextlib
import inspect
import os
import socket
import types
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from api.app import create_app
from api.keys import create_key
from shared.db import migrate
from shared.settings import MIB, Settings
from shared.topology import DEAD_LETTER_QUEUE, declare_topology, persist_queues
from tests.support.otlp import OtlpReceiver, otlp_receiver
from tests.support.rabbitmq_node import NodeTls, RabbitMQNode, rabbitmq_node
from tests.support.services import (
    VhostFactory,
    delete_topology,
    postgres_server,
    rabbitmq_vhosts,
    scratch_database,
)
from tests.support.tls import Pki, make_pki
from worker.worker import ScoreWorker

ENTITY = "acme"
PROJECT = "evals"

KINDS = ("unit", "integration", "fault")
# The fixtures every PostgreSQL or RabbitMQ fixture depends on.
SERVICE_FIXTURES = frozenset({"postgres_server_url", "vhosts"})
FAULT_MODULES = frozenset(
    {"tests/test_faults_under_load.py", "tests/test_hostile_run.py", "tests/worker/test_faults.py"}
)
# Names that, used in a test or in one of its fixtures, make it a fault test.
FAULT_NAMES = frozenset({"TcpProxy", "rabbitmq_node"})
MACHINE_LOADING_MODULES = frozenset(
    {"tests/test_faults_under_load.py", "tests/test_hostile_run.py"}
)
# Tests that run nodes of their own (a PostgreSQL pair, a RabbitMQ cluster): marked cluster
# and serial.
CLUSTER_DIRECTORY = "tests/cluster/"
SERVICE_URL_VARIABLES = ("TEST_DATABASE_URL", "TEST_AMQP_URL", "DATABASE_URL", "AMQP_URL")
SERVICE_PORTS = frozenset({5432, 5672})
UNIT_ONLY = pytest.StashKey[bool]()
# The tests on the own RabbitMQ node run in one pytest-xdist worker (`--dist loadgroup`).
OWN_NODE_GROUP = "own_node"
OWN_NODE_MAX_MESSAGE_BYTES = 4 * MIB
TLS_CLIENT_NAME = "score-ingest-test-client"


def _names_used(function: Callable[..., Any]) -> set[str]:
    """Every global or attribute name the function's code (nested functions too) refers to."""
    found: set[str] = set()
    codes = [inspect.unwrap(function).__code__]
    while codes:
        code = codes.pop()
        found.update(code.co_names)
        codes.extend(const for const in code.co_consts if isinstance(const, types.CodeType))
    return found


def _names_used_by_test(item: pytest.Function) -> set[str]:
    """The names the test function and every fixture it uses refer to."""
    functions = [item.function] + [
        definition.func
        for definitions in item._fixtureinfo.name2fixturedefs.values()
        for definition in definitions
    ]
    return set().union(*(_names_used(function) for function in functions))


def _module(item: pytest.Function) -> str:
    return item.nodeid.split("::", 1)[0]


def _kind(item: pytest.Function, names: set[str]) -> str:
    if _module(item) in FAULT_MODULES or FAULT_NAMES & names:
        return "fault"
    if SERVICE_FIXTURES & set(item.fixturenames):
        return "integration"
    return "unit"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test unit, integration or fault (and serial), before `-m` selects by them."""
    for item in items:
        if not isinstance(item, pytest.Function):
            continue
        names = _names_used_by_test(item)
        if not any(item.get_closest_marker(kind) for kind in KINDS):
            item.add_marker(_kind(item, names))
        in_cluster = _module(item).startswith(CLUSTER_DIRECTORY)
        if in_cluster:
            item.add_marker("cluster")
        loads_machine = in_cluster or _module(item) in MACHINE_LOADING_MODULES
        if loads_machine and not item.get_closest_marker("serial"):
            item.add_marker("serial")
        if "own_node" in item.fixturenames:
            item.add_marker(pytest.mark.xdist_group(OWN_NODE_GROUP))
    # The cluster tests last: their RabbitMQ cluster lives for the session (tests/cluster/
    # conftest.py), and its three idle nodes would take CPU from the serial tests after them,
    # whose clients must be answered within a second (a hostile run failed so: 1.16 s).
    items.sort(key=lambda item: item.get_closest_marker("cluster") is not None)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Note whether this run selected only unit tests: then the services are off limits."""
    session.config.stash[UNIT_ONLY] = bool(session.items) and all(
        item.get_closest_marker("unit") for item in session.items
    )


def _refuse_services_in_a_unit_run(config: pytest.Config, service: str) -> None:
    if config.stash.get(UNIT_ONLY, False):
        pytest.fail(
            f"a test of a unit-only run asked for {service}: it is an integration test, "
            "so use a service fixture (settings, db, ...) statically or mark it integration",
            pytrace=False,
        )


def _service_ports() -> set[int]:
    ports = set(SERVICE_PORTS)
    for variable in SERVICE_URL_VARIABLES:
        with contextlib.suppress(ValueError):
            if (port := urlsplit(os.environ.get(variable, "")).port) is not None:
                ports.add(port)
    return ports


@pytest.fixture(scope="session", autouse=True)
def no_service_connections_in_a_unit_run(request: pytest.FixtureRequest) -> Iterator[None]:
    """In a unit-only run, refuse TCP connections to PostgreSQL's and RabbitMQ's ports."""
    if not request.config.stash.get(UNIT_ONLY, False):
        yield
        return
    ports = _service_ports()
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def refused(address: Any) -> bool:
        return isinstance(address, tuple) and len(address) >= 2 and address[1] in ports

    def connect(sock: socket.socket, address: Any) -> None:
        if refused(address):
            raise ConnectionRefusedError(f"a unit test may not connect to a service: {address}")
        real_connect(sock, address)

    def connect_ex(sock: socket.socket, address: Any) -> int:
        if refused(address):
            raise ConnectionRefusedError(f"a unit test may not connect to a service: {address}")
        return real_connect_ex(sock, address)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", connect)
        patch.setattr(socket.socket, "connect_ex", connect_ex)
        yield


@pytest.fixture(scope="session")
def postgres_server_url(request: pytest.FixtureRequest) -> Iterator[str]:
    _refuse_services_in_a_unit_run(request.config, "PostgreSQL")
    with postgres_server() as url:
        yield url


@pytest.fixture(scope="session")
def database_url(postgres_server_url: str) -> Iterator[str]:
    """A migrated database of this session's own."""
    with scratch_database(postgres_server_url) as url:
        asyncio.run(migrate(url))
        yield url


@pytest.fixture(scope="session")
def vhosts(request: pytest.FixtureRequest) -> Iterator[VhostFactory | str]:
    _refuse_services_in_a_unit_run(request.config, "RabbitMQ")
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


EMPTY_TABLES = """
DELETE FROM scores;
DELETE FROM api_keys;
DELETE FROM score_tombstones;
DELETE FROM idempotency_keys;
"""


async def _empty_queues(settings: Settings) -> None:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        topology = await declare_topology(channel, settings)
        for queue in (topology.queue, *topology.shard_queues, topology.dead_letter_queue):
            await queue.purge()


@pytest.fixture(autouse=True)
async def clean_slate(request: pytest.FixtureRequest) -> None:
    """Empty tables and queues before each test that touches the services."""
    if "settings" not in request.fixturenames:
        return
    settings: Settings = request.getfixturevalue("settings")
    conn = await asyncpg.connect(settings.database_url)
    try:
        # DELETE, not TRUNCATE: a test leaves a few rows, and TRUNCATE's new files cost ten
        # times as much as deleting them (40 ms a test, measured).
        await conn.execute(EMPTY_TABLES)
    finally:
        await conn.close()
    await _empty_queues(settings)


@pytest.fixture
async def bare_vhost(settings: Settings) -> AsyncIterator[str]:
    """The session's vhost without the topology, for a test that declares it with queue
    arguments of its own (a limit, a delivery limit: fixed once a queue is declared). It is
    deleted again after the test, so that the next one declares it as usual."""
    await delete_topology(settings.amqp_url, settings)
    yield settings.amqp_url
    await delete_topology(settings.amqp_url, settings)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA of the tests' own, which the own RabbitMQ node's TLS listener trusts, and more."""
    return make_pki(tmp_path_factory.mktemp("pki"), TLS_CLIENT_NAME)


@pytest.fixture(scope="session")
def rabbitmq_node_of_our_own(amqp_url: str, pki: Pki) -> Iterator[RabbitMQNode]:
    """One RabbitMQ node for the tests that stop a broker, raise an alarm on it, reach it
    over TLS or meet a smaller max_message_size (tests/support/rabbitmq_node.py): booted
    once per test process (5-10 s, 5 s of CPU), and every such test runs in one pytest-xdist
    worker (`own_node` puts it in the xdist group OWN_NODE_GROUP). Its one vhost has the
    name of the session's own, so a URL may list it beside the machine's broker."""
    server = pki.ca.issue_server("rabbitmq-test-node")
    with rabbitmq_node(
        NodeTls(pki.ca.cert_file, server.cert_file, server.key_file),
        vhost=unquote(urlsplit(amqp_url).path[1:]) or "/",
        max_message_bytes=OWN_NODE_MAX_MESSAGE_BYTES,
    ) as node:
        yield node


@pytest.fixture
async def own_node(
    rabbitmq_node_of_our_own: RabbitMQNode, settings: Settings
) -> AsyncIterator[RabbitMQNode]:
    """The tests' own RabbitMQ node, as if new: running, no alarm, no topology; so again
    after the test, whatever it did to the node."""
    node = rabbitmq_node_of_our_own
    await delete_topology(node.amqp_url, settings)
    yield node
    if not node.running:
        await node.start_app()
        await _wait_for_leaders(node.amqp_url, settings)
    if node.memory_alarm:
        await node.clear_memory_alarm()


async def _wait_for_leaders(amqp_url: str, settings: Settings) -> None:
    """Wait until each queue of the topology has elected a leader again after a restart: on
    RabbitMQ 3.10, deleting a quorum queue before then crashes its vhost. Only a leader
    answers a basic.get (what it takes is deleted with the queue)."""
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        for name in (*persist_queues(settings), DEAD_LETTER_QUEUE):
            with contextlib.suppress(aio_pika.exceptions.ChannelNotFoundEntity):
                queue = await channel.declare_queue(name, passive=True)
                await queue.get(no_ack=True, fail=False, timeout=30)
            if channel.is_closed:
                channel = await connection.channel()


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
def receiver() -> Iterator[OtlpReceiver]:
    """An OTLP/HTTP receiver of the test's own."""
    with otlp_receiver() as received:
        yield received


@pytest.fixture
def traced(settings: Settings, receiver: OtlpReceiver) -> Settings:
    """The test's settings, exporting traces to its receiver."""
    return settings.model_copy(update={"otel_exporter_otlp_endpoint": receiver.endpoint})


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
