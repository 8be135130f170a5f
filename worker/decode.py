"""Turning a delivered message into a ScoreMessage, or saying why it never can be."""

from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from shared.contract import (
    BATCH_MESSAGE_TYPE,
    CONTENT_TYPE,
    MESSAGE_TYPE,
    ScoreBatchMessage,
    ScoreMessage,
)
from shared.dead_letters import MAX_DETAIL_CHARS, DeadLetterReason


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


def decode_scores(message: AbstractIncomingMessage) -> list[ScoreMessage]:
    """The scores a message carries (one, or a batch's); raises PoisonMessage otherwise.

    A batch is all or nothing: one invalid score makes the whole message poison.
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
    try:
        if message.type == BATCH_MESSAGE_TYPE:
            return ScoreBatchMessage.model_validate_json(message.body).scores
        return [ScoreMessage.model_validate_json(message.body)]
    except ValidationError as exc:
        invalid_json = any(error["type"] == "json_invalid" for error in exc.errors())
        reason = (
            DeadLetterReason.INVALID_JSON if invalid_json else DeadLetterReason.SCHEMA_VIOLATION
        )
        raise PoisonMessage(reason, _describe(exc)) from None
