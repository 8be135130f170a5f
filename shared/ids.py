"""Score ids: UUIDv7, so that the primary key orders scores by creation time."""

from uuid import UUID

from uuid_utils.compat import uuid7


def new_score_id() -> UUID:
    """A fresh, time-ordered score id."""
    return uuid7()
