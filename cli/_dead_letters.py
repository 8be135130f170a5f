"""Reading, exporting, replaying and purging the dead letters in `scores.dead`.

Dead letters are browsed with basic.get and held unacknowledged until the pass is over, so
a pass sees each message once and whatever it does not act on returns to the queue, in
order, when its channel closes. A message is acked (removed) only after what was asked
for it is done: replayed copies confirmed by the broker, exported lines flushed to disk.
A crash at any point therefore loses nothing; at worst a replayed message is replayed
again, which the worker's idempotent insert turns into a no-op.

Every dead letter must be readable, whatever its publisher sent: the letters most in need
of an operator are the ones nothing else could handle. Header tables and properties are
decoded by `shared.field_tables` (deep tables bounded, bytes that are not UTF-8 kept as
backslash escapes), the body is searched for its entity and project without ever raising
(deeply nested, not UTF-8, binary or huge), and whatever is printed is escaped: a message
id or header cannot drive the terminal or break the JSON written for it.
"""

import base64
import hashlib
import json
import math
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Final, Protocol

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)
from aio_pika.exceptions import CONNECTION_EXCEPTIONS

from shared import field_tables
from shared.broker import BrokerNodes, connect_to_a_node, tls_context
from shared.dead_letters import DETAIL_HEADER, QUEUE_HEADER, REASON_HEADER, TIME_HEADER
from shared.settings import Settings
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
# Bodies larger than this are not parsed for their entity and project (shown `?/?`): JSON of
# many small values takes several times its size in memory. Twice the api's largest batch.
MAX_PARSED_BODY_BYTES: Final = 32 * 1024 * 1024
_MAX_SHORT_STRING_BYTES: Final = 255
# Headers arrive bounded at field_tables.MAX_DEPTH; this bounds the conversion on its own.
_MAX_JSON_DEPTH: Final = 2 * field_tables.MAX_DEPTH


def printable(text: str) -> str:
    """text with every character that is not printable (controls, format characters,
    line separators, surrogates) as a backslash escape, so it shows as what it is."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escape(char) for char in text)


def _escape(char: str) -> str:
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _json_safe(value: Any, depth: int = 0) -> Any:
    """A header value as JSON: what JSON has no form for becomes a string describing it."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, bytes | bytearray):
        return field_tables.describe(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if depth >= _MAX_JSON_DEPTH and isinstance(value, Mapping | list | tuple):
        return f"<nested deeper than {_MAX_JSON_DEPTH} levels, not shown>"
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v, depth + 1) for v in value]
    return repr(value)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        return field_tables.describe(value)
    return value if isinstance(value, str) else str(_json_safe(value))


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
        if self.dead_lettered_at is None:
            return None
        try:
            return now - self.dead_lettered_at
        except OverflowError:  # a time at the edge of datetime's range, in another zone
            return None

    def to_json(self, *, escaped_body: bool = False) -> dict[str, Any]:
        """The export form: everything needed to inspect or re-publish it.

        The body is `body` (text) when it is UTF-8, else `body_base64`; with escaped_body,
        such a body is also given as `body_escaped`, UTF-8 where it is and the other bytes
        as backslash escapes, for a person to read.
        """
        try:
            body: dict[str, str] = {"body": self.body.decode()}
        except UnicodeDecodeError:
            body = {"body_base64": base64.b64encode(self.body).decode()}
            if escaped_body:
                body["body_escaped"] = self.body.decode(errors="backslashreplace")
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


class Delivered(Protocol):
    """What describe reads of a delivered message."""

    @property
    def body(self) -> bytes: ...
    @property
    def headers(self) -> Mapping[str, Any] | None: ...
    @property
    def message_id(self) -> str | None: ...
    @property
    def content_type(self) -> str | None: ...
    @property
    def type(self) -> str | None: ...


