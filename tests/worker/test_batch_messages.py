"""score.batch.v1 messages: one message, many scores, stored all together or not at all."""

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika
import asyncpg
from aio_pika.abc import AbstractIncomingMessage

from shared.contract import (
    BATCH_MESSAGE_TYPE,
    CONTENT_TYPE,
    MAX_BATCH_SCORES,
    MESSAGE_TYPE,
    ScoreMessage,
)
from shared.dead_letters import DETAIL_HEADER, QUEUE_HEADER, REASON_HEADER, DeadLetterReason
from shared.settings import Settings
from shared.topology import QUEUE
from tests.conftest import wait_for_count
from tests.support.messages import assert_stored_as_sent, to_amqp_message
from tests.support.processes import connect_broker, running_worker, score_message, wait_until

COUNT_SCORES = "SELECT count(*) FROM scores"
STORED_IDS = "SELECT score_id FROM scores"
# Rows stored by one transaction share persisted_at: its default is now(), the transaction's start.
TRANSACTIONS = "SELECT count(DISTINCT persisted_at) FROM scores WHERE score_id = ANY($1::uuid[])"


def as_json(score: ScoreMessage) -> dict[str, Any]:
    """A score as the JSON object a batch carries."""
    fields: dict[str, Any] = json.loads(score.model_dump_json())
    return fields


def batch_body(items: Sequence[ScoreMessage | dict[str, Any]], **extra: Any) -> bytes:
    """The body of a score.batch.v1 message holding items (scores or raw JSON objects)."""
    scores = [item if isinstance(item, dict) else as_json(item) for item in items]
    return json.dumps({"scores": scores, **extra}).encode()


