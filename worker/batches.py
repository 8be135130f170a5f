"""Taking batches from the worker's inbox: the deliveries the consumer handed over, decoded
as they are taken, a batch message counting for all of its scores."""

import asyncio
import logging
from collections.abc import Callable

from shared.dead_letters import DeadLetterReason
from shared.settings import Settings
from worker.consumer import Delivery
from worker.decode import PoisonMessage, ScoreRow, decode_scores

log = logging.getLogger(__name__)

Taken = tuple[Delivery, list[ScoreRow] | PoisonMessage]
"""A message taken into a batch: its rows, or why it can never be stored."""

_YIELD_EVERY_SCORES = 250


class Inbox:
    """Deliveries waiting to be stored, in delivery order, taken out in batches.

    What waits here is bounded by the consumer (its prefetch window and its byte budget), not
    by the inbox. `window` says the consumer's prefetch count at the time a batch is taken.
    """

    def __init__(self, settings: Settings, window: Callable[[], int]) -> None:
        self._settings = settings
        self._window = window
        # None closes the inbox: the batch being collected ends there.
        self._queue: asyncio.Queue[Delivery | None] = asyncio.Queue()

    def put(self, delivery: Delivery) -> None:
        """Hand over a delivery (the consumer's callback)."""
        self._queue.put_nowait(delivery)

    def close(self) -> None:
        """End the batch being collected, or the next one, there (then `collect` returns [])."""
        self._queue.put_nowait(None)

    async def collect(self) -> list[Taken]:
        """Wait for one message, then take more until the batch holds WORKER_BATCH_SIZE scores
        (or a quarter of the prefetch window in messages) or the flush interval ends; [] once
        closed."""
        first = await self._queue.get()
        if first is None:
            return []
        batch = [self._decode(first)]
        scores = _count(batch[0])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.worker_flush_interval_seconds
        # At most a quarter of the prefetch window in messages, so that the broker keeps
        # sending while a batch is stored (one message while isolating a culprit).
        most_messages = max(1, self._window() // 4)
        next_yield = _YIELD_EVERY_SCORES
        while scores < self._settings.worker_batch_size and len(batch) < most_messages:
            if self._queue.empty():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    message = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            else:
                message = self._queue.get_nowait()
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

    def drain(self) -> list[Taken]:
        """Everything still waiting, decoded, as one batch (on the way out)."""
        drained: list[Taken] = []
        while not self._queue.empty():
            message = self._queue.get_nowait()
            if message is not None:
                drained.append(self._decode(message))
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
