"""Turning a delivered message into rows to store, or saying why it never can be."""

from collections.abc import Callable
from datetime import datetime
from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError
from pydantic_core import from_json, to_json

from shared.contract import (
    BATCH_MESSAGE_TYPE,
    CONTENT_TYPE,
    MAX_SCORE_MESSAGE_BYTES,
    MESSAGE_TYPE,
    ScoreBatchMessage,
    ScoreMessage,
)
from shared.dead_letters import MAX_DETAIL_CHARS, DeadLetterReason
from shared.score_fields import FIELD_NAMES, SCORE_FIELDS, Kind, ScoreField
from shared.topology import API_EXCHANGE
from worker._metrics import MESSAGES_DECODED

_BY_API_EXCHANGE = MESSAGES_DECODED.labels("api_exchange")
_BY_VALIDATION = MESSAGES_DECODED.labels("validation")

# A score as the worker stores it: the values of its fields in the order of SCORE_FIELDS,
# each as its column takes it (a JSON value as its text).
ScoreRow = tuple[Any, ...]

_CREATED_AT = FIELD_NAMES.index("created_at")


def created_at_of(row: ScoreRow) -> datetime:
    """When the row's score was created (by the api, or by a direct publisher)."""
    created_at: datetime = row[_CREATED_AT]
    return created_at


def _json_text(value: Any) -> str:
    return to_json(value).decode()


def _as_is(value: Any) -> Any:
    return value


# How a validated score's fields become its row's values: as they are, a JSON value as its text.
_VALIDATED_FIELDS = tuple(
    (field.name, _json_text if field.kind is Kind.JSON else _as_is) for field in SCORE_FIELDS
)


def row_of(score: ScoreMessage) -> ScoreRow:
    """The row of a validated score."""
    return tuple([stored(getattr(score, name)) for name, stored in _VALIDATED_FIELDS])


class PoisonMessage(Exception):
    """A message that can never be stored, whatever the retries; it goes to dead letters."""

    def __init__(self, reason: DeadLetterReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail[:MAX_DETAIL_CHARS]


def _describe(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or '<body>'}: {error['msg']}"
        for error in exc.errors(include_url=False, include_input=False)
    )


def decode_scores(message: AbstractIncomingMessage, max_batch_bytes: int) -> list[ScoreRow]:
    """The rows of the scores a message carries (one, or a batch's); raises PoisonMessage
    otherwise.

    A body larger than any valid message of its type (one score at its largest, or
    max_batch_bytes, BROKER_MAX_MESSAGE_BYTES, for a batch) is refused before it is parsed:
    parsing would cost the worker several times its size.

    A batch is all or nothing: one invalid score makes the whole message poison. A message
    that came through exchange `scores.api` was published by the api, which validated it, so
    it is only parsed here; every other message (a direct publisher's, a replayed dead
    letter) is validated in full. The exchange is the broker's word, not the publisher's:
    it is the one the message was published to, kept on redeliveries, and only the api's
    broker user may write to `scores.api` (README, "Trust model").
    """
    media_type = (message.content_type or "").partition(";")[0].strip().lower()
    if media_type != CONTENT_TYPE:
        raise PoisonMessage(
            DeadLetterReason.UNSUPPORTED_CONTENT_TYPE,
            f"content_type must be {CONTENT_TYPE!r}, not {message.content_type!r}",
        )
    if message.type and message.type not in (MESSAGE_TYPE, BATCH_MESSAGE_TYPE):
        raise PoisonMessage(
            DeadLetterReason.UNSUPPORTED_MESSAGE_TYPE,
            f"type must be {MESSAGE_TYPE!r}, {BATCH_MESSAGE_TYPE!r} or unset, not {message.type!r}",
        )
    batch = message.type == BATCH_MESSAGE_TYPE
    limit = max_batch_bytes if batch else MAX_SCORE_MESSAGE_BYTES
    if len(message.body) > limit:
        raise PoisonMessage(
            DeadLetterReason.SCHEMA_VIOLATION,
            f"the body takes {len(message.body)} bytes, more than a "
            f"{message.type or MESSAGE_TYPE} message may ({limit})",
        )
    if message.exchange == API_EXCHANGE:
        rows = _api_rows(message.body, batch)
        if rows is not None:
            _BY_API_EXCHANGE.inc()
            return rows
    _BY_VALIDATION.inc()
    try:
        if batch:
            scores = ScoreBatchMessage.model_validate_json(message.body).scores
        else:
            scores = [ScoreMessage.model_validate_json(message.body)]
    except ValidationError as exc:
        invalid_json = any(error["type"] == "json_invalid" for error in exc.errors())
        reason = (
            DeadLetterReason.INVALID_JSON if invalid_json else DeadLetterReason.SCHEMA_VIOLATION
        )
        raise PoisonMessage(reason, _describe(exc)) from None
    return [row_of(score) for score in scores]


def _text(value: Any) -> str:
    if type(value) is str:
        return value
    raise TypeError("not a string")


def _optional_text(value: Any) -> str | None:
    if value is None or type(value) is str:
        return value
    raise TypeError("neither a string nor null")


def _zoned_time(value: Any) -> datetime:
    parsed = datetime.fromisoformat(value)  # TypeError when it is not a string
    if parsed.tzinfo is None:
        raise ValueError("a time without a zone")
    return parsed


def _uuid_text(value: Any) -> str:
    # As pydantic serialises a UUID: 36 characters, lower case. PostgreSQL would take other
    # forms too, but the ids the worker announces (shared/stored_events.py) must be in this
    # one, the form the apis wait for; any other is validated in full.
    if type(value) is str and len(value) == 36 and value.islower():
        return value
    raise ValueError("not a UUID in the form the api publishes")


def _parser(field: ScoreField) -> Callable[[Any], Any]:
    """How a field of a parsed body becomes its row value, raising TypeError or ValueError
    when it has a type its column does not take."""
    if field.kind is Kind.JSON:
        return _json_text
    if field.kind is Kind.TIME:
        return _zoned_time
    if field.kind is Kind.UUID and not field.optional:
        # The text the api published: asyncpg encodes it from that.
        return _uuid_text
    return _optional_text if field.optional else _text


_PARSED_FIELDS = tuple((field.name, _parser(field)) for field in SCORE_FIELDS)


def _api_rows(body: bytes, batch: bool) -> list[ScoreRow] | None:
    """The rows of a body the api validated and published, as ScoreMessage would give them.

    The api publishes every field and no other, in the forms pydantic serialises them to;
    None if the body is not in that shape after all (then it is validated in full, which
    refuses a field the contract does not know). The shape is checked, cheaply, so that
    even a body published there by mistake can only reach PostgreSQL with the types its
    columns take.
    """
    rows = []
    try:
        parsed: Any = from_json(body)
        if batch and len(parsed) != 1:  # a field beside "scores"
            return None
        for item in parsed["scores"] if batch else (parsed,):
            if len(item) != len(_PARSED_FIELDS):  # every field is read below: any more is unknown
                return None
            rows.append(tuple([parse(item[name]) for name, parse in _PARSED_FIELDS]))
    except (KeyError, TypeError, ValueError):
        return None
    return rows or None
