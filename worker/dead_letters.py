"""Dead letters: a message that can never be stored goes to scores.dlx with its reason."""

import logging
from datetime import UTC, datetime

from aio_pika.abc import AbstractExchange

from shared import field_tables
from shared.dead_letters import (
    DETAIL_HEADER,
    QUEUE_HEADER,
    REASON_HEADER,
    TIME_HEADER,
    copy_with_headers,
)
from shared.topology import QUEUE, ROUTING_KEY
from worker._metrics import DEAD_LETTER_FALLBACKS, DEAD_LETTERED
from worker.consumer import Consumer, Delivery
from worker.decode import PoisonMessage

log = logging.getLogger(__name__)


class DeadLetters:
    """Publishes copies of poison messages, with their reason, to the dead-letter exchange
    (on a confirming channel of the worker's publishing connection), and settles the
    originals through the consumer."""

    def __init__(
        self, exchange: AbstractExchange, consumer: Consumer, publish_timeout_seconds: float
    ) -> None:
        self._exchange = exchange
        self._consumer = consumer
        self._timeout = publish_timeout_seconds

    async def send(self, message: Delivery, poison: PoisonMessage) -> None:
        """Publish a copy with the reason to scores.dlx, then ack; reject if that fails.

        Never raises: whatever goes wrong, the message ends in scores.dead, with our reason
        or (rejected to the queue's dead-letter exchange) with RabbitMQ's `rejected`.
        """
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
            await self._exchange.publish(
                copy_with_headers(message, headers),
                message.routing_key or ROUTING_KEY,
                mandatory=True,
                timeout=self._timeout,
            )
        except Exception as exc:  # any failure: the broker's own dead-lettering takes it
            log.warning("could not publish a dead letter (%r); rejecting the message instead", exc)
            DEAD_LETTER_FALLBACKS.inc()
            await self._consumer.reject(message)
            return
        await self._consumer.ack(message)
