"""Messages that can never be stored go to scores.dead with their reason; batch-mates persist."""

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aio_pika
import asyncpg

from shared.contract import CONTENT_TYPE, MESSAGE_TYPE
from shared.dead_letters import (
    DETAIL_HEADER,
    QUEUE_HEADER,
    REASON_HEADER,
    TIME_HEADER,
    DeadLetterReason,
)
from shared.settings import Settings
from shared.topology import QUEUE
from tests.conftest import wait_for_count
from tests.support.messages import to_amqp_message
from tests.support.processes import (
    connect_broker,
    running_worker,
    score_message,
)

COUNT_SCORES = "SELECT count(*) FROM scores"


@dataclass(frozen=True)
class Poison:
    """A message the worker must dead-letter, and what it must say about it."""

    name: str
    body: bytes
    reasons: frozenset[DeadLetterReason]
    detail_names: str = ""
    content_type: str | None = CONTENT_TYPE
    type: str | None = MESSAGE_TYPE

    def message(self) -> aio_pika.Message:
        """The AMQP message, labelled so that its dead letter can be told apart."""
        return aio_pika.Message(
            body=self.body,
            content_type=self.content_type,
            type=self.type,
            message_id=f"poison-{self.name}",
            headers={"x-test-case": self.name},
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )


