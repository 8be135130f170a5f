"""Trust by exchange, end to end: the worker stores what came through `scores.api` (where only
the api publishes) after a cheap decode, validates everything else in full, and that choice
never costs a score.

Real RabbitMQ, PostgreSQL, api app and worker throughout, on the session's vhost, where the
guest user may write anywhere: who may write to `scores.api` is the broker's permissions'
business, tested in tests/shared/test_broker_permissions.py. Messages come either from the api
itself (posted through its in-process app and taken off scores.persist before any worker
runs), or are built here exactly as the api builds them (pydantic_core.to_json of the message
fields) and published to the exchange a case needs.

Which path a message took is observable in one way from outside: a body that is storable but
breaks the contract (a scorer of another entity, the "probe") is stored when it came through
`scores.api`, and dead-lettered as a schema violation otherwise. The api never publishes such
a body; the tests use it to see which path a message took.
"""

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aio_pika
import asyncpg
import httpx
import pytest
from aio_pika.abc import AbstractIncomingMessage
from prometheus_client import REGISTRY
from pydantic_core import to_json

from shared.contract import (
    BATCH_MESSAGE_TYPE,
    CONTENT_TYPE,
    MAX_INT_DIGITS,
    MAX_JSON_DEPTH,
    MESSAGE_TYPE,
    ScoreMessage,
)
from shared.dead_letters import (
    DETAIL_HEADER,
    QUEUE_HEADER,
    REASON_HEADER,
    DeadLetterReason,
    copy_with_headers,
)
from shared.score_fields import FIELD_NAMES
from shared.settings import MIB, Settings
from shared.topology import API_EXCHANGE, DEAD_LETTER_QUEUE, EXCHANGE, QUEUE
from tests.cli.test_dlq import dlq_ok
from tests.conftest import (
    ENTITY,
    PROJECT,
    basic_auth,
    client_for,
    running_app,
    score_body,
    wait_for_count,
)
from tests.support.processes import (
    Broker,
    connect_broker,
    running_worker,
    score_message,
    wait_until,
)
from worker.decode import PoisonMessage, ScoreRow, decode_scores

COUNT_SCORES = "SELECT count(*) FROM scores"
STORED_ROWS = """
SELECT score_id, entity, project, prediction_id, scorer, value::text AS value,
       evaluation_run_id, created_at, created_by
FROM scores ORDER BY score_id
"""
CASE_HEADER = "x-test-case"
DECODED_METRIC = "score_ingest_messages_decoded_total"
REDELIVERED_METRIC = "score_ingest_messages_redelivered_total"
DEFAULT_EXCHANGE = ""
_SCHEMA = DeadLetterReason.SCHEMA_VIOLATION
_REJECTED = DeadLetterReason.STORAGE_REJECTED


# Messages and the api


def score_fields(score: ScoreMessage | None = None, **changes: Any) -> dict[str, Any]:
    """A score's message fields as JSON values, in the api's order, with changes."""
    fields: dict[str, Any] = json.loads((score or score_message()).model_dump_json())
    fields.update(changes)
    return fields


def without(field: str, fields: dict[str, Any] | None = None) -> dict[str, Any]:
    """Message fields without one of them."""
    kept = dict(fields or score_fields())
    del kept[field]
    return kept


def api_body(fields: object) -> bytes:
    """A body serialised as the api serialises it."""
    return to_json(fields)


def batch_of(items: Iterable[dict[str, Any]]) -> bytes:
    return api_body({"scores": list(items)})


