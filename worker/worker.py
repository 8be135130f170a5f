"""The worker: consume scores.persist, store batches idempotently, ack after commit."""

import asyncio
import contextlib
import logging
import signal
import time
from collections import deque
from datetime import UTC, datetime

import asyncpg
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)
from aio_pika.exceptions import CONNECTION_EXCEPTIONS

from shared import field_tables
from shared.broker import connect_until_ready, tls_context
from shared.dead_letters import (
    DETAIL_HEADER,
    QUEUE_HEADER,
    REASON_HEADER,
    TIME_HEADER,
    DeadLetterReason,
    copy_with_headers,
)
from shared.settings import Settings
from shared.topology import DEAD_LETTER_QUEUE, QUEUE, ROUTING_KEY, declare_topology
from worker._health import HealthServer
from worker._metrics import (
    BATCH_SIZE,
    CONSUMER_LAG_SECONDS,
    DATABASE_RETRIES,
    DEAD_LETTER_FALLBACKS,
    DEAD_LETTERED,
    DUPLICATES_SKIPPED,
    INSERT_SECONDS,
    PERSIST_LAG_SECONDS,
    QUEUE_DEPTH,
    SCORES_PERSISTED,
)
from worker.consumer import Consumer, Delivery
from worker.decode import PoisonMessage, ScoreRow, decode_scores
from worker.store import ScoreStore, StorageRejected

log = logging.getLogger(__name__)

_Decoded = tuple[AbstractIncomingMessage, list[ScoreRow]]
_Taken = tuple[AbstractIncomingMessage, list[ScoreRow] | PoisonMessage]
_PURGE_INTERVAL_SECONDS = 600
_QUEUE_DEPTH_INTERVAL_SECONDS = 5
_YIELD_EVERY_SCORES = 250
_STORES_IN_FLIGHT = 2
_CLOSE_SECONDS = 2


class ScoreWorker:
    """One consumer of scores.persist with an explicit life cycle.

    `run()` connects, consumes and stores batches until `request_stop()`; then it cancels
    the consumer, stores and acks what it already holds, and closes. Messages are acked
    only after the transaction that stored them committed, so a crash at any point leaves
    them in the queue for redelivery, where the primary key turns them into no-ops.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        # None is the stop signal; the prefetch window and the byte budget bound how much
        # can queue up here.
        self._inbox: asyncio.Queue[Delivery | None] = asyncio.Queue()
        self._stopping = False
        # Declares the topology, publishes dead letters and polls queue depths; consuming
        # has a connection of its own (worker/consumer.py).
        self._connection: AbstractRobustConnection | None = None
        self._consumer = Consumer(settings, QUEUE, self._inbox.put_nowait)
        self._pool: asyncpg.Pool | None = None
        self._store: ScoreStore | None = None
        self._dead_letter_exchange: AbstractExchange | None = None
        self._dead_letter_channel: AbstractChannel | None = None
        self._health = HealthServer(
            settings.worker_health_host, settings.worker_health_port, self._is_ready
        )
        self._consuming: asyncio.Task[None] | None = None
        self.persisted = 0
        self.duplicates = 0

    @property
    def health_port(self) -> int:
        """Where /healthz, /readyz and /metrics are served."""
        return self._health.port

    def request_stop(self) -> None:
        """Stop consuming, finish the batch in hand, then return from run()."""
        if not self._stopping:
            self._stopping = True
            self._inbox.put_nowait(None)

    async def run(self) -> None:
        """Consume and store until stopped."""
        chores: list[asyncio.Task[None]] = []
        storing: deque[asyncio.Task[None]] = deque()
        try:
            await self._start()
            chores = [
                asyncio.create_task(self._purge_idempotency_keys_periodically()),
                asyncio.create_task(self._poll_queue_depths_periodically()),
            ]
            while not self._stopping:
                batch = await self._collect_batch()
                self._consumer.fit_window([message for message, _ in batch])
                # Up to _STORES_IN_FLIGHT batches are stored at once, in transactions of their
                # own, while the next is collected and decoded: PostgreSQL works on other
                # cores. Each batch is acked only after the one before, in delivery order.
                previous = storing[-1] if storing else None
                storing.append(asyncio.create_task(self._store_then_ack(batch, previous)))
                while storing and (storing[0].done() or len(storing) >= _STORES_IN_FLIGHT):
                    await storing.popleft()
            # Cancel first: acks of the batches still being stored free room in the prefetch
            # window, and the broker would fill it again for a consumer about to go.
            await self._stop_consuming()
            while storing:
                await storing.popleft()
            await self._store_then_ack(self._drain_inbox(), None)
        finally:
            for task in (*chores, *storing):
                task.cancel()
            await self._close()

    async def _is_ready(self) -> bool:
        """Ready: consuming (not reconnecting), able to publish dead letters (that connection
        is not reconnecting either), not stalled, and PostgreSQL answers.

        Stalled: holding delivered messages without having stored or dead-lettered any for
        WORKER_STALL_SECONDS, whatever the cause (PostgreSQL stuck, a batch it keeps
        refusing, the broker holding acks back).
        """
        connection = self._connection
        if connection is None or connection.is_closed or not connection.connected.is_set():
            return False
        if not self._consumer.connected:
            return False
        if self._consumer.stalled_for() > self._settings.worker_stall_seconds:
            return False
        if self._pool is None:
            return False
        try:
            await self._pool.fetchval("SELECT 1", timeout=2)
        except Exception:  # any failure to answer means not ready
            return False
        return True

    async def _poll_queue_depths_periodically(self) -> None:
        assert self._dead_letter_channel is not None
        while True:
            for name in (QUEUE, DEAD_LETTER_QUEUE):
                try:
                    # The robust channel would answer from its cache; ask the broker itself.
                    channel = await self._dead_letter_channel.get_underlay_channel()
                    declared = await channel.queue_declare(name, passive=True)
                except Exception as exc:  # a missed poll only leaves the gauge stale
                    log.debug("could not read the depth of %s: %s", name, exc)
                else:
                    QUEUE_DEPTH.labels(name).set(declared.message_count or 0)
            await asyncio.sleep(_QUEUE_DEPTH_INTERVAL_SECONDS)

    async def _purge_idempotency_keys_periodically(self) -> None:
        assert self._store is not None
        while True:
            try:
                purged = await self._store.purge_idempotency_keys(
                    self._settings.idempotency_key_ttl_seconds
                )
                buried = await self._store.purge_tombstones(self._settings.tombstone_ttl_seconds)
            except Exception as exc:  # the next round tries again; scores are unaffected
                log.warning("purging expired Idempotency-Keys or tombstones failed: %s", exc)
            else:
                if purged or buried:
                    log.info("purged %d expired Idempotency-Keys, %d tombstones", purged, buried)
            await asyncio.sleep(_PURGE_INTERVAL_SECONDS)

    async def _start(self) -> None:
        settings = self._settings
        # min_size=0: the worker starts, and keeps its messages, while PostgreSQL is down.
        # A connection per batch being stored, and one for readiness checks and chores.
        self._pool = await asyncpg.create_pool(
            settings.database_url, min_size=0, max_size=_STORES_IN_FLIGHT + 1
        )
        self._store = ScoreStore(self._pool)
        self._connection = await connect_until_ready(
            settings.amqp_url,
            "score-ingest-worker-publisher",
            settings.publish_timeout_seconds,
            tls_context(settings),
        )
        topology = await declare_topology(await self._connection.channel(), settings)
        self._dead_letter_channel = await self._connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        self._dead_letter_exchange = await self._dead_letter_channel.get_exchange(
            topology.dead_letter_exchange.name
        )
        await self._health.start()
        self._consuming = asyncio.create_task(self._consumer.run())
        await self._consumer.wait_connected()
        log.info("worker consuming %s", QUEUE, extra={"health_port": self._health.port})

    async def _collect_batch(self) -> list[_Taken]:
        """Wait for one message, then take more until the batch holds WORKER_BATCH_SIZE scores
        (or a quarter of the prefetch window in messages) or the flush interval ends. Messages
        are decoded as they are taken: a batch message counts for all its scores."""
        first = await self._inbox.get()
        if first is None:
            return []
        batch = [self._decode(first)]
        scores = _count(batch[0])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.worker_flush_interval_seconds
        # At most a quarter of the prefetch window in messages, so that the broker keeps
        # sending while a batch is stored (one message while isolating a culprit).
        most_messages = max(1, self._consumer.window // 4)
        next_yield = _YIELD_EVERY_SCORES
        while scores < self._settings.worker_batch_size and len(batch) < most_messages:
            if self._inbox.empty():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    message = await asyncio.wait_for(self._inbox.get(), remaining)
                except TimeoutError:
                    break
            else:
                message = self._inbox.get_nowait()
            if message is None:
                break
            batch.append(self._decode(message))
            scores += _count(batch[-1])
            if scores >= next_yield:
                # Decoding is CPU work that holds the event loop; let the batch being stored
                # take its next round trip to PostgreSQL in between.
                next_yield = scores + _YIELD_EVERY_SCORES
                await asyncio.sleep(0)
        return batch

    def _decode(self, message: Delivery) -> _Taken:
        if message.problem is not None:
            return message, PoisonMessage(DeadLetterReason.INVALID_PROPERTIES, message.problem)
        try:
            return message, decode_scores(message, self._settings.broker_max_message_bytes)
        except PoisonMessage as poison:
            return message, poison
        except Exception as exc:  # a failure on one message must not stop the others
            log.exception("decoding a message failed", extra={"score_id": message.message_id})
            detail = f"the worker could not decode it: {type(exc).__name__}: {exc}"
            return message, PoisonMessage(DeadLetterReason.UNPROCESSABLE, detail)

    def _drain_inbox(self) -> list[_Taken]:
        drained: list[_Taken] = []
        while not self._inbox.empty():
            message = self._inbox.get_nowait()
            if message is not None:
                drained.append(self._decode(message))
        return drained

    async def _store_then_ack(
        self, batch: list[_Taken], previous: asyncio.Task[None] | None
    ) -> None:
        """Dead-letter the batch's poison, store the rest, and once the batch before is
        acked, ack what was stored with one frame."""
        stored: list[AbstractIncomingMessage] = []
        decoded: list[_Decoded] = []
        for message, scores in batch:
            if isinstance(scores, PoisonMessage):
                await self._dead_letter(message, scores)
            else:
                decoded.append((message, scores))
        if decoded:
            stored = await self._persist(decoded)
        if previous is not None:
            await previous
        await self._consumer.ack_through(stored)

    async def _persist(self, decoded: list[_Decoded]) -> list[AbstractIncomingMessage]:
        """Store the scores in one transaction; returns the messages stored, to be acked.

        Messages whose rows PostgreSQL itself refuses are dead-lettered (and acked) instead.
        """
        assert self._store is not None
        delay = 0.1
        while True:
            started = time.perf_counter()
            try:
                inserted = await self._store.persist_batch(
                    [score for _, scores in decoded for score in scores]
                )
            except StorageRejected as exc:
                if len(decoded) == 1:
                    rejected = PoisonMessage(DeadLetterReason.STORAGE_REJECTED, str(exc))
                    await self._dead_letter(decoded[0][0], rejected)
                    return []
                # Find the rows PostgreSQL refuses without holding back the others.
                return [message for item in decoded for message in await self._persist([item])]
            except Exception as exc:  # any other failure is the database's, not the data's
                log.warning(
                    "storing %d scores failed (%s); retrying in %.1fs", len(decoded), exc, delay
                )
                DATABASE_RETRIES.inc()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._settings.worker_retry_max_seconds)
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
        lags = [(now - scores[0].created_at).total_seconds() for _, scores in decoded]
        for lag in lags:
            PERSIST_LAG_SECONDS.observe(lag)
        CONSUMER_LAG_SECONDS.set(max(lags))

    async def _dead_letter(self, message: AbstractIncomingMessage, poison: PoisonMessage) -> None:
        """Publish a copy with the reason to scores.dlx, then ack; reject if that fails.

        Never raises: whatever goes wrong, the message ends in scores.dead, with our reason
        or (rejected to the queue's dead-letter exchange) with RabbitMQ's `rejected`.
        """
        assert self._dead_letter_exchange is not None
        log.warning(
            "dead-lettering a message: %s",
            poison,
            extra={"score_id": message.message_id, "reason": poison.reason.value},
        )
        DEAD_LETTERED.labels(poison.reason.value).inc()
        try:
            # Whatever the publisher's headers hold, the copy's can be encoded.
            headers = field_tables.encodable(message.headers)
            headers.update(
                {
                    REASON_HEADER: poison.reason.value,
                    DETAIL_HEADER: poison.detail,
                    TIME_HEADER: datetime.now(UTC).isoformat(),
                    QUEUE_HEADER: QUEUE,
                }
            )
            await self._dead_letter_exchange.publish(
                copy_with_headers(message, headers),
                message.routing_key or ROUTING_KEY,
                mandatory=True,
                timeout=self._settings.publish_timeout_seconds,
            )
        except Exception as exc:  # any failure: the broker's own dead-lettering takes it
            log.warning("could not publish a dead letter (%r); rejecting the message instead", exc)
            DEAD_LETTER_FALLBACKS.inc()
            await self._consumer.reject(message)
            return
        await self._consumer.ack(message)

    async def _stop_consuming(self) -> None:
        await self._consumer.stop(_CLOSE_SECONDS)
        # Deliveries that arrived before the cancel-ok reach the inbox in tasks of their
        # own; let them land before the inbox is drained, or they stay unacked.
        for _ in range(3):
            await asyncio.sleep(0)

    async def _close(self) -> None:
        await self._health.close()
        # Each step is bounded: with the broker gone, the robust connection would wait for it
        # and the worker would never exit.
        await self._consumer.close(_CLOSE_SECONDS)
        if self._consuming is not None:
            self._consuming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._consuming
        if self._connection is not None:
            with contextlib.suppress(TimeoutError, *CONNECTION_EXCEPTIONS):
                await asyncio.wait_for(self._connection.close(), _CLOSE_SECONDS)
        if self._pool is not None:
            await self._pool.close()
        log.info("worker stopped: %d persisted, %d duplicates", self.persisted, self.duplicates)


def _count(taken: _Taken) -> int:
    scores = taken[1]
    return 1 if isinstance(scores, PoisonMessage) else len(scores)


async def run_worker(settings: Settings) -> None:
    """Run a worker until SIGTERM or SIGINT, then shut down within the grace period."""
    worker = ScoreWorker(settings)
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None

    def on_signal() -> None:
        log.info("stop requested; finishing the batch in hand")
        worker.request_stop()
        # Past the grace period (say, PostgreSQL still down), leave unacked messages to the broker.
        loop.call_later(settings.worker_shutdown_grace_seconds, task.cancel)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    try:
        await worker.run()
    except asyncio.CancelledError:
        log.warning("shutdown grace period over; unacked messages return to the queue")
