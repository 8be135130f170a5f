"""The worker's /healthz, /readyz and /metrics, served while it consumes the real broker."""

import asyncio
from datetime import UTC, datetime, timedelta

import aio_pika
import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.broker import broker_nodes, node_address
from shared.contract import CONTENT_TYPE
from shared.settings import Settings
from shared.topology import DEAD_LETTER_QUEUE, QUEUE
from tests.conftest import wait_for_count
from tests.support.processes import connect_broker, running_worker, score_message, wait_until
from tests.support.tcp_proxy import TcpProxy
from worker.worker import ScoreWorker

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The session's settings, with the worker's health server on a free port."""
    return settings.model_copy(update={"worker_health_port": 0})


async def get(worker: ScoreWorker, path: str) -> httpx.Response:
    """GET a path from the worker's health server."""
    base_url = f"http://127.0.0.1:{worker.health_port}"
    async with httpx.AsyncClient(base_url=base_url, timeout=5) as client:
        return await client.get(path)


def parse_samples(text: str) -> Samples:
    """Every sample of a Prometheus exposition, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; a labelled counter not yet incremented counts as 0."""
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(worker: ScoreWorker) -> Samples:
    """GET /metrics and parse it."""
    response = await get(worker, "/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse_samples(response.text)


async def wait_for_status(worker: ScoreWorker, path: str, status: int, timeout: float) -> None:
    """Poll a path until it answers status."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (response := await get(worker, path)).status_code != status:
        assert loop.time() < deadline, f"{path} answered {response.status_code}, not {status}"
        await asyncio.sleep(0.05)


async def test_healthz_and_readyz_while_connected(settings: Settings) -> None:
    async with running_worker(settings) as worker:
        alive = await get(worker, "/healthz")
        assert alive.status_code == 200
        assert alive.json() == {"status": "ok"}

        ready = await get(worker, "/readyz?verbose=1")
        assert ready.status_code == 200
        assert ready.json() == {
            "status": "ready",
            "broker": {"node": node_address(broker_nodes(settings.amqp_url)[0]), "connected": True},
        }

        for path in ("/", "/nope", "/healthz/extra", "/metricsz"):
            assert (await get(worker, path)).status_code == 404, path
        base_url = f"http://127.0.0.1:{worker.health_port}"
        async with httpx.AsyncClient(base_url=base_url, timeout=5) as client:
            assert (await client.post("/healthz")).status_code == 404


async def test_readyz_is_503_while_postgres_is_unreachable(settings: Settings) -> None:
    async with TcpProxy.for_url(settings.database_url) as proxy:
        proxied = settings.model_copy(
            update={"database_url": proxy.url_through(settings.database_url)}
        )
        async with running_worker(proxied) as worker:
            await wait_for_status(worker, "/readyz", 200, timeout=5)

            await proxy.cut()
            await wait_for_status(worker, "/readyz", 503, timeout=10)
            not_ready = await get(worker, "/readyz")
            assert not_ready.json()["status"] == "not ready"
            assert (await get(worker, "/healthz")).status_code == 200, "alive all the same"

            await proxy.restore()
            await wait_for_status(worker, "/readyz", 200, timeout=10)


async def test_readyz_is_503_while_the_broker_is_unreachable(settings: Settings) -> None:
    async with TcpProxy.for_url(settings.amqp_url) as proxy:
        proxied = settings.model_copy(update={"amqp_url": proxy.url_through(settings.amqp_url)})
        async with running_worker(proxied) as worker:
            await wait_for_status(worker, "/readyz", 200, timeout=5)

            await proxy.cut()
            try:
                await wait_for_status(worker, "/readyz", 503, timeout=5)
                assert (await get(worker, "/healthz")).status_code == 200, "alive all the same"
            finally:
                await proxy.restore()
            await wait_for_status(worker, "/readyz", 200, timeout=15)


async def test_metrics_move_with_what_the_worker_does(
    settings: Settings, db: asyncpg.Connection
) -> None:
    persisted = "score_ingest_scores_persisted_total"
    duplicates = "score_ingest_duplicates_skipped_total"
    dead_lettered = "score_ingest_dead_lettered_total"
    lag = "score_ingest_consumer_lag_seconds"
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
    old_scores = [score_message(created_at=an_hour_ago) for _ in range(5)]
    poison = aio_pika.Message(
        body=b"{not json", content_type=CONTENT_TYPE, message_id="metrics-poison"
    )

    async with connect_broker(settings) as broker, running_worker(settings) as worker:
        start = await scrape(worker)
        for name in (persisted, duplicates, "score_ingest_batch_size_count"):
            assert (name, frozenset()) in start, f"{name} is not exposed"

        await broker.publish([poison])
        assert await broker.wait_for_ready_count(DEAD_LETTER_QUEUE, 1) == 1

        await broker.publish_scores(old_scores)
        assert await wait_for_count(db, "SELECT count(*) FROM scores", 5) == 5
        await wait_until(lambda: worker.persisted == 5, "the worker counted 5 stored scores")
        stored = await scrape(worker)

        await broker.publish_scores(old_scores[:1])
        await wait_until(lambda: worker.duplicates == 1, "the worker skipped the duplicate")
        after_duplicate = await scrape(worker)

        fresh = score_message()
        await broker.publish_scores([fresh])
        await wait_until(lambda: worker.persisted == 6, "the worker stored the fresh score")
        after_fresh = await scrape(worker)

    def delta(later: Samples, name: str, earlier: Samples = start, **labels: str) -> float:
        return sample(later, name, **labels) - sample(earlier, name, **labels)

    assert delta(stored, dead_lettered, reason="invalid_json") == 1
    assert delta(stored, dead_lettered, reason="schema_violation") == 0
    assert delta(stored, persisted) == 5
    assert delta(stored, duplicates) == 0
    batches = delta(stored, "score_ingest_batch_size_count")
    assert 1 <= batches <= 5
    assert delta(stored, "score_ingest_batch_size_sum") == 5
    assert delta(stored, "score_ingest_insert_seconds_count") == batches
    assert delta(stored, "score_ingest_insert_seconds_sum") > 0
    assert sample(stored, lag) >= 3600, "the stored scores were an hour old"

    assert delta(after_duplicate, persisted, stored) == 0
    assert delta(after_duplicate, duplicates, stored) == 1
    assert delta(after_duplicate, "score_ingest_batch_size_count", stored) == 1
    assert delta(after_duplicate, dead_lettered, stored, reason="invalid_json") == 0

    assert delta(after_fresh, persisted, after_duplicate) == 1
    assert 0 <= sample(after_fresh, lag) < 60, "the last batch was a fresh score"


async def test_queue_depth_follows_the_queues(settings: Settings) -> None:
    depth = "score_ingest_queue_depth"
    poison = aio_pika.Message(body=b"{not json", content_type=CONTENT_TYPE)
    async with connect_broker(settings) as broker, running_worker(settings) as worker:
        await broker.publish([poison])
        assert await broker.wait_for_ready_count(DEAD_LETTER_QUEUE, 1) == 1

        # The worker polls queue depths every 5 seconds, not on every message.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 7.5
        while True:
            samples = await scrape(worker)
            dead_depth = sample(samples, depth, queue=DEAD_LETTER_QUEUE)
            if dead_depth == 1:
                break
            assert loop.time() < deadline, (
                f"{depth} of {DEAD_LETTER_QUEUE} is {dead_depth} while the queue has held "
                "1 message for more than one polling interval"
            )
            await asyncio.sleep(0.2)
        assert sample(samples, depth, queue=QUEUE) == 0