def message(
    name: str,
    body: bytes,
    message_type: str = MESSAGE_TYPE,
    content_type: str = CONTENT_TYPE,
) -> aio_pika.Message:
    """A message with the api's properties, labelled with its test case."""
    return aio_pika.Message(
        body=body,
        headers={CASE_HEADER: name},
        content_type=content_type,
        type=message_type,
        message_id=name,
        app_id="score-ingest",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


def copy_of(taken: AbstractIncomingMessage) -> aio_pika.Message:
    """A message taken off a queue, to publish again: the same body and properties."""
    return copy_with_headers(taken, dict(taken.headers or {}))


def probe(**changes: Any) -> dict[str, Any]:
    """A storable score that breaks the contract (its scorer is entity "probe"'s, which the
    dead letter's detail names): stored only if trusted."""
    return score_fields(**{"scorer": "weave:///probe/evals/op/probe:1", **changes})


def collecting(settings: Settings, seconds: float = 0.5) -> Settings:
    """Settings whose worker collects a batch for up to seconds after its first message, so
    that messages published before it starts share its batches."""
    return settings.model_copy(update={"worker_flush_interval_seconds": seconds})


async def publish_to_default_exchange(
    settings: Settings, messages: Iterable[aio_pika.Message]
) -> None:
    """Publish straight to scores.persist through the default exchange, with confirms."""
    connection = await aio_pika.connect(settings.amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        for each in messages:
            await channel.default_exchange.publish(each, QUEUE, mandatory=True)


@dataclass(frozen=True)
class Checks:
    """Messages decoded, by how (the worker's metric `score_ingest_messages_decoded_total`)."""

    api_exchange: float = 0
    validation: float = 0


def decoded_so_far() -> Checks:
    """What this process (its in-process workers, and decode_scores called here) decoded."""
    return Checks(
        *(
            REGISTRY.get_sample_value(DECODED_METRIC, {"check": check}) or 0.0
            for check in ("api_exchange", "validation")
        )
    )


def decoded_since(before: Checks) -> Checks:
    now = decoded_so_far()
    return Checks(now.api_exchange - before.api_exchange, now.validation - before.validation)


@contextlib.asynccontextmanager
async def api_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A client on the real api app, once its publisher is connected; unsharded, so that
    what it publishes waits in scores.persist, where these tests read it."""
    unsharded = settings.model_copy(update={"queue_shards": 0})
    async with running_app(unsharded) as app, client_for(app) as client:
        yield client


async def take_all(broker: Broker) -> list[AbstractIncomingMessage]:
    """Every message waiting in scores.persist (no worker runs)."""
    count = await broker.ready_count(QUEUE)
    taken = await broker.take(QUEUE, count)
    assert len(taken) == count
    return taken


def fields_of(row: ScoreRow) -> dict[str, Any]:
    """A row's values by field name."""
    return dict(zip(FIELD_NAMES, row, strict=True))


def normalised(rows: Sequence[ScoreRow]) -> list[dict[str, Any]]:
    """Rows with score_id as text: the cheap decode leaves it as the text asyncpg encodes."""
    return [{**fields_of(row), "score_id": str(fields_of(row)["score_id"])} for row in rows]


async def stored_rows(db: asyncpg.Connection) -> list[tuple[Any, ...]]:
    return [tuple(row) for row in await db.fetch(STORED_ROWS)]


async def stored_ids(db: asyncpg.Connection) -> set[str]:
    return {str(row["score_id"]) for row in await db.fetch("SELECT score_id FROM scores")}


def ids_in(*items: dict[str, Any]) -> set[str]:
    return {str(item["score_id"]) for item in items}


async def assert_dead_letters(
    broker: Broker, expected: dict[str, tuple[DeadLetterReason, str]]
) -> dict[str, AbstractIncomingMessage]:
    """scores.dead holds exactly these cases, each with its reason and a detail naming what
    is wrong; returns the dead letters by case."""
    dead = await broker.take_dead_letters(len(expected))
    assert await broker.take_dead_letters(1, timeout=0.2) == []
    by_case = {str(letter.headers[CASE_HEADER]): letter for letter in dead}
    assert sorted(by_case) == sorted(expected)
    assert len(dead) == len(expected)
    for case, (reason, needle) in expected.items():
        headers = by_case[case].headers
        assert headers[REASON_HEADER] == reason, (case, headers)
        assert headers[QUEUE_HEADER] == QUEUE
        detail = headers[DETAIL_HEADER]
        assert isinstance(detail, str), (case, headers)
        assert detail, case
        assert needle in detail, (case, detail)
    return by_case


# (a) The same rows, through either exchange ---------------------------------------------------


BIGGEST = 10**MAX_INT_DIGITS - 1  # 1000 digits: the most the contract allows


def nested(depth: int, leaf: Any) -> Any:
    """leaf inside depth containers, objects and arrays in turn."""
    value = leaf
    for level in range(depth):
        value = [value, level] if level % 2 else {"k": value, "level": level}
    return value


UNICODE_PROJECT = "\u00e9vals-\U0001f389"
# (name, project, ScoreCreateBody): every kind of value the api accepts, near its limits.
VARIED: list[tuple[str, str, dict[str, Any]]] = [
    (
        "unicode",
        UNICODE_PROJECT,
        score_body(
            prediction_id="pr\u00e9diction-\u2713-\U0001f389",
            scorer=f"weave:///{ENTITY}/{UNICODE_PROJECT}/op/juge-\u00e9:v\u00e9",
            value={
                "text": "h\u00e9llo w\u00f6rld \u2014 \u65e5\u672c\u8a9e \u2713 \u03a9",
                "emoji": "\U0001f389\U0001f469\u200d\U0001f469\u200d\U0001f467 \U0001f3f3\ufe0f",
                "escapes": 'q" b\\ s/ nl\n tab\t \u0001\u001f \u007f \u2028\u2029 </script>',
                "\u043a\u043b\u044e\u0447": "\u0437\u043d\u0430\u0447\u0435\u043d\u0438\u0435",
                "\U0001f511": ["\U0001f5dd"],
                "": "empty key",
            },
            evaluation_run_id="run-\u00e9-\U0001f389",
        ),
    ),
    ("biggest-int", PROJECT, score_body(value=BIGGEST)),
    ("big-ints", PROJECT, score_body(value={"n": -BIGGEST, "m": [BIGGEST, -(2**64), 2**64]})),
    (
        "int-edges",
        PROJECT,
        score_body(value=[0, -1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, -(2**63) - 1, 10**20]),
    ),
    (
        "floats",
        PROJECT,
        score_body(
            value=[
                0.1,
                -0.0,
                0.30000000000000004,
                1e-300,
                5e-324,
                1.7976931348623157e308,
                123456789.123456789,
                1e21,
                1e22,
                -1.5e-10,
                2.5,
                100.0,
            ]
        ),
    ),
    ("deepest", PROJECT, score_body(value=nested(MAX_JSON_DEPTH, "bottom"))),
    ("deepest-empty", PROJECT, score_body(value=nested(MAX_JSON_DEPTH - 1, []))),
    (
        "all-types",
        PROJECT,
        score_body(
            value={
                "null": None,
                "bools": [True, False],
                "int": 7,
                "float": 7.5,
                "str": "s",
                "list": [1, "a", None, [], {}, [[]], 2.0],
                "obj": {"nested": {"deeper": [{"x": 1}]}},
                "a": 1,
                "A": 2,
                "a ": 3,
            }
        ),
    ),
    ("null", PROJECT, score_body(value=None)),
    ("true", PROJECT, score_body(value=True)),
    ("false", PROJECT, score_body(value=False)),
    ("zero", PROJECT, score_body(value=0)),
    ("float-scalar", PROJECT, score_body(value=0.92)),
    ("empty-string", PROJECT, score_body(value="")),
    ("string", PROJECT, score_body(value="just text \u2713")),
    ("empty-list", PROJECT, score_body(value=[])),
    ("empty-object", PROJECT, score_body(value={})),
    ("null-run", PROJECT, score_body(evaluation_run_id=None)),
    ("absent-run", PROJECT, without("evaluation_run_id", score_body())),
    (
        "longest-ids",
        PROJECT,
        score_body(prediction_id="\u00e9" * 256, evaluation_run_id="\U0001f389" * 256),
    ),
    (
        "scorer-with-edges",
        PROJECT,
        score_body(scorer=f"weave:///{ENTITY}/{PROJECT}/object/judge:v1/key/k/index/3/attr/x"),
    ),
    ("large-string", PROJECT, score_body(value="x" * 200_000 + "\u00e9")),
]


def url(project: str, batch: bool = False) -> str:
    return f"/v2/{ENTITY}/{quote(project, safe='')}/scores" + ("/batch" if batch else "")


async def post_everything(
    client: httpx.AsyncClient, api_key: str
) -> dict[str, tuple[str, dict[str, Any]]]:
    """Post every VARIED body singly (some with an Idempotency-Key), all at once (the api
    gathers them into batch messages), and as batch requests (one per project); returns
    {score_id: (project, body)}."""
    auth = basic_auth(api_key)
    posted: dict[str, tuple[str, dict[str, Any]]] = {}
    for n, (name, project, body) in enumerate(VARIED):
        extra = {"Idempotency-Key": f"single-{name}"} if n % 2 else {}
        response = await client.post(url(project), json=body, headers={**auth, **extra})
        assert response.status_code == 200, (name, response.text)
        posted[response.json()["score_id"]] = (project, body)

    responses = await asyncio.gather(
        *(client.post(url(project), json=body, headers=auth) for _, project, body in VARIED)
    )
    for (name, project, body), response in zip(VARIED, responses, strict=True):
        assert response.status_code == 200, (name, response.text)
        posted[response.json()["score_id"]] = (project, body)

    for project in {project for _, project, _ in VARIED}:
        bodies = [body for _, in_project, body in VARIED if in_project == project]
        response = await client.post(
            url(project, batch=True), json={"scores": bodies}, headers=auth
        )
        assert response.status_code == 200, response.text
        for score_id, body in zip(response.json()["score_ids"], bodies, strict=True):
            posted[score_id] = (project, body)
    return posted


async def test_the_varied_bodies_are_at_the_limits_the_api_accepts(
    settings: Settings, api_key: str
) -> None:
    """The equivalence below is tested at the contract's limits, not short of them."""
    too_deep = score_body(value=nested(MAX_JSON_DEPTH + 1, "bottom"))
    too_big = score_body(value=BIGGEST + 1)
    async with api_client(settings) as client:
        for body in (too_deep, too_big):
            response = await client.post(url(PROJECT), json=body, headers=basic_auth(api_key))
            assert response.status_code == 422, response.text


async def test_the_apis_messages_give_the_same_rows_through_either_exchange(
    settings: Settings, db: asyncpg.Connection, api_key: str
) -> None:
    async with connect_broker(settings) as broker:
        async with api_client(settings) as client:
            posted = await post_everything(client, api_key)
        from_api = await take_all(broker)
        assert {message.type for message in from_api} == {MESSAGE_TYPE, BATCH_MESSAGE_TYPE}
        assert {message.exchange for message in from_api} == {API_EXCHANGE}

        # The same bytes and properties, published to the public exchange by someone else.
        await broker.publish(copy_of(message) for message in from_api)
        from_public = await take_all(broker)
        assert {message.exchange for message in from_public} == {EXCHANGE}
        public_by_body = {message.body: message for message in from_public}
        assert sorted(public_by_body) == sorted(message.body for message in from_api)

        seen: dict[str, dict[str, Any]] = {}
        for trusted in from_api:
            public = public_by_body[trusted.body]
            before = decoded_so_far()
            cheap = decode_scores(trusted, 16 * MIB)
            # The api's body is in the shape the cheap decode expects: it is really taken.
            assert decoded_since(before) == Checks(api_exchange=1)
            before = decoded_so_far()
            validated = decode_scores(public, 16 * MIB)
            assert decoded_since(before) == Checks(validation=1)
            assert normalised(cheap) == normalised(validated)
            for row in (*cheap, *validated):
                assert fields_of(row)["created_at"].utcoffset() is not None
            seen.update((str(row["score_id"]), row) for row in map(fields_of, validated))

        # Each score is there once, as posted.
        assert set(seen) == set(posted)
        for score_id, (project, body) in posted.items():
            got = seen[score_id]
            assert (got["entity"], got["project"]) == (ENTITY, project)
            assert got["prediction_id"] == body["prediction_id"]
            assert got["scorer"] == body["scorer"]
            assert json.loads(got["value"]) == body["value"]
            assert got["evaluation_run_id"] == body.get("evaluation_run_id")

        # Stored by the worker: once through the api's exchange, once through the public
        # one. PostgreSQL ends up with the same rows.
        async with running_worker(settings) as worker:
            before = decoded_so_far()
            await broker.publish((copy_of(m) for m in from_api), API_EXCHANGE)
            assert await wait_for_count(db, COUNT_SCORES, len(posted)) == len(posted)
            assert decoded_since(before) == Checks(api_exchange=len(from_api))
            through_api = await stored_rows(db)

            await db.execute("TRUNCATE scores")
            before = decoded_so_far()
            await broker.publish(copy_of(m) for m in from_api)
            assert await wait_for_count(db, COUNT_SCORES, len(posted)) == len(posted)
            assert decoded_since(before) == Checks(validation=len(from_api))
            through_public = await stored_rows(db)
            await wait_until(lambda: worker.persisted == 2 * len(posted), "all counted")
            assert worker.duplicates == 0
        await broker.assert_stays_empty(QUEUE)
        assert await broker.take_dead_letters(1, timeout=0.2) == []

    assert through_api == through_public
    assert {str(row[0]) for row in through_api} == set(posted)


# (b) End to end -------------------------------------------------------------------------------


async def test_the_worker_stores_what_the_api_published_exactly_once_without_validating_it(
    settings: Settings, db: asyncpg.Connection, api_key: str
) -> None:
    auth = basic_auth(api_key)
    async with (
        connect_broker(settings) as broker,
        running_worker(settings) as worker,
        api_client(settings) as client,
    ):
        before = decoded_so_far()
        score_ids: list[str] = []
        for n in range(3):  # single score messages
            response = await client.post(url(PROJECT), json=score_body(value=n), headers=auth)
            assert response.status_code == 200, response.text
            score_ids.append(response.json()["score_id"])
        together = await asyncio.gather(  # gathered into batch messages by the api
            *(
                client.post(url(PROJECT), json=score_body(value=[n]), headers=auth)
                for n in range(20)
            )
        )
        assert [response.status_code for response in together] == [200] * 20
        score_ids += [response.json()["score_id"] for response in together]
        for size in (1, 50):  # batch requests
            response = await client.post(
                url(PROJECT, batch=True),
                json={"scores": [score_body(value={"i": i}) for i in range(size)]},
                headers=auth,
            )
            assert response.status_code == 200, response.text
            score_ids += response.json()["score_ids"]

        total = len(score_ids)
        assert await wait_for_count(db, COUNT_SCORES, total) == total
        await wait_until(lambda: worker.persisted == total, "every score counted")
        assert worker.duplicates == 0
        # Every message the api published took the cheap decode: 3 singles, the 20 gathered
        # into one or more batch messages, and 2 batch requests.
        checks = decoded_since(before)
        assert checks.validation == 0
        assert 6 <= checks.api_exchange <= 25
        await broker.assert_stays_empty(QUEUE)
        assert await broker.take_dead_letters(1, timeout=0.2) == []

    assert await stored_ids(db) == set(score_ids)
    assert len(set(score_ids)) == total
    created_by = {row["created_by"] for row in await db.fetch("SELECT created_by FROM scores")}
    assert created_by == {api_key.split("_")[1]}, "the id of the key that posted them"


async def test_the_exchange_a_message_came_through_decides_its_path(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """The probe of which path a message takes, which the tests below rely on. Only
    `scores.api` is trusted: the public exchange and the default one (straight to the queue
    by name) are validated, whatever the message says about itself."""
    trusted, public, default = probe(), probe(), probe()
    async with connect_broker(settings) as broker:
        await broker.publish([message("trusted", api_body(trusted))], API_EXCHANGE)
        await broker.publish([message("public", api_body(public))])
        await publish_to_default_exchange(settings, [message("default", api_body(default))])
        before = decoded_so_far()
        async with running_worker(collecting(settings)):
            assert await wait_for_count(db, COUNT_SCORES, 1) == 1
            await assert_dead_letters(
                broker, {"public": (_SCHEMA, "probe"), "default": (_SCHEMA, "probe")}
            )
        assert decoded_since(before) == Checks(api_exchange=1, validation=2)
        await broker.assert_stays_empty(QUEUE)
    assert await stored_ids(db) == ids_in(trusted)


async def test_decoding_trusts_the_api_exchange_and_no_other(settings: Settings) -> None:
    """decode_scores reads the exchange the broker delivered the message from."""
    fields = probe()
    async with connect_broker(settings) as broker:
        await broker.publish([message("api", api_body(fields))], API_EXCHANGE)
        await broker.publish([message("public", api_body(fields))])
        await publish_to_default_exchange(settings, [message("default", api_body(fields))])
        taken = {str(m.headers[CASE_HEADER]): m for m in await broker.take(QUEUE, 3)}
    assert {case: m.exchange for case, m in taken.items()} == {
        "api": API_EXCHANGE,
        "public": EXCHANGE,
        "default": DEFAULT_EXCHANGE,
    }
    (row,) = decode_scores(taken["api"], 16 * MIB)
    assert str(fields_of(row)["score_id"]) == fields["score_id"]
    for case in ("public", "default"):
        with pytest.raises(PoisonMessage) as poison:
            decode_scores(taken[case], 16 * MIB)
        assert poison.value.reason == _SCHEMA
        assert "probe" in poison.value.detail


# (c) Through the api's exchange, anything not in the api's shape is validated in full ---------


async def test_misshapen_messages_through_the_api_exchange_are_validated_in_full(
    settings: Settings, db: asyncpg.Connection
) -> None:
    no_run = without("evaluation_run_id", score_fields(prediction_id="no-run"))
    reordered = dict(reversed(score_fields(prediction_id="reordered").items()))
    upper = score_fields(prediction_id="upper-case-id")
    upper["score_id"] = upper["score_id"].upper()
    # Not in the api's shape (the optional field left out, an id in upper case), or in
    # another order: the cheap decode declines the first two and reads the third by name;
    # all are valid, so stored.
    stored_messages = [
        message("without-optional-field", api_body(no_run)),
        message("score-id-in-upper-case", api_body(upper)),
        message("fields-reordered", api_body(reordered)),
    ]
    poisons = [
        (message("missing-created-by", api_body(without("created_by"))), _SCHEMA, "created_by"),
        (message("missing-score-id", api_body(without("score_id"))), _SCHEMA, "score_id"),
        (message("unknown-field", api_body(score_fields(extra=1))), _SCHEMA, "extra"),
        (
            message(
                "batch-item-missing-scorer",
                batch_of([score_fields(), without("scorer"), score_fields()]),
                BATCH_MESSAGE_TYPE,
            ),
            _SCHEMA,
            "scores.1.scorer",
        ),
        (message("empty-batch", batch_of([]), BATCH_MESSAGE_TYPE), _SCHEMA, "scores"),
        (
            message("batch-not-a-list", b'{"scores": {"a": 1}}', BATCH_MESSAGE_TYPE),
            _SCHEMA,
            "scores",
        ),
        (message("batch-under-single-type", batch_of([score_fields()])), _SCHEMA, "scores"),
        (message("json-array", api_body([score_fields()])), _SCHEMA, ""),
        # A field of a type no column takes: validated, not stored.
        (message("score-id-a-number", api_body(score_fields(score_id=7))), _SCHEMA, ""),
        (message("entity-a-number", api_body(score_fields(entity=42))), _SCHEMA, ""),
        (message("entity-a-list", api_body(score_fields(entity=["a"]))), _SCHEMA, "entity"),
        (
            message("run-id-a-number", api_body(score_fields(evaluation_run_id=3))),
            _SCHEMA,
            "evaluation_run_id",
        ),
        (
            message("naive-created-at", api_body(score_fields(created_at="2024-01-01T00:00:00"))),
            _SCHEMA,
            "created_at",
        ),
        (message("not-json", b'{"score_id": '), DeadLetterReason.INVALID_JSON, ""),
        (
            message("created-at-garbage", api_body(score_fields(created_at="yesterday"))),
            _SCHEMA,
            "created_at",
        ),
        (
            message("text-plain", api_body(score_fields()), content_type="text/plain"),
            DeadLetterReason.UNSUPPORTED_CONTENT_TYPE,
            "content_type",
        ),
        (
            message("unknown-type", api_body(score_fields()), "score.delete.v1"),
            DeadLetterReason.UNSUPPORTED_MESSAGE_TYPE,
            "score.delete.v1",
        ),
    ]
    burst = [*stored_messages[:2], *(poison for poison, _, _ in poisons), *stored_messages[2:]]
    async with connect_broker(settings) as broker:
        await broker.publish(burst, API_EXCHANGE)
        before = decoded_so_far()
        async with running_worker(collecting(settings)) as worker:
            assert await wait_for_count(db, COUNT_SCORES, 3) == 3
            dead = await assert_dead_letters(
                broker,
                {
                    str(poison.headers[CASE_HEADER]): (reason, needle)
                    for poison, reason, needle in poisons
                },
            )
            await wait_until(lambda: worker.persisted == 3, "all counted")
        # The reordered one took the cheap decode; all others but the two refused for their
        # properties were validated.
        assert decoded_since(before) == Checks(api_exchange=1, validation=len(burst) - 3)
        await broker.assert_stays_empty(QUEUE)

    assert await stored_ids(db) == ids_in(no_run, reordered) | {upper["score_id"].lower()}
    assert await db.fetchval(
        "SELECT evaluation_run_id IS NULL FROM scores WHERE prediction_id = 'no-run'"
    )
    for poison, _, _ in poisons:  # a dead letter is the message as it came
        assert dead[str(poison.headers[CASE_HEADER])].body == poison.body


# (d) Through the api's exchange, but PostgreSQL refuses it ------------------------------------


async def test_messages_postgresql_refuses_are_dead_lettered_and_batch_mates_stored(
    settings: Settings, db: asyncpg.Connection
) -> None:
    refused_batch = [score_fields() for _ in range(5)]
    # In the api's form (36 characters, lower case), so decoded cheaply, but no UUID.
    not_a_uuid = "zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz"
    refused_batch[2]["score_id"] = not_a_uuid
    nan_body = api_body(score_fields(value={"x": 1.5})).replace(b"1.5", b"NaN")
    assert b"NaN" in nan_body
    refusals = [
        ("score-id-not-a-uuid", api_body(score_fields(score_id=not_a_uuid)), MESSAGE_TYPE),
        ("nul-in-prediction-id", api_body(score_fields(prediction_id="p\u0000")), MESSAGE_TYPE),
        ("nul-in-value", api_body(score_fields(value={"t": "a\u0000b"})), MESSAGE_TYPE),
        ("nan-value", nan_body, MESSAGE_TYPE),
        (
            "before-year-one-in-utc",
            api_body(score_fields(created_at="0001-01-01T00:00:00+14:00")),
            MESSAGE_TYPE,
        ),
        ("batch-with-a-bad-score-id", batch_of(refused_batch), BATCH_MESSAGE_TYPE),
    ]
    good_singles = [score_fields(prediction_id=f"good-{n}") for n in range(len(refusals) + 1)]
    good_batch = [score_fields(prediction_id=f"good-batch-{n}") for n in range(10)]
    direct = score_fields(prediction_id="direct")
    burst = [message("good-batch", batch_of(good_batch), BATCH_MESSAGE_TYPE)]
    for n, single in enumerate(good_singles):
        burst.append(message(f"good-{n}", api_body(single)))
        if n < len(refusals):
            burst.append(message(*refusals[n]))
    good = [*good_singles, *good_batch, direct]

    async with connect_broker(settings) as broker:
        await broker.publish(burst, API_EXCHANGE)
        await broker.publish([message("direct", api_body(direct))])
        before = decoded_so_far()
        async with running_worker(collecting(settings)) as worker:
            assert await wait_for_count(db, COUNT_SCORES, len(good)) == len(good)
            await assert_dead_letters(broker, {name: (_REJECTED, "") for name, _, _ in refusals})
            # Trusted, each of them: PostgreSQL refused them, not the worker's decoding.
            assert decoded_since(before) == Checks(api_exchange=len(burst), validation=1)
            # The worker is still at work.
            later = score_fields(prediction_id="later")
            await broker.publish([message("later", api_body(later))], API_EXCHANGE)
            assert await wait_for_count(db, COUNT_SCORES, len(good) + 1) == len(good) + 1
            await wait_until(lambda: worker.persisted == len(good) + 1, "all counted")
        await broker.assert_stays_empty(QUEUE)

    assert await stored_ids(db) == ids_in(*good, later)


# (e) Redelivered and replayed messages --------------------------------------------------------


async def test_a_redelivered_message_keeps_the_exchange_it_was_published_to(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """A message a consumer took and never settled (its worker died) comes back with the
    exchange it was published to: the broker's word, not the consumer's."""
    trusted, public = probe(prediction_id="trusted"), probe(prediction_id="public")
    async with connect_broker(settings) as broker:
        await broker.publish([message("trusted", api_body(trusted))], API_EXCHANGE)
        await broker.publish([message("public", api_body(public))])
        connection = await aio_pika.connect(settings.amqp_url, timeout=10)
        async with connection:
            channel = await connection.channel()
            queue = await channel.get_queue(QUEUE, ensure=False)
            held = [await queue.get(no_ack=False, timeout=5) for _ in range(2)]
            assert [(m.exchange, m.redelivered) for m in held] == [
                (API_EXCHANGE, False),
                (EXCHANGE, False),
            ]
        # Closed without acks: both return to the queue.
        assert await broker.wait_for_ready_count(QUEUE, 2) == 2

        before = decoded_so_far()
        redelivered = REGISTRY.get_sample_value(REDELIVERED_METRIC) or 0.0
        async with running_worker(collecting(settings)):
            assert await wait_for_count(db, COUNT_SCORES, 1) == 1
            await assert_dead_letters(broker, {"public": (_SCHEMA, "probe")})
        assert (REGISTRY.get_sample_value(REDELIVERED_METRIC) or 0.0) - redelivered == 2
        assert decoded_since(before) == Checks(api_exchange=1, validation=1)
        await broker.assert_stays_empty(QUEUE)
    assert await stored_ids(db) == ids_in(trusted)


async def test_a_replayed_dead_letter_is_validated_in_full(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """`dlq replay` publishes a new message to `scores`, so what came through `scores.api`
    and was dead-lettered is validated when it comes back, whoever dead-lettered it."""
    probed = probe(prediction_id="probe")
    valid = score_fields(prediction_id="valid")
    nul = score_fields(prediction_id="nul", value={"t": "a\u0000b"})
    async with connect_broker(settings) as broker:
        await broker.publish(
            [message("probe", api_body(probed)), message("valid", api_body(valid))],
            API_EXCHANGE,
        )
        # Dead-lettered by the broker before any worker saw them (rejected, as a worker of
        # an older version could have); x-death remembers they came through scores.api.
        connection = await aio_pika.connect(settings.amqp_url, timeout=10)
        async with connection:
            channel = await connection.channel()
            queue = await channel.get_queue(QUEUE, ensure=False)
            for _ in range(2):
                await (await queue.get(no_ack=False, timeout=5)).reject(requeue=False)
        # Trusted by the worker and refused by PostgreSQL (storage_rejected).
        await broker.publish([message("nul", api_body(nul))], API_EXCHANGE)
        async with running_worker(collecting(settings)) as worker:
            assert await broker.wait_for_ready_count(DEAD_LETTER_QUEUE, 3) == 3

            before = decoded_so_far()
            result = await dlq_ok(settings, "replay")
            assert "replayed 3" in result.stderr, str(result)
            assert await wait_for_count(db, COUNT_SCORES, 1) == 1
            replayed = await assert_dead_letters(
                broker, {"probe": (_SCHEMA, "probe"), "nul": (_SCHEMA, "value")}
            )
            await wait_until(lambda: worker.persisted == 1, "the valid one counted")
        assert decoded_since(before) == Checks(validation=3)
        await broker.assert_stays_empty(QUEUE)
    assert all(letter.headers["x-replay-count"] == 1 for letter in replayed.values())
    assert await stored_ids(db) == ids_in(valid)
