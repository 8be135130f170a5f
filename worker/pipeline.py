"""Storing batches, two at a time, and acking them in delivery order once committed."""

import asyncio
import logging
import time
from collections import deque
from datetime import UTC, datetime

from opentelemetry.trace import Link, NonRecordingSpan, SpanKind, set_span_in_context, use_span

from shared import logs
from shared.dead_letters import DeadLetterReason
from shared.topology import QUEUE
from shared.tracing import MAX_LINKS, Tracing, message_contexts
from worker._metrics import (
    BATCH_SIZE,
    CONSUMER_LAG_SECONDS,
    DATABASE_RETRIES,
    DUPLICATES_SKIPPED,
    INSERT_SECONDS,
    PERSIST_LAG_SECONDS,
    SCORES_PERSISTED,
)
from worker.batches import Taken
from worker.consumer import Consumers, Delivery
from worker.dead_letters import DeadLetters
from worker.decode import PoisonMessage, ScoreRow, created_at_of
from worker.store import ScoreStore, StorageRejected

log = logging.getLogger(__name__)

STORES_IN_FLIGHT = 2
"""Batches stored at once, each in a transaction (and on a database connection) of its own."""

_Decoded = tuple[Delivery, list[ScoreRow]]
# The transaction that stores a batch, as its `insert` span describes it.
_INSERT_ATTRIBUTES = {"db.system.name": "postgresql", "db.operation.name": "INSERT"}


class StorePipeline:
    """Stores batches and acks them, in delivery order, only after their commit.

    Up to STORES_IN_FLIGHT batches are stored at once while the next is collected and
    decoded: PostgreSQL works on other cores. Their transactions begin in the order the
    batches were submitted (ScoreStore), and each batch is acked only after the one before.
    A message that can never be stored is dead-lettered instead; PostgreSQL being
    unavailable is never a message's fault: its batch is retried until it is stored.
    """

    def __init__(
        self,
        store: ScoreStore,
        consumer: Consumers,
        dead_letters: DeadLetters,
        retry_max_seconds: float,
        tracing: Tracing | None = None,
    ) -> None:
        self._store = store
        self._tracing = tracing
        self._consumer = consumer
        self._dead_letters = dead_letters
        self._retry_max_seconds = retry_max_seconds
        self._in_flight: deque[asyncio.Task[None]] = deque()
        self.persisted = 0
        self.duplicates = 0

    async def submit(self, batch: list[Taken]) -> None:
        """Start storing a batch; return once fewer than STORES_IN_FLIGHT are in flight."""
        previous = self._in_flight[-1] if self._in_flight else None
        self._in_flight.append(asyncio.create_task(self._store_then_ack(batch, previous)))
        while self._in_flight and (
            self._in_flight[0].done() or len(self._in_flight) >= STORES_IN_FLIGHT
        ):
            await self._in_flight.popleft()

    async def finish(self) -> None:
        """Wait until every batch submitted is stored and acked."""
        while self._in_flight:
            await self._in_flight.popleft()

    def cancel(self) -> None:
        """Give up on the batches in flight: what they did not ack, the broker redelivers."""
        for task in self._in_flight:
            task.cancel()

    async def _store_then_ack(
        self, batch: list[Taken], previous: asyncio.Task[None] | None
    ) -> None:
        """Dead-letter the batch's poison, store the rest, and once the batch before is
        acked, ack what was stored with one frame."""
        stored: list[Delivery] = []
        decoded: list[_Decoded] = []
        for message, scores in batch:
            if isinstance(scores, PoisonMessage):
                await self._dead_letters.send(message, scores)
            else:
                decoded.append((message, scores))
        if decoded:
            if self._tracing is None:
                stored = await self._persist(decoded)
            else:
                stored = await self._persist_traced(self._tracing, decoded)
        if previous is not None:
            await previous
        await self._consumer.ack_through(stored)

    async def _persist_traced(self, tracing: Tracing, decoded: list[_Decoded]) -> list[Delivery]:
        """_persist in a `store` span linked to the trace context of each message (up to
        MAX_LINKS), and the child of that context when the batch holds only one."""
        contexts = [
            context for message, _ in decoded for context in message_contexts(message.headers)
        ]
        parent = None
        if len({(context.trace_id, context.span_id) for context in contexts}) == 1:
            parent = set_span_in_context(NonRecordingSpan(contexts[0]))
        span = tracing.tracer.start_span(
            "store",
            context=parent,
            kind=SpanKind.CONSUMER,
            links=[Link(context) for context in contexts[:MAX_LINKS]],
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.destination.name": QUEUE,
                "messaging.batch.message_count": len(decoded),
                "score_ingest.scores": sum(len(scores) for _, scores in decoded),
                "score_ingest.links_dropped": max(0, len(contexts) - MAX_LINKS),
            },
        )
        token = logs.trace_id.set(f"{span.get_span_context().trace_id:032x}")
        try:
            with use_span(span, end_on_exit=True):
                return await self._persist(decoded)
        finally:
            logs.trace_id.reset(token)

    async def _persist(self, decoded: list[_Decoded]) -> list[Delivery]:
        """Store the scores in one transaction; returns the messages stored, to be acked.

        Messages whose rows PostgreSQL itself refuses are dead-lettered (and acked) instead.
        """
        delay = 0.1
        while True:
            started = time.perf_counter()
            rows = [score for _, scores in decoded for score in scores]
            try:
                if self._tracing is None:
                    inserted = await self._store.persist_batch(rows)
                else:
                    with self._tracing.tracer.start_as_current_span(
                        "insert", kind=SpanKind.CLIENT, attributes=_INSERT_ATTRIBUTES
                    ) as span:
                        inserted = await self._store.persist_batch(rows)
                        span.set_attribute("score_ingest.stored", inserted)
            except StorageRejected as exc:
                if len(decoded) == 1:
                    rejected = PoisonMessage(DeadLetterReason.STORAGE_REJECTED, str(exc))
                    await self._dead_letters.send(decoded[0][0], rejected)
                    return []
                # Find the rows PostgreSQL refuses without holding back the others.
                return [message for item in decoded for message in await self._persist([item])]
            except Exception as exc:  # any other failure is the database's, not the data's
                log.warning(
                    "storing %d scores failed (%s); retrying in %.1fs", len(decoded), exc, delay
                )
                DATABASE_RETRIES.inc()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max_seconds)
                continue
            try:
                self._observe(decoded, inserted, time.perf_counter() - started)
            except Exception:  # metrics must never cost a stored batch its ack
                log.exception("observing a stored batch failed")
            return [message for message, _ in decoded]

    def _observe(self, decoded: list[_Decoded], inserted: int, seconds: float) -> None:
        received = sum(len(scores) for _, scores in decoded)
        self.persisted += inserted
        self.duplicates += received - inserted
        SCORES_PERSISTED.inc(inserted)
        DUPLICATES_SKIPPED.inc(received - inserted)
        BATCH_SIZE.observe(received)
        INSERT_SECONDS.observe(seconds)
        now = datetime.now(UTC)
        # One lag per message, from its first score (a batch's scores share their created_at).
        lags = [(now - created_at_of(scores[0])).total_seconds() for _, scores in decoded]
        for lag in lags:
            PERSIST_LAG_SECONDS.observe(lag)
        CONSUMER_LAG_SECONDS.set(max(lags))
