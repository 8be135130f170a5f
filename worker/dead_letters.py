"""Dead letters: a message that can never be stored goes to scores.dlx with its reason."""

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from aio_pika.abc import AbstractExchange
from pydantic import TypeAdapter, ValidationError
from pydantic_core import from_json

from shared import field_tables
from shared.contract import BATCH_MESSAGE_TYPE, MAX_BATCH_SCORES, EntityName, ProjectName
from shared.dead_letters import (
    DETAIL_HEADER,
    QUEUE_HEADER,
    REASON_HEADER,
    TIME_HEADER,
    copy_with_headers,
)
from shared.topology import ROUTING_KEY
from worker._metrics import DEAD_LETTER_FALLBACKS, DEAD_LETTERED
from worker.consumer import Consumers, Delivery
from worker.decode import PoisonMessage
from worker.store import FailedScore, ScoreStore

log = logging.getLogger(__name__)

# A body larger than this is not read for the scores it names (the api's largest message by
# default); it is dead-lettered all the same, without a record of its scores.
_MOST_BYTES_READ = 16 * 1024 * 1024
_RECORD_ATTEMPTS = 3
_RECORD_RETRY_SECONDS = 0.5
_ENTITY: TypeAdapter[str] = TypeAdapter(EntityName)
_PROJECT: TypeAdapter[str] = TypeAdapter(ProjectName)


def _uuid_text(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    try:
        return str(UUID(value))
    except ValueError:
        return None


def _failed_score(item: Any, fallback_id: str | None) -> FailedScore | None:
    """The id, entity and project an item names, if it names all three validly."""
    if not isinstance(item, dict):
        return None
    score_id = _uuid_text(item.get("score_id")) or fallback_id
    try:
        entity = _ENTITY.validate_python(item.get("entity"))
        project = _PROJECT.validate_python(item.get("project"))
    except ValidationError:
        return None
    return None if score_id is None else FailedScore(score_id, entity, project)


def failed_scores(message: Delivery) -> list[FailedScore]:
    """The scores a refused message names: each score's id (a single score's message_id
    if its body has none) with its entity and project, where its body gives them validly.

    A key may learn of a refusal only within its own entity and project, so a score whose
    message does not name them (not JSON, not an object, names invalid) is not recorded.
    """
    if len(message.body) > _MOST_BYTES_READ:
        return []
    try:
        parsed: Any = from_json(message.body)
    except ValueError:
        return []
    if message.type == BATCH_MESSAGE_TYPE:
        items = parsed.get("scores") if isinstance(parsed, dict) else None
        if not isinstance(items, list):
            return []
        found = [_failed_score(item, None) for item in items[:MAX_BATCH_SCORES]]
    else:
        found = [_failed_score(parsed, _uuid_text(message.message_id))]
    return [score for score in found if score is not None]


class DeadLetters:
    """Publishes copies of poison messages, with their reason, to the dead-letter exchange
    (on a confirming channel of the worker's publishing connection), and settles the
    originals through the consumer."""

    def __init__(
        self,
        exchange: AbstractExchange,
        consumer: Consumers,
        publish_timeout_seconds: float,
        store: ScoreStore,
    ) -> None:
        self._exchange = exchange
        self._consumer = consumer
        self._timeout = publish_timeout_seconds
        self._store = store

    async def send(self, message: Delivery, poison: PoisonMessage) -> None:
        """Record why the message's scores were refused, publish a copy with the reason to
        scores.dlx, then ack; reject if publishing fails.

        Never raises: whatever goes wrong, the message ends in scores.dead, with our reason
        or (rejected to the queue's dead-letter exchange) with RabbitMQ's `rejected`.
        """
        log.warning(
            "dead-lettering a message: %s",
            poison,
            extra={"score_id": message.message_id, "reason": poison.reason.value},
        )
        DEAD_LETTERED.labels(poison.reason.value).inc()
        await self._record(message, poison)
        try:
            # Whatever the publisher's headers hold, the copy's can be encoded.
            headers = field_tables.encodable(message.headers)
            headers.update(
                {
                    REASON_HEADER: poison.reason.value,
                    DETAIL_HEADER: poison.detail,
                    TIME_HEADER: datetime.now(UTC).isoformat(),
                    QUEUE_HEADER: message.queue,
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

    async def _record(self, message: Delivery, poison: PoisonMessage) -> None:
        """Record the refusal for GET .../status, retrying a little: a database outage must
        not hold dead letters back for long, so past the attempts it is only logged."""
        try:
            failed = failed_scores(message)
        except Exception:  # whatever the body holds, dead-lettering goes on
            log.exception("could not read the scores of a refused message")
            return
        if not failed:
            return
        # PostgreSQL's text takes neither NUL nor lone surrogates, which a detail may quote.
        detail = poison.detail.encode(errors="backslashreplace").decode().replace("\x00", "\\x00")
        for attempt in range(1, _RECORD_ATTEMPTS + 1):
            try:
                await self._store.record_failures(failed, poison.reason.value, detail)
            except Exception as exc:  # the database's failure, never the message's
                log.warning(
                    "recording why %d scores were refused failed (attempt %d of %d): %s",
                    len(failed),
                    attempt,
                    _RECORD_ATTEMPTS,
                    exc,
                )
                if attempt < _RECORD_ATTEMPTS:
                    await asyncio.sleep(_RECORD_RETRY_SECONDS * attempt)
            else:
                return
