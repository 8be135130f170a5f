"""An AMQP_URL listing several nodes: the worker consumes from one, and moves on when it goes.

The nodes are the machine's RabbitMQ under other addresses: a port nothing listens on (a
node that is down), or TcpProxies whose connections the tests drop (a node that goes away);
and, to be stopped, a node of the test's own beside it (the api moves on with the worker).
"""

import asyncio
from collections.abc import Callable
from typing import Any

import asyncpg
import httpx
import pytest
from aio_pika import RobustConnection

from shared.broker import broker_nodes, connect_until_ready, node_address
from shared.settings import Settings
from tests.conftest import ENTITY, PROJECT, basic_auth, score_body, serving, wait_for_count
from tests.support.processes import connect_broker, running_worker, score_message
from tests.support.rabbitmq_node import RabbitMQNode
from tests.support.services import free_port, with_nodes
from tests.support.tcp_proxy import TcpProxy
from worker.worker import ScoreWorker

COUNT_STORED = "SELECT count(*) FROM scores WHERE score_id = ANY($1::uuid[])"
SCORES_PATH = f"/v2/{ENTITY}/{PROJECT}/scores"
MOVE_SECONDS = 15.0


async def wait_for_readyz(
    worker: ScoreWorker, holds: Callable[[httpx.Response], bool], what: str
) -> httpx.Response:
    """Poll the worker's /readyz until its answer holds; returns that answer."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + MOVE_SECONDS
    base_url = f"http://127.0.0.1:{worker.health_port}"
    async with httpx.AsyncClient(base_url=base_url, timeout=5) as client:
        while not holds(response := await client.get("/readyz")):
            assert loop.time() < deadline, f"{what}: /readyz is still {response.text}"
            await asyncio.sleep(0.05)
    return response


def consuming_from(node: str) -> Callable[[httpx.Response], bool]:
    """Whether /readyz says ready, consuming from this node."""

    def holds(response: httpx.Response) -> bool:
        body: dict[str, Any] = response.json()
        return response.status_code == 200 and body["broker"] == {"node": node, "connected": True}

    return holds


async def assert_stores_a_score(settings: Settings, db: asyncpg.Connection) -> None:
    """Publish a score straight to the broker; the worker stores it."""
    score = score_message()
    async with connect_broker(settings) as broker:
        await broker.publish_scores([score])
    ids = [score.score_id]
    assert await wait_for_count(db, COUNT_STORED, 1, ids, timeout=MOVE_SECONDS) == 1


async def test_the_worker_skips_a_node_that_is_down(
    settings: Settings, db: asyncpg.Connection
) -> None:
    real = node_address(broker_nodes(settings.amqp_url)[0])
    down = f"127.0.0.1:{free_port()}"
    several = settings.model_copy(update={"amqp_url": with_nodes(settings.amqp_url, down, real)})

    async with running_worker(several) as worker:
        await wait_for_readyz(worker, consuming_from(real), f"consuming from {real}")
        await assert_stores_a_score(settings, db)


async def test_the_worker_moves_to_the_next_node_when_its_node_goes_away(
    settings: Settings, db: asyncpg.Connection
) -> None:
    async with (
        TcpProxy.for_url(settings.amqp_url) as first,
        TcpProxy.for_url(settings.amqp_url) as second,
    ):
        nodes = with_nodes(settings.amqp_url, first.address, second.address)
        several = settings.model_copy(update={"amqp_url": nodes})
        async with running_worker(several) as worker:
            await wait_for_readyz(worker, consuming_from(first.address), "consuming")
            await assert_stores_a_score(settings, db)

            # The node still takes connections: the worker must go to the next one all the
            # same, not back to the node it just lost.
            first.drop_connections()
            await wait_for_readyz(worker, consuming_from(second.address), "moved")
            await assert_stores_a_score(settings, db)

            await first.cut()
            await second.cut()
            gone = await wait_for_readyz(
                worker, lambda response: not response.json()["broker"]["connected"], "gone"
            )
            assert gone.status_code == 503
            assert gone.json()["broker"]["node"] in {first.address, second.address}


async def test_a_robust_connection_reconnects_to_the_next_node(settings: Settings) -> None:
    async with (
        TcpProxy.for_url(settings.amqp_url) as first,
        TcpProxy.for_url(settings.amqp_url) as second,
    ):
        nodes = with_nodes(settings.amqp_url, first.address, second.address)
        connection = await connect_until_ready(nodes, "test", attempt_seconds=5)
        assert isinstance(connection, RobustConnection)
        try:
            assert connection.url.port == first.port
            channel = await connection.channel()

            first.drop_connections()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + MOVE_SECONDS
            while not (connection.connected.is_set() and connection.url.port == second.port):
                assert loop.time() < deadline, f"still on {connection.url.port}"
                await asyncio.sleep(0.05)
            # Its channels came back with it.
            queue = await channel.declare_queue(exclusive=True)
            assert queue.name
        finally:
            await connection.close()


async def test_the_api_and_the_worker_move_on_when_their_node_stops(
    settings: Settings, own_node: RabbitMQNode, db: asyncpg.Connection, api_key: str
) -> None:
    stopping = f"127.0.0.1:{own_node.amqp_port}"
    real = node_address(broker_nodes(settings.amqp_url)[0])
    listed = with_nodes(settings.amqp_url, stopping, real)
    several = settings.model_copy(update={"amqp_url": listed})
    headers = basic_auth(api_key)

    async with serving(several) as client, running_worker(several) as worker:
        assert (await client.get("/readyz")).json()["broker"]["node"] == stopping
        await wait_for_readyz(worker, consuming_from(stopping), f"consuming from {stopping}")
        before = await client.post(SCORES_PATH, json=score_body(), headers=headers)
        assert before.status_code == 200, before.text
        # The api publishes through a second node too (api/publisher.py, LINKS): here the
        # machine's broker, no cluster with the node the worker consumes from.
        await assert_stores_a_score(
            settings.model_copy(update={"amqp_url": with_nodes(settings.amqp_url, stopping)}), db
        )

        await own_node.stop_app()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + MOVE_SECONDS
        while (
            after := await client.post(SCORES_PATH, json=score_body(), headers=headers)
        ).status_code != 200:
            assert after.status_code == 503, after.text
            assert loop.time() < deadline, f"still 503 after {MOVE_SECONDS}s: {after.text}"
            await asyncio.sleep(0.1)
        assert (await client.get("/readyz")).json()["broker"] == {"node": real, "connected": True}
        await wait_for_readyz(worker, consuming_from(real), f"consuming from {real}")
        stored = [after.json()["score_id"]]
        assert await wait_for_count(db, COUNT_STORED, 1, stored, timeout=MOVE_SECONDS) == 1


def test_the_worker_refuses_a_node_list_it_cannot_read() -> None:
    with pytest.raises(ValueError, match="AMQP_URL lists a node with no host: ''"):
        ScoreWorker(Settings(amqp_url="amqp://guest:guest@10.1.0.1:5672,,10.1.0.2:5672/"))
