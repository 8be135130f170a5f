"""The worker's periodic chores beside storing: purging what expired, polling queue depths."""

import asyncio
import logging

from aio_pika.abc import AbstractChannel

from shared.settings import Settings
from shared.topology import DEAD_LETTER_QUEUE
from worker._metrics import QUEUE_CONSUMERS, QUEUE_DEPTH
from worker.store import ScoreStore

log = logging.getLogger(__name__)

_PURGE_INTERVAL_SECONDS = 600
_QUEUE_DEPTH_INTERVAL_SECONDS = 5


async def purge_expired_periodically(store: ScoreStore, settings: Settings) -> None:
    """Forget Idempotency-Keys, tombstones and refusals past their retention, every ten
    minutes."""
    while True:
        try:
            purged = await store.purge_idempotency_keys(settings.idempotency_key_ttl_seconds)
            buried = await store.purge_tombstones(settings.tombstone_ttl_seconds)
            forgotten = await store.purge_failures(settings.score_failure_ttl_seconds)
        except Exception as exc:  # the next round tries again; scores are unaffected
            log.warning("purging expired Idempotency-Keys, tombstones or refusals failed: %s", exc)
        else:
            if purged or buried or forgotten:
                log.info(
                    "purged %d expired Idempotency-Keys, %d tombstones, %d refusals",
                    purged,
                    buried,
                    forgotten,
                )
        await asyncio.sleep(_PURGE_INTERVAL_SECONDS)


async def poll_queue_depths_periodically(channel: AbstractChannel, queues: list[str]) -> None:
    """Set score_ingest_queue_depth and score_ingest_queue_consumers of the queues consumed
    and scores.dead every five seconds."""
    while True:
        for name in (*queues, DEAD_LETTER_QUEUE):
            try:
                # The robust channel would answer from its cache; ask the broker itself.
                underlay = await channel.get_underlay_channel()
                declared = await underlay.queue_declare(name, passive=True)
            except Exception as exc:  # a missed poll only leaves the gauge stale
                log.debug("could not read the depth of %s: %s", name, exc)
            else:
                QUEUE_DEPTH.labels(name).set(declared.message_count or 0)
                QUEUE_CONSUMERS.labels(name).set(declared.consumer_count or 0)
        await asyncio.sleep(_QUEUE_DEPTH_INTERVAL_SECONDS)