def describe(message: Delivered) -> DeadLetter:
    """What a dead-lettered message says about itself, from our headers or the broker's x-death.

    Never raises, whatever the message holds.
    """
    headers = dict(message.headers or {})
    deaths = headers.get("x-death")
    last_death: Mapping[str, Any] = {}
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping):
        last_death = deaths[0]
    reason = _text(headers.get(REASON_HEADER)) or _text(last_death.get("reason")) or "unknown"
    dead_at = _parse_time(headers.get(TIME_HEADER)) or _parse_time(last_death.get("time"))
    source = _text(headers.get(QUEUE_HEADER)) or _text(last_death.get("queue"))
    entity, project = _entity_and_project(message.body)
    return DeadLetter(
        id=printable(message.message_id)
        if message.message_id
        else hashlib.sha256(message.body).hexdigest()[:16],
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


def _entity_and_project(body: bytes) -> tuple[str | None, str | None]:
    """The entity and project a score body names, if it is JSON of one; never raises."""
    # Only an object can name them: anything else (deeply nested arrays included) is not
    # worth parsing, and neither is a body too large to parse at a reasonable cost.
    if len(body) > MAX_PARSED_BODY_BYTES or body.lstrip()[:1] != b"{":
        return None, None
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):  # not UTF-8 is a ValueError too
        return None, None
    if not isinstance(parsed, dict):
        return None, None
    # A score.batch.v1 body names its entity and project once per score: a batch has one
    # when all its scores share it (as the API's batches always do).
    scores = parsed.get("scores")
    items = scores if isinstance(scores, list) and "entity" not in parsed else [parsed]
    return _shared(items, "entity"), _shared(items, "project")


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
        """Whether letter passes every given condition (an unknown age passes no age test).

        Reason, entity and project match as they are or as printed (escaped).
        """
        age = letter.age(now)
        return (
            (self.id is None or letter.id == self.id)
            and _same(letter.reason, self.reason)
            and _same(letter.entity, self.entity)
            and _same(letter.project, self.project)
            and (self.older_than is None or (age is not None and age >= self.older_than))
            and (self.newer_than is None or (age is not None and age <= self.newer_than))
        )


def _same(value: str | None, wanted: str | None) -> bool:
    if wanted is None:
        return True
    return value is not None and wanted in (value, printable(value))


class DeadLetterQueue:
    """A pass over scores.dead on one channel; leaving the context returns what was not acked."""

    def __init__(self, channel: AbstractChannel, queue: AbstractQueue, total: int) -> None:
        self._channel = channel
        self._queue = queue
        self.total = total

    async def browse(
        self, selection: Filter, limit: int | None, progress: Callable[[], None] = lambda: None
    ) -> AsyncIterator[tuple[AbstractIncomingMessage, DeadLetter]]:
        """The matching dead letters, at most limit, each seen once; the caller may ack them.

        The whole queue is taken even once limit is reached: the broker puts what a pass
        returns behind what it left, so stopping early would reorder scores.dead. Each
        letter is still delivered once per pass.
        """
        now = datetime.now(UTC)
        found = 0
        for _ in range(self.total):
            message = await self._queue.get(no_ack=False, fail=False)
            if message is None:
                return
            progress()
            if limit is not None and found >= limit:
                continue
            letter = describe(message)
            if selection.matches(letter, now):
                found += 1
                yield message, letter

    async def replay(self, message: AbstractIncomingMessage, letter: DeadLetter) -> None:
        """Re-publish a copy to `scores` with confirms, then remove the dead letter.

        The copy's headers and properties are made encodable: what came in decoded with
        escapes or descriptions (see shared.field_tables) goes out as those strings.
        """
        headers = {
            key: value
            for key, value in letter.headers.items()
            if key not in _DEAD_LETTER_HEADERS and key not in _BROKER_HEADERS
        }
        replays = letter.headers.get(REPLAY_COUNT_HEADER)
        headers[REPLAY_COUNT_HEADER] = (replays if isinstance(replays, int) else 0) + 1
        copy = aio_pika.Message(
            body=message.body,
            headers=field_tables.encodable(headers),
            content_type=_short_string(message.content_type),
            type=_short_string(message.type),
            message_id=_short_string(message.message_id),
            timestamp=message.timestamp,
            app_id=_short_string(message.app_id),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        exchange = await self._channel.get_exchange(EXCHANGE, ensure=False)
        await exchange.publish(copy, ROUTING_KEY, mandatory=True, timeout=30)
        await message.ack()


def _short_string(value: str | None) -> str | None:
    """A property as an AMQP short string can hold it: escapes may have made it too long."""
    if value is None or len(value.encode()) <= _MAX_SHORT_STRING_BYTES:
        return value
    return value.encode()[: _MAX_SHORT_STRING_BYTES - 3].decode(errors="ignore") + "..."


@asynccontextmanager
async def open_dead_letters(settings: Settings) -> AsyncIterator[DeadLetterQueue]:
    """A pass over scores.dead; unacked messages go back to the queue on exit."""
    field_tables.install()
    tls = tls_context(settings)

    async def connect(url: str) -> AbstractConnection:
        return await aio_pika.connect(url, timeout=10, ssl_context=tls)

    connection = await connect_to_a_node(
        connect, CONNECTION_EXCEPTIONS, BrokerNodes(settings.amqp_url)
    )
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        queue = await channel.declare_queue(DEAD_LETTER_QUEUE, passive=True)
        total = queue.declaration_result.message_count or 0
        yield DeadLetterQueue(channel, queue, total)