def _score_json(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = json.loads(score_message().model_dump_json())
    fields.update(changes)
    return fields


def _without(field: str) -> dict[str, Any]:
    fields = _score_json()
    del fields[field]
    return fields


def _body(fields: object) -> bytes:
    return json.dumps(fields).encode()


def _poison(
    name: str, body: bytes, reason: DeadLetterReason, detail_names: str = "", **props: Any
) -> Poison:
    return Poison(name, body, frozenset({reason}), detail_names, **props)


_SCHEMA = DeadLetterReason.SCHEMA_VIOLATION
_VALID = _body(_score_json())

POISONS = [
    _poison("not-json", b"{this is not json", DeadLetterReason.INVALID_JSON),
    _poison("empty-body", b"", DeadLetterReason.INVALID_JSON),
    _poison("not-utf8", b"\xff\xfe\xfa", DeadLetterReason.INVALID_JSON),
    _poison("truncated-json", _VALID[: len(_VALID) // 2], DeadLetterReason.INVALID_JSON),
    _poison("json-array", b"[1, 2, 3]", _SCHEMA),
    _poison("missing-score-id", _body(_without("score_id")), _SCHEMA, "score_id"),
    _poison("missing-created-at", _body(_without("created_at")), _SCHEMA, "created_at"),
    _poison("entity-not-a-string", _body(_score_json(entity=42)), _SCHEMA, "entity"),
    _poison(
        "created-at-not-a-date", _body(_score_json(created_at="yesterday")), _SCHEMA, "created_at"
    ),
    _poison(
        "score-id-uuid4",
        _body(_score_json(score_id="1b4e28ba-2fa1-4d2b-883f-0016d3cca427")),
        _SCHEMA,
        "score_id",
    ),
    _poison("score-id-garbage", _body(_score_json(score_id="not-a-uuid")), _SCHEMA, "score_id"),
    _poison("nul-in-value", _body(_score_json(value={"text": "a\u0000b"})), _SCHEMA, "value"),
    _poison(
        "nul-in-prediction-id",
        _body(_score_json(prediction_id="p\u0000")),
        _SCHEMA,
        "prediction_id",
    ),
    _poison(
        "naive-created-at",
        _body(_score_json(created_at="2024-01-01T00:00:00")),
        _SCHEMA,
        "created_at",
    ),
    _poison("unknown-field", _body(_score_json(surprise="!")), _SCHEMA, "surprise"),
    _poison("bad-scorer", _body(_score_json(scorer="exact_match")), _SCHEMA, "scorer"),
    _poison(
        "text-plain",
        _VALID,
        DeadLetterReason.UNSUPPORTED_CONTENT_TYPE,
        content_type="text/plain",
    ),
    _poison(
        "no-content-type", _VALID, DeadLetterReason.UNSUPPORTED_CONTENT_TYPE, content_type=None
    ),
    _poison(
        "wrong-type", _VALID, DeadLetterReason.UNSUPPORTED_MESSAGE_TYPE, type="score.delete.v1"
    ),
    _poison(
        "before-year-one-in-utc",
        _body(_score_json(created_at="0001-01-01T00:00:00+14:00")),
        _SCHEMA,
        "created_at",
    ),
]


async def test_poison_messages_are_dead_lettered_with_reasons_while_batch_mates_persist(
    settings: Settings, db: asyncpg.Connection
) -> None:
    good = [score_message(prediction_id=f"good-{i}") for i in range(len(POISONS) + 1)]
    burst: list[aio_pika.Message] = []
    for i, score in enumerate(good):
        burst.append(to_amqp_message(score))
        if i < len(POISONS):
            burst.append(POISONS[i].message())

    started = datetime.now(UTC)
    async with connect_broker(settings) as broker:
        # Published before the worker starts, so good and poison messages share its batches.
        await broker.publish(burst)
        async with running_worker(settings):
            assert await wait_for_count(db, COUNT_SCORES, len(good)) == len(good)
            dead = await broker.take_dead_letters(len(POISONS))
        await broker.assert_stays_empty(QUEUE)
        assert await broker.take_dead_letters(1, timeout=0.2) == []

    stored = {row["score_id"] for row in await db.fetch("SELECT score_id FROM scores")}
    assert stored == {score.score_id for score in good}

    dead_by_name = {str(message.headers["x-test-case"]): message for message in dead}
    assert sorted(dead_by_name) == sorted(poison.name for poison in POISONS)
    assert len(dead) == len(POISONS)
    for poison in POISONS:
        letter = dead_by_name[poison.name]
        headers = letter.headers
        assert letter.body == poison.body, poison.name
        assert headers[REASON_HEADER] in poison.reasons, (poison.name, headers)
        detail = headers[DETAIL_HEADER]
        assert isinstance(detail, str), (poison.name, headers)
        assert detail, (poison.name, headers)
        assert poison.detail_names in detail, (poison.name, detail)
        assert headers[QUEUE_HEADER] == QUEUE, (poison.name, headers)
        dead_lettered_at = datetime.fromisoformat(str(headers[TIME_HEADER]))
        assert started <= dead_lettered_at <= datetime.now(UTC), (poison.name, headers)
        assert letter.message_id == f"poison-{poison.name}"
        assert letter.content_type == poison.content_type, poison.name
        assert letter.type == poison.type, poison.name


async def test_a_batch_of_only_poison_leaves_nothing_behind(
    settings: Settings, db: asyncpg.Connection
) -> None:
    poisons = [poison.message() for poison in POISONS[:5]]
    async with connect_broker(settings) as broker:
        async with running_worker(settings):
            await broker.publish(poisons)
            dead = await broker.take_dead_letters(len(poisons))
        await broker.assert_stays_empty(QUEUE)
    assert len(dead) == len(poisons)
    assert await db.fetchval(COUNT_SCORES) == 0


async def test_a_row_postgresql_refuses_is_dead_lettered_alone(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """A score the contract accepts but the table refuses is isolated from its batch-mates."""
    good = [score_message(prediction_id=f"good-{i}") for i in range(20)]
    refused = score_message(prediction_id="refuse-me")
    await db.execute(
        "ALTER TABLE scores ADD CONSTRAINT test_refuse CHECK (prediction_id <> 'refuse-me')"
    )
    try:
        async with connect_broker(settings) as broker:
            await broker.publish(
                [to_amqp_message(score) for score in [*good[:10], refused, *good[10:]]]
            )
            async with running_worker(settings):
                assert await wait_for_count(db, COUNT_SCORES, len(good)) == len(good)
                (dead,) = await broker.take_dead_letters(1)
            await broker.assert_stays_empty(QUEUE)
    finally:
        await db.execute("ALTER TABLE scores DROP CONSTRAINT test_refuse")
    assert dead.headers[REASON_HEADER] == DeadLetterReason.STORAGE_REJECTED
    assert "test_refuse" in str(dead.headers[DETAIL_HEADER])
    assert dead.message_id == str(refused.score_id)
