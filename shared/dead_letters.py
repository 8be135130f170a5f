"""Why a message was dead-lettered: the headers the worker writes and operators read."""

from enum import StrEnum
from typing import Final

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
