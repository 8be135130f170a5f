"""The worker: consume scores.persist and its shards, store batches idempotently, ack after
commit.

Its parts, each in a module of its own: the consumers (consumer.py, one per queue) hand
deliveries to the inbox, which gives them out in decoded batches, the queues in turn
(batches.py); the pipeline stores each batch
and acks it in delivery order (pipeline.py), sending what can never be stored to dead
letters (dead_letters.py); chores run beside it (chores.py). This module starts them,
runs the loop that ties them together, and stops them.
"""

import asyncio
import contextlib
import logging
import signal

import asyncpg
from aio_pika.abc import AbstractRobustConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS

from shared.broker import connect_until_ready, tls_context
from shared.settings import Settings
from shared.topology import declare_topology, persist_queues
from shared.tracing import Tracing, start_tracing
from worker._health import HealthServer
from worker.batches import Inbox
from worker.chores import poll_queue_depths_periodically, purge_expired_periodically
from worker.consumer import Consumers
from worker.dead_letters import DeadLetters
from worker.pipeline import STORES_IN_FLIGHT, StorePipeline
from worker.store import ScoreStore

log = logging.getLogger(__name__)

_CLOSE_SECONDS = 2


class ScoreWorker:
    """One consumer of scores.persist and its shards with an explicit life cycle.

    `run()` connects, consumes and stores batches until `request_stop()`; then it cancels
    the consumer, stores and acks what it already holds, and closes. Messages are acked
    only after the transaction that stored them committed, so a crash at any point leaves
    them in the queue for redelivery, where the primary key turns them into no-ops.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._inbox = Inbox(settings, lambda queue: self._consumer.window(queue))
        self._consumer = Consumers(settings, persist_queues(settings), self._inbox.put)
        self._stopping = False
        # Declares the topology, publishes dead letters and polls queue depths; consuming
        # has a connection of its own (worker/consumer.py).
        self._connection: AbstractRobustConnection | None = None
        self._pool: asyncpg.Pool | None = None
        self._pipeline: StorePipeline | None = None
        self._tracing: Tracing | None = None
        self._health = HealthServer(
            settings.worker_health_host,
            settings.worker_health_port,
            self._is_ready,
            lambda: {"broker": self._consumer.broker},
        )
        self._consuming: asyncio.Task[None] | None = None
        self._chores: list[asyncio.Task[None]] = []

    @property
    def health_port(self) -> int:
        """Where /healthz, /readyz and /metrics are served."""
        return self._health.port

    @property
    def persisted(self) -> int:
        """Scores this worker stored."""
        return self._pipeline.persisted if self._pipeline else 0

    @property
    def duplicates(self) -> int:
        """Scores it received but did not store: already stored, or deleted."""
        return self._pipeline.duplicates if self._pipeline else 0

    def request_stop(self) -> None:
        """Stop consuming, finish the batch in hand, then return from run()."""
        if not self._stopping:
            self._stopping = True
            self._inbox.close()

    async def run(self) -> None:
        """Consume and store until stopped."""
        try:
            pipeline = await self._start()
            while not self._stopping:
                batch = await self._inbox.collect()
                self._consumer.fit_window([message for message, _ in batch])
                await pipeline.submit(batch)
            # Cancel first: acks of the batches still being stored free room in the prefetch
            # window, and the broker would fill it again for a consumer about to go.
            await self._stop_consuming()
            await pipeline.finish()
            await pipeline.submit(self._inbox.drain())
            await pipeline.finish()
        finally:
            for task in self._chores:
                task.cancel()
            if self._pipeline is not None:
                self._pipeline.cancel()
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

    async def _start(self) -> StorePipeline:
        """Connect to PostgreSQL and the broker, start the chores and consuming."""
        settings = self._settings
        # min_size=0: the worker starts, and keeps its messages, while PostgreSQL is down.
        # A connection per batch being stored, and one for readiness checks and chores.
        self._pool = await asyncpg.create_pool(
            settings.database_url, min_size=0, max_size=STORES_IN_FLIGHT + 1
        )
        store = ScoreStore(self._pool)
        self._connection = await connect_until_ready(
            settings.amqp_url,
            "score-ingest-worker-publisher",
            settings.publish_timeout_seconds,
            tls_context(settings),
        )
        topology = await declare_topology(await self._connection.channel(), settings)
        dead_letter_channel = await self._connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        dead_letters = DeadLetters(
            await dead_letter_channel.get_exchange(topology.dead_letter_exchange.name),
            self._consumer,
            settings.publish_timeout_seconds,
            store,
        )
        self._tracing = start_tracing(settings, "score-ingest-worker")
        self._pipeline = StorePipeline(
            store, self._consumer, dead_letters, settings.worker_retry_max_seconds, self._tracing
        )
        # A channel of its own: a poll the broker refuses closes only it.
        polling_channel = await self._connection.channel()
        await self._health.start()
        self._consuming = asyncio.create_task(self._consumer.run())
        await self._consumer.wait_connected()
        self._chores = [
            asyncio.create_task(purge_expired_periodically(store, settings)),
            asyncio.create_task(
                poll_queue_depths_periodically(polling_channel, self._consumer.queues)
            ),
        ]
        log.info(
            "worker consuming %s from broker node %s",
            ", ".join(self._consumer.queues),
            self._consumer.broker["node"],
            extra={"health_port": self._health.port},
        )
        return self._pipeline

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
        if self._tracing is not None:
            await asyncio.to_thread(self._tracing.close)  # exports the last spans
        log.info("worker stopped: %d persisted, %d duplicates", self.persisted, self.duplicates)


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
