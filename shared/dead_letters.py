"""Why a message was dead-lettered: the headers the worker writes and operators read."""

from enum import StrEnum
from typing import Final

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, HeadersType

REASON_HEADER: Final = "x-dead-letter-reason"
DETAIL_HEADER: Final = "x-dead-letter-detail"
TIME_HEADER: Final = "x-dead-lettered-at"
QUEUE_HEADER: Final = "x-dead-letter-queue"
MAX_DETAIL_CHARS: Final = 2000


class DeadLetterReason(StrEnum):
    """Value of the x-dead-letter-reason header."""

    INVALID_JSON = "invalid_json"
    SCHEMA_VIOLATION = "schema_violation"
    UNSUPPORTED_CONTENT_TYPE = "unsupported_content_type"
    UNSUPPORTED_MESSAGE_TYPE = "unsupported_message_type"
    STORAGE_REJECTED = "storage_rejected"
    # Properties the client library cannot turn into a message.
    INVALID_PROPERTIES = "invalid_properties"
    # Anything else that failed on this message alone: isolated rather than retried forever.
    UNPROCESSABLE = "unprocessable"


def copy_with_headers(message: AbstractIncomingMessage, headers: HeadersType) -> aio_pika.Message:
    """A persistent copy of a delivered message, properties kept, with the given headers."""
    return aio_pika.Message(
        body=message.body,
        headers=headers,
        content_type=message.content_type,
        type=message.type,
        message_id=message.message_id,
        timestamp=message.timestamp,
        app_id=message.app_id,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )
