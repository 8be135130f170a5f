"""The worker's memory is bounded by WORKER_PREFETCH_BYTES whatever the mix of message sizes.

After small messages the prefetch window is hundreds of messages; large ones then arrive in
that window before it shrinks, while PostgreSQL is unreachable so that nothing is acked. The
worker must hold the broker back (its byte gate) instead of taking them all in: its resident
memory grows by about the budget, not by the window's worth of large messages.
"""

import asyncio
import json

import asyncpg

from shared.contract import MAX_VALUE_BYTES
from shared.settings import MIB, Settings
from shared.topology import QUEUE
from tests.conftest import wait_for_count
from tests.support.memory import rss_bytes
from tests.support.processes import connect_broker, score_message, worker_process
from tests.support.tcp_proxy import TcpProxy
from tests.worker.test_batch_messages import as_json, batch_message

COUNT_SCORES = "SELECT count(*) FROM scores"
BUDGET = 8 * MIB
SMALL = 2000
LARGE = 30
SCORES_PER_LARGE = 3
# Besides the budget: one message being read (and its copy as it is assembled), aiormq's and
# the socket's buffers, and what the allocator keeps after decoding. Taking every large
# message in, as the worker did before its byte gate, grows it by about 47 MiB here.
MARGIN = 16 * MIB


def large_message(label: str) -> tuple[list[str], bytes]:
    """A score.batch.v1 body of SCORES_PER_LARGE scores of nearly MAX_VALUE_BYTES each."""
    value = "x" * (MAX_VALUE_BYTES * 2 // 3)
    scores = [
        score_message(prediction_id=f"{label}-{i}", value=value) for i in range(SCORES_PER_LARGE)
    ]
    body = json.dumps({"scores": [as_json(score) for score in scores]}).encode()
    return [str(score.score_id) for score in scores], body


async def test_large_messages_after_small_ones_stay_within_the_byte_budget(
    settings: Settings, db: asyncpg.Connection
) -> None:
    small = [score_message(prediction_id=f"small-{i}") for i in range(SMALL)]
    large = [large_message(f"large-{n}") for n in range(LARGE)]
    total = SMALL + LARGE * SCORES_PER_LARGE
    async with TcpProxy.for_url(settings.database_url) as proxy:
        budgeted = settings.model_copy(
            update={
                "database_url": proxy.url_through(settings.database_url),
                "worker_prefetch_bytes": BUDGET,
            }
        )
        async with connect_broker(settings) as broker, worker_process(budgeted) as worker:
            await broker.publish_scores(small)
            assert await wait_for_count(db, COUNT_SCORES, SMALL, timeout=20) == SMALL
            baseline = rss_bytes(worker.pid)

            await proxy.cut()
            await broker.publish([batch_message(body, ids[0]) for ids, body in large])
            # Within the broker's 30 s send timeout: a worker holding the broker back that
            # long has its connection closed (README).
            peak = baseline
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 4
            while loop.time() < deadline:
                peak = max(peak, rss_bytes(worker.pid))
                await asyncio.sleep(0.05)
            assert worker.returncode is None
            held_back = await broker.ready_count(QUEUE)

            await proxy.restore()
            assert await wait_for_count(db, COUNT_SCORES, total, timeout=30) == total

    pushed = LARGE * len(large[0][1])
    assert peak - baseline < BUDGET + MARGIN, (
        f"RSS grew by {(peak - baseline) / MIB:.1f} MiB with a budget of {BUDGET / MIB:.0f} MiB "
        f"({pushed / MIB:.0f} MiB of large messages queued, {held_back} still ready)"
    )
