"""Confirms do not serialise requests: in-flight publishes share the channel."""

import asyncio
import time

import httpx

from shared.settings import Settings
from tests.conftest import ENTITY, PROJECT, basic_auth, score_body, serving
from tests.support.tcp_proxy import TcpProxy

URL = f"/v2/{ENTITY}/{PROJECT}/scores"
LATENCY = 0.25
CONCURRENT = 20


async def test_concurrent_creates_wait_for_their_confirms_together(
    settings: Settings, api_key: str
) -> None:
    """With every broker reply 250 ms late, 20 creates at once take about one delay, not 20."""
    async with TcpProxy.for_url(settings.amqp_url, latency=LATENCY) as proxy:
        slow_broker = settings.model_copy(update={"amqp_url": proxy.url_through(settings.amqp_url)})
        async with serving(slow_broker) as client:
            one = await _post(client, api_key)
            assert one.status_code == 200, one.text

            started = time.monotonic()
            responses = await asyncio.gather(*(_post(client, api_key) for _ in range(CONCURRENT)))
            elapsed = time.monotonic() - started

    assert [r.status_code for r in responses] == [200] * CONCURRENT
    assert len({r.json()["score_id"] for r in responses}) == CONCURRENT
    # Serialised confirms would need CONCURRENT * LATENCY = 5 s; shared ones need ~LATENCY.
    assert elapsed < CONCURRENT * LATENCY / 4, f"{CONCURRENT} creates took {elapsed:.2f}s"


async def _post(client: httpx.AsyncClient, key: str) -> httpx.Response:
    return await client.post(URL, json=score_body(), headers=basic_auth(key))
