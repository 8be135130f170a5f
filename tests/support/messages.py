"""Score messages in their AMQP form, as the README's contract asks of a direct publisher."""

import json
from collections.abc import Sequence
from typing import Any
from uuid import UUID

import aio_pika
import asyncpg

from shared.contract import CONTENT_TYPE, MESSAGE_TYPE, ScoreMessage
from shared.score_fields import SCORE_FIELDS, Kind


def to_amqp_message(message: ScoreMessage) -> aio_pika.Message:
    """A `score.create.v1` message for one score, with the properties the API sets."""
    return aio_pika.Message(
        body=message.model_dump_json().encode(),
        content_type=CONTENT_TYPE,
        type=MESSAGE_TYPE,
        message_id=str(message.score_id),
        timestamp=message.created_at,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        app_id="score-ingest",
    )


async def assert_stored_as_sent(
    db: asyncpg.Connection, scores: Sequence[ScoreMessage]
) -> dict[UUID, Any]:
    """The scores table holds exactly these scores, each column as sent; returns the rows."""
    rows = {row["score_id"]: row for row in await db.fetch("SELECT * FROM scores")}
    assert set(rows) == {score.score_id for score in scores}
    for score in scores:
        row = rows[score.score_id]
        for field in SCORE_FIELDS:
            stored = row[field.name]
            if field.kind is Kind.JSON:
                stored = json.loads(stored)
            assert stored == getattr(score, field.name), field.name
    return rows
