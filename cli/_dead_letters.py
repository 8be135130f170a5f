"""Reading, exporting, replaying and purging the dead letters in `scores.dead`.

Dead letters are browsed with basic.get and held unacknowledged until the pass is over, so
a pass sees each message once and whatever it does not act on returns to the queue, in
order, when its channel closes. A message is acked (removed) only after what was asked
for it is done: replayed copies confirmed by the broker, exported lines flushed to disk.
A crash at any point therefore loses nothing; at worst a replayed message is replayed
again, which the worker's idempotent insert turns into a no-op.
"""

import base64
import hashlib
import json
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from shared.dead_letters import (
    DETAIL_HEADER,
    QUEUE_HEADER,
    REASON_HEADER,
    TIME_HEADER,
    copy_with_headers,
)
from shared.topology import DEAD_LETTER_QUEUE, EXCHANGE, ROUTING_KEY

REPLAY_COUNT_HEADER = "x-replay-count"
_DEAD_LETTER_HEADERS = (REASON_HEADER, DETAIL_HEADER, TIME_HEADER, QUEUE_HEADER)
_BROKER_HEADERS = (
    "x-death",
    "x-first-death-reason",
    "x-first-death-queue",
    "x-first-death-exchange",
    "x-last-death-reason",
    "x-last-death-queue",
    "x-last-death-exchange",
    "x-delivery-count",
)


def _json_safe(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _parse_time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    text = _text(value)
    if text is None:
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@dataclass(frozen=True)
class DeadLetter:
    """One message in scores.dead and what is known about why it is there."""

    id: str
    reason: str
    detail: str
    dead_lettered_at: datetime | None
    source_queue: str | None
    entity: str | None
    project: str | None
    body: bytes
    content_type: str | None
    message_type: str | None
    message_id: str | None
    headers: dict[str, Any]

    @property
    def size(self) -> int:
        """Body size in bytes."""
        return len(self.body)

    def age(self, now: datetime) -> timedelta | None:
        """How long ago it was dead-lettered, when known."""
        return None if self.dead_lettered_at is None else now - self.dead_lettered_at

    def to_json(self) -> dict[str, Any]:
        """The export form: everything needed to inspect or re-publish it."""
        try:
            body: dict[str, str] = {"body": self.body.decode()}
        except UnicodeDecodeError:
            body = {"body_base64": base64.b64encode(self.body).decode()}
        return {
            "id": self.id,
            "reason": self.reason,
            "detail": self.detail,
            "dead_lettered_at": self.dead_lettered_at.isoformat()
            if self.dead_lettered_at
            else None,
            "source_queue": self.source_queue,
            "entity": self.entity,
            "project": self.project,
            "size": self.size,
            "content_type": self.content_type,
            "type": self.message_type,
            "message_id": self.message_id,
            "headers": _json_safe(self.headers),
            **body,
        }


def describe(message: AbstractIncomingMessage) -> DeadLetter:
    """What a dead-lettered message says about itself, from our headers or the broker's x-death."""
    headers = dict(message.headers or {})
    deaths = headers.get("x-death")
    last_death: Mapping[str, Any] = {}
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping):
        last_death = deaths[0]
    reason = _text(headers.get(REASON_HEADER)) or _text(last_death.get("reason")) or "unknown"
    dead_at = _parse_time(headers.get(TIME_HEADER)) or _parse_time(last_death.get("time"))
    source = _text(headers.get(QUEUE_HEADER)) or _text(last_death.get("queue"))
    entity = project = None
    try:
        parsed = json.loads(message.body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        # A score.batch.v1 body names its entity and project once per score: a batch has
        # one when all its scores share it (as the API's batches always do).
        scores = parsed.get("scores")
        items = scores if isinstance(scores, list) and "entity" not in parsed else [parsed]
        entity, project = _shared(items, "entity"), _shared(items, "project")
    return DeadLetter(
        id=message.message_id or hashlib.sha256(message.body).hexdigest()[:16],
        reason=reason,
        detail=_text(headers.get(DETAIL_HEADER)) or "",
        dead_lettered_at=dead_at,
        source_queue=source,
        entity=entity,
        project=project,
        body=message.body,
        content_type=message.content_type,
        message_type=message.type,
        message_id=message.message_id,
        headers=headers,
    )


def _shared(items: list[Any], key: str) -> str | None:
    values = [item.get(key) if isinstance(item, dict) else None for item in items]
    strings = [value for value in values if isinstance(value, str)]
    if len(strings) != len(values) or len(set(strings)) != 1:
        return None
    return strings[0]


@dataclass(frozen=True)
class Filter:
    """Which dead letters an operation applies to; None matches anything."""

    reason: str | None = None
    entity: str | None = None
    project: str | None = None
    older_than: timedelta | None = None
    newer_than: timedelta | None = None
    id: str | None = None

    def matches(self, letter: DeadLetter, now: datetime) -> bool:
        """Whether letter passes every given condition (an unknown age passes no age test)."""
        age = letter.age(now)
        return (
            (self.id is None or letter.id == self.id)
            and (self.reason is None or letter.reason == self.reason)
            and (self.entity is None or letter.entity == self.entity)
            and (self.project is None or letter.project == self.project)
            and (self.older_than is None or (age is not None and age >= self.older_than))
            and (self.newer_than is None or (age is not None and age <= self.newer_than))
        )


class DeadLetterQueue:
    """A pass over scores.dead on one channel; leaving the context returns what was not acked."""

    def __init__(self, channel: AbstractChannel, queue: AbstractQueue, total: int) -> None:
        self._channel = channel
        self._queue = queue
        self.total = total

    async def browse(
        self, selection: Filter, limit: int | None, progress: Callable[[], None] = lambda: None
    ) -> AsyncIterator[tuple[AbstractIncomingMessage, DeadLetter]]:
        """The matching dead letters, at most limit, each seen once; the caller may ack them."""
        now = datetime.now(UTC)
        found = 0
        for _ in range(self.total):
            if limit is not None and found >= limit:
                return
            message = await self._queue.get(no_ack=False, fail=False)
            if message is None:
                return
            progress()
            letter = describe(message)
            if selection.matches(letter, now):
                found += 1
                yield message, letter

    async def replay(self, message: AbstractIncomingMessage, letter: DeadLetter) -> None:
        """Re-publish a copy to `scores` with confirms, then remove the dead letter."""
        headers = {
            key: value
            for key, value in letter.headers.items()
            if key not in _DEAD_LETTER_HEADERS and key not in _BROKER_HEADERS
        }
        replays = letter.headers.get(REPLAY_COUNT_HEADER)
        headers[REPLAY_COUNT_HEADER] = (replays if isinstance(replays, int) else 0) + 1
        exchange = await self._channel.get_exchange(EXCHANGE, ensure=False)
        await exchange.publish(
            copy_with_headers(message, headers), ROUTING_KEY, mandatory=True, timeout=30
        )
        await message.ack()


@asynccontextmanager
async def open_dead_letters(amqp_url: str) -> AsyncIterator[DeadLetterQueue]:
    """A pass over scores.dead; unacked messages go back to the queue on exit."""
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        queue = await channel.declare_queue(DEAD_LETTER_QUEUE, passive=True)
        total = queue.declaration_result.message_count or 0
        yield DeadLetterQueue(channel, queue, total)
