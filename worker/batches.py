"""Taking batches from the worker's inbox: the deliveries the consumers handed over, decoded
as they are taken, a batch message counting for all of its scores, the queues in turn."""

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from shared.dead_letters import DeadLetterReason
from shared.settings import Settings
from worker.consumer import Delivery
from worker.decode import PoisonMessage, ScoreRow, decode_scores

log = logging.getLogger(__name__)

Taken = tuple[Delivery, list[ScoreRow] | PoisonMessage]
"""A message taken into a batch: its rows, or why it can never be stored."""

_YIELD_EVERY_SCORES = 250
# A queue's turn, in scores: this part of WORKER_BATCH_SIZE (see Inbox).
_TURNS_PER_BATCH = 4


class Inbox:
    """Deliveries waiting to be stored, in delivery order per queue, taken out in batches
    that take from each queue in turn.

    Taking in turn is what keeps one queue's backlog from holding back another's messages:
    a message of a quiet queue goes into the next batch, however many of a busy queue's
    wait before it. A turn is counted in scores, not messages: each queue gives messages
    until it has given a quarter of WORKER_BATCH_SIZE scores (at least one message), so a
    queue of single scores beside one of batch messages of 500 gets as many scores into a
    batch as the other, not one per 500. Each queue's messages are still taken in its
    delivery order, so a batch's acks (one per channel, for its highest delivery tag)
    settle only what was stored. What waits here is bounded by the consumers (their
    prefetch windows and byte budget), not by the inbox. `window` says a queue's prefetch
    count when a batch is taken.
    """

    def __init__(self, settings: Settings, window: Callable[[str], int]) -> None:
        self._settings = settings
        self._window = window
        self._waiting: dict[str, deque[Delivery]] = {}
        self._count = 0
        self._arrived = asyncio.Event()
        self._closed = False
        # The queue a batch starts with, in turn: each queue is first as often as the others.
        self._turn = 0

    def put(self, delivery: Delivery) -> None:
        """Hand over a delivery (the consumers' callback)."""
        self._waiting.setdefault(delivery.queue, deque()).append(delivery)
        self._count += 1
        self._arrived.set()

    def close(self) -> None:
        """End the batch being collected, or the next one, there (then `collect` returns [])."""
        self._closed = True
        self._arrived.set()

    async def collect(self) -> list[Taken]:
        """Wait for one message, then take more, a turn's scores from each queue in turn,
        until the batch holds WORKER_BATCH_SIZE scores (or from a queue a quarter of its
        prefetch window in messages) or the flush interval ends; [] once closed."""
        while not self._count and not self._closed:
            self._arrived.clear()
            await self._arrived.wait()
        if self._closed:
            return []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.worker_flush_interval_seconds
        batch: list[Taken] = []
        taken: dict[str, int] = {}
        # The queues that may give a message now, in turn: one message each, then around.
        turn: deque[str] = deque()
        self._join(turn, taken)
        turn.rotate(-self._turn)
        batch_size = self._settings.worker_batch_size
        turn_size = max(1, batch_size // _TURNS_PER_BATCH)
        scores = turn_scores = 0
        next_yield = _YIELD_EVERY_SCORES
        while scores < batch_size:
            if not turn:
                # Nothing more that may be taken now: wait for more within the interval,
                # unless every queue with messages waiting has given all it may.
                remaining = deadline - loop.time()
                if self._count or remaining <= 0 or self._closed:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except TimeoutError:
                    break
                self._join(turn, taken)
                continue
            queue = turn[0]
            waiting = self._waiting[queue]
            message = waiting.popleft()
            self._count -= 1
            taken[queue] += 1
            batch.append(self._decode(message))
            given = _count(batch[-1])
            scores += given
            turn_scores += given
            if not waiting or taken[queue] >= self._share(queue):
                turn.popleft()
                turn_scores = 0
            elif turn_scores >= turn_size:
                turn.rotate(-1)
                turn_scores = 0
            if scores >= next_yield:
                # Decoding is CPU work that holds the event loop; let the batch being stored
                # take its next round trip to PostgreSQL in between (and deliveries arrive:
                # a queue that had none joins the turn).
                next_yield = scores + _YIELD_EVERY_SCORES
                await asyncio.sleep(0)
                self._join(turn, taken)
        self._turn += 1
        return batch

    def _share(self, queue: str) -> int:
        """The most messages a batch takes from a queue: a quarter of its prefetch window,
        so that the broker keeps sending while a batch is stored (one message while
        isolating a culprit)."""
        return max(1, self._window(queue) // 4)

    def _join(self, turn: deque[str], taken: dict[str, int]) -> None:
        """Add to the turn each queue with messages waiting that is not in it and has not
        given its share to this batch."""
        for queue, waiting in self._waiting.items():
            if waiting and queue not in turn and taken.setdefault(queue, 0) < self._share(queue):
                turn.append(queue)

    def drain(self) -> list[Taken]:
        """Everything still waiting, decoded, as one batch (on the way out)."""
        drained: list[Taken] = []
        for waiting in self._waiting.values():
            while waiting:
                drained.append(self._decode(waiting.popleft()))
        self._count = 0
        return drained

    def _decode(self, message: Delivery) -> Taken:
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


def _count(taken: Taken) -> int:
    scores = taken[1]
    return 1 if isinstance(scores, PoisonMessage) else len(scores)