def batch_message(
    body: bytes, name: str, message_type: str | None = BATCH_MESSAGE_TYPE
) -> aio_pika.Message:
    """A batch message as a direct publisher sends it, labelled so its dead letter is known."""
    return aio_pika.Message(
        body=body,
        content_type=CONTENT_TYPE,
        type=message_type,
        message_id=f"batch-{name}",
        headers={"x-test-case": name},
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


def scores_batch(scores: Sequence[ScoreMessage], name: str) -> aio_pika.Message:
    """A valid batch message carrying scores."""
    return batch_message(batch_body(scores), name)


def many(count: int, label: str) -> list[ScoreMessage]:
    """count valid scores, each with its own prediction_id and value."""
    return [score_message(prediction_id=f"{label}-{i}", value={"i": i}) for i in range(count)]


def ids(scores: Sequence[ScoreMessage]) -> set[Any]:
    """The score_ids of scores."""
    return {score.score_id for score in scores}


async def stored_ids(db: asyncpg.Connection) -> set[Any]:
    """The score_ids in the scores table."""
    return {row["score_id"] for row in await db.fetch(STORED_IDS)}


async def transactions(db: asyncpg.Connection, scores: Sequence[ScoreMessage]) -> int:
    """How many transactions stored these scores."""
    count: int = await db.fetchval(TRANSACTIONS, [score.score_id for score in scores])
    return count


def collecting(settings: Settings, seconds: float) -> Settings:
    """Settings whose worker keeps collecting a batch for up to seconds after its first message.

    Messages published before the worker starts then share its batches, so a poison or refused
    message is handled alongside valid ones rather than on its own.
    """
    return settings.model_copy(update={"worker_flush_interval_seconds": seconds})


# (a) -------------------------------------------------------------------------------------------


async def test_a_batch_message_of_n_scores_becomes_n_rows_with_every_column(
    settings: Settings, db: asyncpg.Connection
) -> None:
    scores = [
        *many(47, "a"),
        score_message(value={"text": "héllo ✓ 🎉", "n": [1, 2.5, None, True]}),
        score_message(value=10**30, evaluation_run_id=None),
        score_message(
            value=None,
            entity="other",
            project="proj-2",
            scorer="weave:///other/proj-2/op/exact_match:abc123",
        ),
    ]
    async with connect_broker(settings) as broker:
        async with running_worker(settings) as worker:
            await broker.publish([scores_batch(scores, "fifty")])
            assert await wait_for_count(db, COUNT_SCORES, len(scores)) == len(scores)
            await wait_until(lambda: worker.persisted == len(scores), "all scores counted")
        assert worker.duplicates == 0
        await broker.assert_stays_empty(QUEUE)
        assert await broker.take_dead_letters(1, timeout=0.2) == []

    await assert_stored_as_sent(db, scores)
    assert await transactions(db, scores) == 1, "a batch message is stored in one transaction"


async def test_batch_messages_of_one_and_of_the_maximum_are_stored(
    settings: Settings, db: asyncpg.Connection
) -> None:
    one = many(1, "one")
    most = many(MAX_BATCH_SCORES, "most")
    async with connect_broker(settings) as broker:
        async with running_worker(settings):
            await broker.publish([scores_batch(one, "one"), scores_batch(most, "most")])
            expected = len(one) + len(most)
            assert await wait_for_count(db, COUNT_SCORES, expected, timeout=20) == expected
        await broker.assert_stays_empty(QUEUE)
        assert await broker.take_dead_letters(1, timeout=0.2) == []
    assert await stored_ids(db) == ids(one) | ids(most)


# (b) -------------------------------------------------------------------------------------------


async def test_republishing_a_batch_message_adds_no_rows(
    settings: Settings, db: asyncpg.Connection
) -> None:
    scores = many(30, "again")
    body = batch_body(scores)
    async with connect_broker(settings) as broker:
        async with running_worker(settings) as worker:
            await broker.publish([batch_message(body, "first")])
            assert await wait_for_count(db, COUNT_SCORES, len(scores)) == len(scores)
            await broker.publish([batch_message(body, "second"), batch_message(body, "third")])
            await wait_until(
                lambda: worker.duplicates == 2 * len(scores), "both copies seen as duplicates"
            )
            assert worker.persisted == len(scores)
        await broker.assert_stays_empty(QUEUE)
        assert await broker.take_dead_letters(1, timeout=0.2) == []
    assert await db.fetchval(COUNT_SCORES) == len(scores)
    assert await stored_ids(db) == ids(scores)


async def test_a_batch_overlapping_stored_scores_adds_only_the_new_ones_and_keeps_old_values(
    settings: Settings, db: asyncpg.Connection
) -> None:
    old = many(10, "old")
    changed = [score.model_copy(update={"value": "changed"}) for score in old]
    new = many(10, "new")
    repeated = score_message(prediction_id="twice-in-one-batch")
    async with connect_broker(settings) as broker:
        async with running_worker(settings) as worker:
            await broker.publish([scores_batch(old, "old")])
            assert await wait_for_count(db, COUNT_SCORES, len(old)) == len(old)
            # Half already stored (with other values), half new, one score twice in the batch.
            await broker.publish([scores_batch([*changed, *new, repeated, repeated], "overlap")])
            total = len(old) + len(new) + 1
            assert await wait_for_count(db, COUNT_SCORES, total) == total
            await wait_until(lambda: worker.duplicates == len(old) + 1, "duplicates counted")
            assert worker.persisted == total
        await broker.assert_stays_empty(QUEUE)
        assert await broker.take_dead_letters(1, timeout=0.2) == []

    values = {
        row["score_id"]: json.loads(row["value"]) for row in await db.fetch("SELECT * FROM scores")
    }
    assert values == {
        **{score.score_id: score.value for score in old},
        **{score.score_id: score.value for score in new},
        repeated.score_id: repeated.value,
    }


# (c) and (d) -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PoisonBatch:
    """A batch message the worker must dead-letter whole, and what its dead letter must say."""

    name: str
    body: bytes
    reason: DeadLetterReason
    detail_names: tuple[str, ...]
    carried: tuple[ScoreMessage, ...] = ()
    type: str | None = BATCH_MESSAGE_TYPE

    def message(self) -> aio_pika.Message:
        return batch_message(self.body, self.name, self.type)


def _with_bad_item(
    name: str, count: int, bad: dict[int, dict[str, Any]], detail_names: tuple[str, ...]
) -> PoisonBatch:
    """A batch of count valid scores, except that the items at the keys of bad get changes."""
    scores = many(count, name)
    items = [{**as_json(score), **bad.get(i, {})} for i, score in enumerate(scores)]
    return PoisonBatch(
        name, batch_body(items), DeadLetterReason.SCHEMA_VIOLATION, detail_names, tuple(scores)
    )


def _truncated(name: str) -> PoisonBatch:
    scores = many(5, name)
    body = batch_body(scores)
    return PoisonBatch(
        name, body[: len(body) // 2], DeadLetterReason.INVALID_JSON, (), tuple(scores)
    )


INVALID_ITEMS = [
    _with_bad_item("nul-in-value", 8, {3: {"value": {"text": "a\u0000b"}}}, ("scores.3.value",)),
    _with_bad_item("bad-scorer", 5, {0: {"scorer": "exact_match"}}, ("scores.0.scorer",)),
    _with_bad_item(
        "last-item-uuid4",
        6,
        {5: {"score_id": "1b4e28ba-2fa1-4d2b-883f-0016d3cca427"}},
        ("scores.5.score_id",),
    ),
    _with_bad_item(
        "two-bad-items",
        9,
        {1: {"entity": "a/b"}, 7: {"created_at": "2024-01-01T00:00:00"}},
        ("scores.1.entity", "scores.7.created_at"),
    ),
    _with_bad_item("unknown-field-in-item", 4, {2: {"surprise": "!"}}, ("scores.2.surprise",)),
    _truncated("truncated-json"),
]


def _score_under_batch_type() -> PoisonBatch:
    score = score_message()
    return PoisonBatch(
        "single-score-typed-as-batch",
        score.model_dump_json().encode(),
        DeadLetterReason.SCHEMA_VIOLATION,
        ("scores",),
        (score,),
    )


def _batch_under_single_type() -> PoisonBatch:
    scores = many(3, "batch-typed-as-single")
    return PoisonBatch(
        "batch-typed-as-single",
        batch_body(scores),
        DeadLetterReason.SCHEMA_VIOLATION,
        ("scores",),
        tuple(scores),
        type=MESSAGE_TYPE,
    )


def _over_the_maximum() -> PoisonBatch:
    scores = many(MAX_BATCH_SCORES + 1, "too-many")
    return PoisonBatch(
        "too-many",
        batch_body(scores),
        DeadLetterReason.SCHEMA_VIOLATION,
        ("scores", str(MAX_BATCH_SCORES)),
        tuple(scores),
    )


def _extra_top_level_field() -> PoisonBatch:
    scores = many(2, "extra")
    return PoisonBatch(
        "extra-top-level-field",
        batch_body(scores, note="hi"),
        DeadLetterReason.SCHEMA_VIOLATION,
        ("note",),
        tuple(scores),
    )


MALFORMED_BATCHES = [
    PoisonBatch("empty", batch_body([]), DeadLetterReason.SCHEMA_VIOLATION, ("scores",)),
    _over_the_maximum(),
    PoisonBatch("no-scores-field", b"{}", DeadLetterReason.SCHEMA_VIOLATION, ("scores",)),
    PoisonBatch(
        "scores-not-a-list",
        b'{"scores": {"a": 1}}',
        DeadLetterReason.SCHEMA_VIOLATION,
        ("scores",),
    ),
    _extra_top_level_field(),
    _score_under_batch_type(),
    _batch_under_single_type(),
]


async def _dead_letter_alongside_valid_messages(
    settings: Settings, db: asyncpg.Connection, poisons: Sequence[PoisonBatch]
) -> dict[str, AbstractIncomingMessage]:
    """Publish poisons between valid single and batch messages, all before the worker starts so
    they share its batches; check the valid ones, and nothing else, are stored and the poisons
    dead-lettered with their bodies; return the dead letters by test case."""
    singles = many(len(poisons) + 1, "good-single")
    batches = [many(4, f"good-batch-{i}") for i in range(len(poisons) + 1)]
    burst: list[aio_pika.Message] = []
    for i in range(len(poisons) + 1):
        burst.append(to_amqp_message(singles[i]))
        burst.append(scores_batch(batches[i], f"good-{i}"))
        if i < len(poisons):
            burst.append(poisons[i].message())
    good = [*singles, *(score for batch in batches for score in batch)]

    async with connect_broker(settings) as broker:
        await broker.publish(burst)
        async with running_worker(collecting(settings, 0.5)):
            assert await wait_for_count(db, COUNT_SCORES, len(good)) == len(good)
            dead = await broker.take_dead_letters(len(poisons))
        await broker.assert_stays_empty(QUEUE)
        assert await broker.take_dead_letters(1, timeout=0.2) == []

    assert await stored_ids(db) == ids(good), "no score of a dead-lettered batch is stored"
    for batch in batches:
        assert await transactions(db, batch) == 1
    by_name = {str(letter.headers["x-test-case"]): letter for letter in dead}
    assert sorted(by_name) == sorted(poison.name for poison in poisons)
    assert len(dead) == len(poisons)
    for poison in poisons:
        letter = by_name[poison.name]
        assert letter.body == poison.body, poison.name
        assert letter.type == poison.type, poison.name
        assert letter.message_id == f"batch-{poison.name}"
        assert letter.headers[REASON_HEADER] == poison.reason, (poison.name, letter.headers)
        assert letter.headers[QUEUE_HEADER] == QUEUE
        detail = letter.headers[DETAIL_HEADER]
        assert isinstance(detail, str), (poison.name, letter.headers)
        assert detail, poison.name
        for needle in poison.detail_names:
            assert needle in detail, (poison.name, detail)
    return by_name


async def test_a_batch_with_an_invalid_score_is_dead_lettered_whole_while_others_persist(
    settings: Settings, db: asyncpg.Connection
) -> None:
    dead = await _dead_letter_alongside_valid_messages(settings, db, INVALID_ITEMS)
    # The detail names the bad items, not their valid batch-mates.
    assert "scores.2." not in str(dead["nul-in-value"].headers[DETAIL_HEADER])
    assert "scores.4." not in str(dead["two-bad-items"].headers[DETAIL_HEADER])


async def test_an_empty_an_oversized_or_misshapen_batch_is_a_schema_violation(
    settings: Settings, db: asyncpg.Connection
) -> None:
    dead = await _dead_letter_alongside_valid_messages(settings, db, MALFORMED_BATCHES)
    assert "at least 1" in str(dead["empty"].headers[DETAIL_HEADER])
    assert f"at most {MAX_BATCH_SCORES}" in str(dead["too-many"].headers[DETAIL_HEADER])


# (e) -------------------------------------------------------------------------------------------


async def test_a_batch_with_a_score_postgresql_refuses_is_dead_lettered_whole(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """The contract refuses everything PostgreSQL would; as in test_dead_letters, a CHECK
    constraint added for the test makes PostgreSQL itself refuse one score of a batch."""
    refused = many(12, "refused-batch")
    refused[5] = score_message(prediction_id="refuse-me")
    before, after = many(3, "before"), many(3, "after")
    good_batch = many(20, "good-batch")
    await db.execute(
        "ALTER TABLE scores ADD CONSTRAINT test_refuse CHECK (prediction_id <> 'refuse-me')"
    )
    try:
        async with connect_broker(settings) as broker:
            await broker.publish(
                [
                    *(to_amqp_message(score) for score in before),
                    scores_batch(refused, "refused"),
                    scores_batch(good_batch, "good"),
                    *(to_amqp_message(score) for score in after),
                ]
            )
            async with running_worker(collecting(settings, 0.5)):
                good = [*before, *good_batch, *after]
                assert await wait_for_count(db, COUNT_SCORES, len(good)) == len(good)
                (dead,) = await broker.take_dead_letters(1)
            await broker.assert_stays_empty(QUEUE)
            assert await broker.take_dead_letters(1, timeout=0.2) == []
    finally:
        await db.execute("ALTER TABLE scores DROP CONSTRAINT test_refuse")

    assert await stored_ids(db) == ids(good), "none of the refused batch's scores is stored"
    assert await transactions(db, good_batch) == 1, "the good batch was not split either"
    assert dead.message_id == "batch-refused"
    assert dead.type == BATCH_MESSAGE_TYPE
    assert dead.body == batch_body(refused)
    assert dead.headers[REASON_HEADER] == DeadLetterReason.STORAGE_REJECTED
    assert "test_refuse" in str(dead.headers[DETAIL_HEADER])


# (f) -------------------------------------------------------------------------------------------


async def test_single_and_batch_messages_share_a_worker_batch_counted_in_scores(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """The worker flushes when it holds WORKER_BATCH_SIZE scores: 500 here, in 103 messages.

    The flush interval is far longer than the test waits, so the rows only land in time if the
    batch messages count for all their scores; and they land in one transaction.
    """
    settings = settings.model_copy(update={"worker_batch_size": 500})
    singles = many(100, "single")
    batches = [many(150, "b150"), many(200, "b200"), many(50, "b50")]
    messages = [to_amqp_message(score) for score in singles[:40]]
    messages.append(scores_batch(batches[0], "150"))
    messages.extend(to_amqp_message(score) for score in singles[40:90])
    messages.append(scores_batch(batches[1], "200"))
    messages.append(scores_batch(batches[2], "50"))
    messages.extend(to_amqp_message(score) for score in singles[90:])
    everything = [*singles, *(score for batch in batches for score in batch)]
    assert len(everything) == settings.worker_batch_size

    async with connect_broker(settings) as broker:
        await broker.publish(messages)
        async with running_worker(collecting(settings, 60)) as worker:
            assert await wait_for_count(db, COUNT_SCORES, 500) == 500
            await wait_until(lambda: worker.persisted == 500, "all scores counted")
        await broker.assert_stays_empty(QUEUE)
        assert await broker.take_dead_letters(1, timeout=0.2) == []
    assert await stored_ids(db) == ids(everything)
    assert await transactions(db, everything) == 1


async def test_a_batch_message_larger_than_the_worker_batch_is_stored_whole(
    settings: Settings, db: asyncpg.Connection
) -> None:
    settings = settings.model_copy(update={"worker_batch_size": 500})
    big = many(700, "big")
    singles = many(5, "after-big")
    async with connect_broker(settings) as broker:
        await broker.publish(
            [scores_batch(big, "big"), *(to_amqp_message(score) for score in singles)]
        )
        async with running_worker(settings) as worker:
            total = len(big) + len(singles)
            assert await wait_for_count(db, COUNT_SCORES, total) == total
            await wait_until(lambda: worker.persisted == total, "all scores counted")
        await broker.assert_stays_empty(QUEUE)
        assert await broker.take_dead_letters(1, timeout=0.2) == []
    assert await stored_ids(db) == ids(big) | ids(singles)
    assert await transactions(db, big) == 1, "a batch message is never split"
