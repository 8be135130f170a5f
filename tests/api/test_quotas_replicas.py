"""Two api processes share a key's quota with no store between them: told API_REPLICAS=2,
each enforces half of it (api/quotas.py), so together they allow the quota.

Scores are counted over a window of seconds and held to bounds that take the whole window
(from before the first request to after the last answer), never to sub-second timings.
"""

import asyncio
import secrets
from collections import Counter

import asyncpg
import httpx

from api.keys import create_key
from api.quotas import Quota
from shared.settings import Settings
from tests.conftest import PROJECT, basic_auth, score_body
from tests.support.processes import ApiProcess, api_process

QUOTA = Quota(rate=100, burst=100)
BATCH = 10  # a divisor of each replica's share of the burst: no batch ever runs into debt
WINDOW_SECONDS = 4.0
# A refused client tries again this soon: far sooner than a replica's share (50 scores a
# second, a batch every 0.2 s) comes back, so that the clients keep the quota spent.
RETRY_SECONDS = 0.05


async def _send_until(
    api: ApiProcess, key: str, entity: str, until: float, accepted: Counter[str]
) -> None:
    """Post batches to one api until the loop's clock reaches `until`, counting accepted scores."""
    loop = asyncio.get_running_loop()
    body = {"scores": [score_body(scorer=f"weave:///{entity}/{PROJECT}/op/exact:abc")] * BATCH}
    async with httpx.AsyncClient(base_url=api.base_url, timeout=10) as client:
        while loop.time() < until:
            response = await client.post(
                f"/v2/{entity}/{PROJECT}/scores/batch", json=body, headers=basic_auth(key)
            )
            if response.status_code == 200:
                accepted[api.base_url] += BATCH
            else:
                assert response.status_code == 429, response.text
                await asyncio.sleep(RETRY_SECONDS)


async def _window(apis: list[ApiProcess], key: str, entity: str) -> tuple[Counter[str], float]:
    """Send to every api at once for WINDOW_SECONDS; the scores each accepted, and the time
    from before the first request to after the last answer."""
    loop = asyncio.get_running_loop()
    accepted: Counter[str] = Counter()
    started = loop.time()
    until = started + WINDOW_SECONDS
    await asyncio.gather(*(_send_until(api, key, entity, until, accepted) for api in apis))
    return accepted, loop.time() - started


async def test_two_apis_together_hold_a_key_to_its_quota(
    settings: Settings, db: asyncpg.Connection
) -> None:
    entity = f"quota-{secrets.token_hex(4)}"
    replicas = settings.model_copy(update={"api_replicas": 2})
    async with api_process(replicas) as first, api_process(replicas) as second:
        _, key = await create_key(db, entity, quota=QUOTA)

        accepted, elapsed = await _window([first, second], key, entity)

        # Each replica: at most its half of the burst plus its half of the rate; together
        # the quota. Told nothing (API_REPLICAS=1), the two would allow twice as much.
        total = sum(accepted.values())
        assert total <= QUOTA.burst + QUOTA.rate * elapsed, (accepted, elapsed)
        # ... and no less than half of it, however loaded the machine.
        assert total >= QUOTA.rate * elapsed / 2, (accepted, elapsed)
        for api in (first, second):
            assert accepted[api.base_url] <= (QUOTA.burst + QUOTA.rate * elapsed) / 2

        # A client that reaches one replica only gets that replica's share: the drift the
        # README documents for uneven balancing. The buckets start this window below full.
        alone, elapsed = await _window([first], key, entity)
        assert 0 < alone[first.base_url] <= (QUOTA.burst + QUOTA.rate * elapsed) / 2
