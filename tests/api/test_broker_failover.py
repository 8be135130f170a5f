"""An AMQP_URL listing several nodes: the api publishes through one, and moves on when it goes.

The nodes are the machine's RabbitMQ under other addresses: a port nothing listens on (a
node that is down), or TcpProxies the tests cut (a node that goes away).
"""

import asyncio
from collections.abc import Callable
from typing import Any

import httpx

from shared.broker import broker_nodes, node_address
from shared.settings import Settings
from shared.topology import QUEUE
from tests.conftest import ENTITY, PROJECT, basic_auth, score_body, serving
from tests.support.processes import CliProcess, connect_broker
from tests.support.services import free_port, with_nodes
from tests.support.tcp_proxy import TcpProxy

SCORES_PATH = f"/v2/{ENTITY}/{PROJECT}/scores"
MOVE_SECONDS = 10.0


async def wait_for_readyz(
    client: httpx.AsyncClient, holds: Callable[[dict[str, Any]], bool], what: str
) -> httpx.Response:
    """Poll /readyz until its body holds; returns that answer."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + MOVE_SECONDS
    while not holds((response := await client.get("/readyz")).json()):
        assert loop.time() < deadline, f"{what}: /readyz is still {response.json()}"
        await asyncio.sleep(0.05)
    return response


async def wait_for_broker(client: httpx.AsyncClient, node: str) -> httpx.Response:
    """Poll /readyz until the publisher is connected to this node; returns that answer."""
    expected = {"node": node, "connected": True}
    return await wait_for_readyz(
        client, lambda body: body["broker"] == expected, f"connected to {node}"
    )


async def post(client: httpx.AsyncClient, api_key: str) -> httpx.Response:
    """POST one valid score."""
    return await client.post(SCORES_PATH, json=score_body(), headers=basic_auth(api_key))


async def test_the_api_skips_a_node_that_is_down(settings: Settings, api_key: str) -> None:
    real = node_address(broker_nodes(settings.amqp_url)[0])
    down = f"127.0.0.1:{free_port()}"
    several = settings.model_copy(update={"amqp_url": with_nodes(settings.amqp_url, down, real)})

    async with serving(several) as client, connect_broker(settings) as broker:
        response = await post(client, api_key)
        assert response.status_code == 200, response.text
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["broker"] == {"node": real, "connected": True}
        assert await broker.wait_for_ready_count(QUEUE, 1) == 1


async def test_the_api_moves_to_the_next_node_when_its_node_goes_away(
    settings: Settings, api_key: str
) -> None:
    async with (
        TcpProxy.for_url(settings.amqp_url) as first,
        TcpProxy.for_url(settings.amqp_url) as second,
    ):
        nodes = with_nodes(settings.amqp_url, first.address, second.address)
        several = settings.model_copy(update={"amqp_url": nodes})
        async with serving(several) as client, connect_broker(settings) as broker:
            await wait_for_broker(client, first.address)
            assert (await post(client, api_key)).status_code == 200

            # The node still takes connections: the publisher must go to the next one all
            # the same, not back to the node it just lost.
            first.drop_connections()
            moved = await wait_for_broker(client, second.address)
            assert moved.status_code == 200
            response = await post(client, api_key)
            assert response.status_code == 200, response.text
            assert await broker.wait_for_ready_count(QUEUE, 2) == 2

            await first.cut()
            await second.cut()
            gone = await wait_for_readyz(
                client, lambda body: not body["broker"]["connected"], "lost both nodes"
            )
            assert gone.status_code == 503
            assert gone.json()["broker"]["node"] in {first.address, second.address}
            assert (await post(client, api_key)).status_code == 503


async def test_the_api_refuses_to_start_with_a_node_list_it_cannot_read(
    settings: Settings,
) -> None:
    real = node_address(broker_nodes(settings.amqp_url)[0])
    unreadable = with_nodes(settings.amqp_url, real, "127.0.0.1:none")
    api = CliProcess(
        "api",
        ["api", "--port", str(free_port())],
        settings.model_copy(update={"amqp_url": unreadable}),
    )
    async with api:
        assert await api.wait(20) != 0
    assert "AMQP_URL has an invalid port for node '127.0.0.1:none'" in api.output
