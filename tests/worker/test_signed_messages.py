"""Signed messages end to end: the api signs, the worker trusts what it can verify and
validates everything else, and a signature never costs a score.

Real RabbitMQ, PostgreSQL, api app and worker throughout. Messages come either from the api
itself (posted through its in-process app and taken off scores.persist before any worker
runs), or are built and signed here with the keys in the database, exactly as the api does
(api/publisher.py: pydantic_core.to_json of the message fields, HMAC of type and body).

The worker's shortcut is only observable in one way from outside: a message it can verify is
not validated again, so a body that is storable but breaks the contract (a scorer of another
entity) is stored when signed with a key the worker knows, and dead-lettered as a schema
violation otherwise. The api never publishes such a body; the tests use it as a probe of
which path a message took.
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
from fastapi import FastAPI
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
from shared.settings import MIB, Settings
from shared.signing import SIGNATURE_HEADER, SigningKey, is_signed, new_key, newest_keys, rotate
from shared.topology import QUEUE
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
_SCHEMA = DeadLetterReason.SCHEMA_VIOLATION
_REJECTED = DeadLetterReason.STORAGE_REJECTED


# Keys, messages and the api


@pytest.fixture
async def keys(db: asyncpg.Connection) -> AsyncIterator[list[SigningKey]]:
    """The session database's signing keys, newest first; put back as they were afterwards
    (tests here rotate them, and the table is not emptied between tests)."""
    saved = await db.fetch("SELECT key_id, secret, created_at FROM message_signing_keys")
    found = await newest_keys(db)
    assert found, "migrate creates the first signing key"
    yield found
    async with db.transaction():
        await db.execute("DELETE FROM message_signing_keys")
        await db.executemany(
            "INSERT INTO message_signing_keys (key_id, secret, created_at) VALUES ($1, $2, $3)",
            [tuple(row) for row in saved],
        )


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
    *,
    signature: object = None,
    message_type: str = MESSAGE_TYPE,
    content_type: str = CONTENT_TYPE,
) -> aio_pika.Message:
    """A message as the api publishes it, labelled with its test case, signed if given."""
    headers: dict[str, Any] = {CASE_HEADER: name}
    if signature is not None:
        headers[SIGNATURE_HEADER] = signature
    return aio_pika.Message(
        body=body,
        headers=headers,
        content_type=content_type,
        type=message_type,
        message_id=name,
        app_id="score-ingest",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


def signed(
    name: str,
    key: SigningKey,
    body: bytes,
    message_type: str = MESSAGE_TYPE,
    content_type: str = CONTENT_TYPE,
) -> aio_pika.Message:
    """A message signed with key as the api signs it."""
    return message(
        name,
        body,
        signature=key.sign(message_type, body),
        message_type=message_type,
        content_type=content_type,
    )


def copy_of(taken: AbstractIncomingMessage, *, keep_signature: bool) -> aio_pika.Message:
    """A message taken off a queue, to publish again: every property, with or without its
    signature."""
    headers = dict(taken.headers or {})
    if not keep_signature:
        del headers[SIGNATURE_HEADER]
    return copy_with_headers(taken, headers)


def probe(**changes: Any) -> dict[str, Any]:
    """A storable score that breaks the contract (its scorer is entity "probe"'s, which the
    dead letter's detail names): stored only if trusted."""
    return score_fields(**{"scorer": "weave:///probe/evals/op/probe:1", **changes})


def collecting(settings: Settings, seconds: float = 0.5) -> Settings:
    """Settings whose worker collects a batch for up to seconds after its first message, so
    that messages published before it starts share its batches."""
    return settings.model_copy(update={"worker_flush_interval_seconds": seconds})


def signing_key_of(app: FastAPI) -> SigningKey:
    """The key a started api signs with: it reads the keys as it starts."""
    newest: SigningKey | None = app.state.services.publisher._signing.newest
    assert newest is not None, "the api read no signing key as it started"
    return newest


@dataclass(frozen=True)
class Checks:
    """Messages decoded, by how (the worker's metric `score_ingest_messages_decoded_total`)."""

    signature: float = 0
    validation: float = 0


def decoded_so_far() -> Checks:
    """What this process (its in-process workers, and decode_scores called here) decoded."""
    return Checks(
        *(
            REGISTRY.get_sample_value(DECODED_METRIC, {"check": check}) or 0.0
            for check in ("signature", "validation")
        )
    )


def decoded_since(before: Checks) -> Checks:
    now = decoded_so_far()
    return Checks(now.signature - before.signature, now.validation - before.validation)


@contextlib.asynccontextmanager
async def signing_api(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, SigningKey]]:
    """A client on the real api app, yielded once the app signs what it publishes."""
    async with running_app(settings) as app, client_for(app) as client:
        yield client, signing_key_of(app)


async def take_all(broker: Broker) -> list[AbstractIncomingMessage]:
    """Every message waiting in scores.persist (no worker runs)."""
    count = await broker.ready_count(QUEUE)
    taken = await broker.take(QUEUE, count)
    assert len(taken) == count
    return taken


def normalised(rows: Sequence[ScoreRow]) -> list[tuple[Any, ...]]:
    """Rows with score_id as text: the signed path leaves it as the text asyncpg encodes."""
    return [(str(row.score_id), *row[1:]) for row in rows]


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


# (a) The same rows, signed or not ---------------------------------------------------------------


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
    """Post every VARIED body singly (some through the routes, with an Idempotency-Key), all
    at once (the api gathers them into batch messages), and as batch requests (one per
    project); returns {score_id: (project, body)}."""
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
    async with signing_api(settings) as (client, _):
        for body in (too_deep, too_big):
            response = await client.post(url(PROJECT), json=body, headers=basic_auth(api_key))
            assert response.status_code == 422, response.text


async def test_signed_and_unsigned_api_messages_decode_and_store_the_same_rows(
    settings: Settings, db: asyncpg.Connection, api_key: str, keys: list[SigningKey]
) -> None:
    key_ring = {key.key_id: key for key in keys}
    async with connect_broker(settings) as broker:
        async with signing_api(settings) as (client, signing_with):
            posted = await post_everything(client, api_key)
        assert signing_with == keys[0], "the api signs with the newest key"
        taken = await take_all(broker)

        kinds = {message.type for message in taken}
        assert kinds == {MESSAGE_TYPE, BATCH_MESSAGE_TYPE}
        seen: dict[str, ScoreRow] = {}
        for published in taken:
            assert published.type is not None
            signature = (published.headers or {}).get(SIGNATURE_HEADER)
            assert isinstance(signature, str), published.headers
            assert signature.startswith(keys[0].key_id + ".")
            assert is_signed(key_ring, published.type, published.body, signature)

            before = decoded_so_far()
            trusted = decode_scores(published, key_ring, 16 * MIB)
            # The api's body is in the shape the shortcut expects: it is really taken.
            assert decoded_since(before) == Checks(signature=1)
            before = decoded_so_far()
            validated = decode_scores(published, {}, 16 * MIB)
            assert decoded_since(before) == Checks(validation=1)
            assert normalised(trusted) == normalised(validated)
            for row in (*trusted, *validated):
                assert row.created_at.utcoffset() is not None
            seen.update((str(row.score_id), row) for row in validated)

        # Each score is there once, as posted.
        assert set(seen) == set(posted)
        for score_id, (project, body) in posted.items():
            row = seen[score_id]
            assert (row.entity, row.project) == (ENTITY, project)
            assert row.prediction_id == body["prediction_id"]
            assert row.scorer == body["scorer"]
            assert json.loads(row.value) == body["value"]
            assert row.evaluation_run_id == body.get("evaluation_run_id")

        # Stored by the worker: once from the signed messages, once from the same messages
        # without their signatures. PostgreSQL ends up with the same rows.
        async with running_worker(settings) as worker:
            before = decoded_so_far()
            await broker.publish(copy_of(m, keep_signature=True) for m in taken)
            assert await wait_for_count(db, COUNT_SCORES, len(posted)) == len(posted)
            assert decoded_since(before) == Checks(signature=len(taken))
            from_signed = await stored_rows(db)

            await db.execute("TRUNCATE scores")
            before = decoded_so_far()
            await broker.publish(copy_of(m, keep_signature=False) for m in taken)
            assert await wait_for_count(db, COUNT_SCORES, len(posted)) == len(posted)
            assert decoded_since(before) == Checks(validation=len(taken))
            from_unsigned = await stored_rows(db)
            await wait_until(lambda: worker.persisted == 2 * len(posted), "all counted")
            assert worker.duplicates == 0
        await broker.assert_stays_empty(QUEUE)
        assert await broker.take_dead_letters(1, timeout=0.2) == []

    assert from_signed == from_unsigned
    assert {str(row[0]) for row in from_signed} == set(posted)


# (b) End to end -------------------------------------------------------------------------------


async def test_the_worker_stores_what_the_api_signed_exactly_once(
    settings: Settings, db: asyncpg.Connection, api_key: str, keys: list[SigningKey]
) -> None:
    auth = basic_auth(api_key)
    async with (
        connect_broker(settings) as broker,
        running_worker(settings) as worker,
        signing_api(settings) as (client, signing_with),
    ):
        assert signing_with == keys[0]
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
        # Every message the api published was trusted: 3 singles, the 20 gathered into one
        # or more batch messages, and 2 batch requests.
        checks = decoded_since(before)
        assert checks.validation == 0
        assert 6 <= checks.signature <= 25
        await broker.assert_stays_empty(QUEUE)
        assert await broker.take_dead_letters(1, timeout=0.2) == []

    assert await stored_ids(db) == set(score_ids)
    assert len(set(score_ids)) == total
    created_by = {row["created_by"] for row in await db.fetch("SELECT created_by FROM scores")}
    assert created_by == {api_key.split("_")[1]}, "the id of the key that posted them"


async def test_a_signature_from_a_known_key_skips_validation_and_others_do_not(
    settings: Settings, db: asyncpg.Connection, keys: list[SigningKey]
) -> None:
    """The probe of which path a message takes, which the tests below rely on."""
    trusted, untrusted = probe(), probe()
    async with connect_broker(settings) as broker:
        await broker.publish(
            [
                signed("trusted", keys[0], api_body(trusted)),
                signed("untrusted", new_key(), api_body(untrusted)),
            ]
        )
        before = decoded_so_far()
        async with running_worker(collecting(settings)):
            assert await wait_for_count(db, COUNT_SCORES, 1) == 1
            await assert_dead_letters(broker, {"untrusted": (_SCHEMA, "probe")})
        assert decoded_since(before) == Checks(signature=1, validation=1)
        await broker.assert_stays_empty(QUEUE)
    assert await stored_ids(db) == ids_in(trusted)


# (c) Anything not verifiably signed is validated in full ----------------------------------------


async def test_unverifiable_or_misshapen_signed_messages_are_validated_in_full(
    settings: Settings, db: asyncpg.Connection, keys: list[SigningKey]
) -> None:
    key, stranger = keys[0], new_key()
    valid = [score_fields(prediction_id=f"valid-{n}") for n in range(8)]
    batch_a = [score_fields(prediction_id=f"batch-a-{n}") for n in range(3)]
    batch_b = [score_fields(prediction_id=f"batch-b-{n}") for n in range(4)]
    no_run = without("evaluation_run_id", score_fields(prediction_id="no-run"))
    other_body = api_body(score_fields())

    def wrongly_signed(name: str, body: bytes) -> aio_pika.Message:
        """Signed with a known key's id, but with the last digit of the digest changed."""
        right = key.sign(MESSAGE_TYPE, body)
        return message(name, body, signature=right[:-1] + ("1" if right[-1] == "0" else "0"))

    stored_messages = [
        message("unsigned", api_body(valid[0])),
        signed("unknown-key", stranger, api_body(valid[1])),
        signed("unknown-key-batch", stranger, batch_of(batch_a), BATCH_MESSAGE_TYPE),
        wrongly_signed("wrong-digest", api_body(valid[2])),
        message(
            "digest-of-another-body",
            api_body(valid[3]),
            signature=key.sign(MESSAGE_TYPE, other_body),
        ),
        message(
            "signed-as-single-sent-as-batch",
            batch_of(batch_b),
            signature=key.sign(MESSAGE_TYPE, batch_of(batch_b)),
            message_type=BATCH_MESSAGE_TYPE,
        ),
        message(
            "bytes-signature",
            api_body(valid[4]),
            # The right signature as an AMQP byte array (`x`) rather than a string.
            signature=bytearray(key.sign(MESSAGE_TYPE, api_body(valid[4])).encode()),
        ),
        message("int-signature", api_body(valid[5]), signature=12345),
        message("empty-signature", api_body(valid[6]), signature=""),
        message("key-id-only", api_body(valid[7]), signature=key.key_id),
        # Validly signed, but not in the api's shape (the optional field left out): the
        # shortcut declines it, validation accepts it.
        signed("signed-without-optional-field", key, api_body(no_run)),
    ]
    poisons = [
        (signed("unknown-key-probe", stranger, api_body(probe())), _SCHEMA, "probe"),
        (
            wrongly_signed("wrong-digest-bad-entity", api_body(score_fields(entity="a/b"))),
            _SCHEMA,
            "entity",
        ),
        (
            wrongly_signed(
                "wrong-digest-nul-in-value", api_body(score_fields(value={"t": "a\u0000b"}))
            ),
            _SCHEMA,
            "value",
        ),
        (
            signed("signed-missing-created-by", key, api_body(without("created_by"))),
            _SCHEMA,
            "created_by",
        ),
        (
            signed("signed-missing-score-id", key, api_body(without("score_id"))),
            _SCHEMA,
            "score_id",
        ),
        (
            signed(
                "signed-batch-item-missing-scorer",
                key,
                batch_of([score_fields(), without("scorer"), score_fields()]),
                BATCH_MESSAGE_TYPE,
            ),
            _SCHEMA,
            "scores.1.scorer",
        ),
        (signed("signed-empty-batch", key, batch_of([]), BATCH_MESSAGE_TYPE), _SCHEMA, "scores"),
        (
            signed("signed-batch-not-a-list", key, b'{"scores": {"a": 1}}', BATCH_MESSAGE_TYPE),
            _SCHEMA,
            "scores",
        ),
        (
            signed("signed-batch-under-single-type", key, batch_of([score_fields()])),
            _SCHEMA,
            "scores",
        ),
        (signed("signed-json-array", key, api_body([score_fields()])), _SCHEMA, ""),
        # Validly signed, with a field of a type no column takes: validated, not stored.
        (signed("signed-score-id-a-number", key, api_body(score_fields(score_id=7))), _SCHEMA, ""),
        (signed("signed-entity-a-number", key, api_body(score_fields(entity=42))), _SCHEMA, ""),
        (
            signed("signed-entity-a-list", key, api_body(score_fields(entity=["a"]))),
            _SCHEMA,
            "entity",
        ),
        (
            signed("signed-run-id-a-number", key, api_body(score_fields(evaluation_run_id=3))),
            _SCHEMA,
            "evaluation_run_id",
        ),
        (
            signed(
                "signed-naive-created-at",
                key,
                api_body(score_fields(created_at="2024-01-01T00:00:00")),
            ),
            _SCHEMA,
            "created_at",
        ),
        (signed("signed-not-json", key, b'{"score_id": '), DeadLetterReason.INVALID_JSON, ""),
        (
            signed(
                "signed-created-at-garbage", key, api_body(score_fields(created_at="yesterday"))
            ),
            _SCHEMA,
            "created_at",
        ),
        (
            signed("signed-text-plain", key, api_body(score_fields()), content_type="text/plain"),
            DeadLetterReason.UNSUPPORTED_CONTENT_TYPE,
            "content_type",
        ),
        (
            signed("signed-unknown-type", key, api_body(score_fields()), "score.delete.v1"),
            DeadLetterReason.UNSUPPORTED_MESSAGE_TYPE,
            "score.delete.v1",
        ),
    ]
    good = [*valid, *batch_a, *batch_b, no_run]
    burst: list[aio_pika.Message] = []
    for n, good_one in enumerate(stored_messages):
        burst.append(good_one)
        if n < len(poisons):
            burst.append(poisons[n][0])
    burst += [poison for poison, _, _ in poisons[len(stored_messages) :]]

    async with connect_broker(settings) as broker:
        await broker.publish(burst)
        before = decoded_so_far()
        async with running_worker(collecting(settings)) as worker:
            assert await wait_for_count(db, COUNT_SCORES, len(good)) == len(good)
            dead = await assert_dead_letters(
                broker,
                {
                    str(poison.headers[CASE_HEADER]): (reason, needle)
                    for poison, reason, needle in poisons
                },
            )
            await wait_until(lambda: worker.persisted == len(good), "all counted")
        # None was trusted; all but the two refused for their properties were validated.
        assert decoded_since(before) == Checks(validation=len(burst) - 2)
        await broker.assert_stays_empty(QUEUE)

    assert await stored_ids(db) == ids_in(*good)
    assert await db.fetchval(
        "SELECT evaluation_run_id IS NULL FROM scores WHERE prediction_id = 'no-run'"
    )
    # A dead letter is the message as it came, signature included.
    for poison, _, _ in poisons:
        letter = dead[str(poison.headers[CASE_HEADER])]
        assert letter.body == poison.body
        assert letter.headers.get(SIGNATURE_HEADER) == poison.headers.get(SIGNATURE_HEADER)


# (d) Signed, but PostgreSQL refuses it ----------------------------------------------------------


async def test_signed_messages_postgresql_refuses_are_dead_lettered_and_batch_mates_stored(
    settings: Settings, db: asyncpg.Connection, keys: list[SigningKey]
) -> None:
    key = keys[0]
    refused_batch = [score_fields() for _ in range(5)]
    refused_batch[2]["score_id"] = "nope"
    nan_body = api_body(score_fields(value={"x": 1.5})).replace(b"1.5", b"NaN")
    assert b"NaN" in nan_body
    refusals = [
        ("score-id-not-a-uuid", api_body(score_fields(score_id="not-a-uuid")), MESSAGE_TYPE),
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
    unsigned = score_fields(prediction_id="unsigned")
    burst = [signed("good-batch", key, batch_of(good_batch), BATCH_MESSAGE_TYPE)]
    for n, single in enumerate(good_singles):
        burst.append(signed(f"good-{n}", key, api_body(single)))
        if n < len(refusals):
            name, body, message_type = refusals[n]
            burst.append(signed(name, key, body, message_type))
    burst.append(message("unsigned", api_body(unsigned)))
    good = [*good_singles, *good_batch, unsigned]

    async with connect_broker(settings) as broker:
        await broker.publish(burst)
        before = decoded_so_far()
        async with running_worker(collecting(settings)) as worker:
            assert await wait_for_count(db, COUNT_SCORES, len(good)) == len(good)
            await assert_dead_letters(broker, {name: (_REJECTED, "") for name, _, _ in refusals})
            # Trusted, each of them: PostgreSQL refused them, not the worker's decoding.
            assert decoded_since(before) == Checks(signature=len(burst) - 1, validation=1)
            # The worker is still at work.
            later = score_fields(prediction_id="later")
            await broker.publish([signed("later", key, api_body(later))])
            assert await wait_for_count(db, COUNT_SCORES, len(good) + 1) == len(good) + 1
            await wait_until(lambda: worker.persisted == len(good) + 1, "all counted")
        await broker.assert_stays_empty(QUEUE)

    assert await stored_ids(db) == ids_in(*good, later)


async def test_a_non_ascii_signature_under_a_known_key_id_is_validated(
    settings: Settings, db: asyncpg.Connection, keys: list[SigningKey]
) -> None:
    odd, after = score_fields(prediction_id="odd"), score_fields(prediction_id="after")
    async with connect_broker(settings) as broker:
        async with running_worker(settings):
            odd_message = message("odd", api_body(odd), signature=f"{keys[0].key_id}.\u00e9")
            await broker.publish([odd_message])
            await broker.publish([signed("after", keys[0], api_body(after))])
            assert await wait_for_count(db, COUNT_SCORES, 2) == 2
        await broker.assert_stays_empty(QUEUE)
    assert await stored_ids(db) == ids_in(odd, after)


# (e) Rotation -----------------------------------------------------------------------------------


@dataclass
class Sent:
    """Messages to publish and what must become of them."""

    messages: list[aio_pika.Message]
    stored: list[dict[str, Any]]
    dead: dict[str, tuple[DeadLetterReason, str]]
    checks: Checks


def signed_with(label: str, key: SigningKey, *, trusted: bool) -> Sent:
    """A valid single, a valid batch and a probe signed with key; the probe is stored only
    if the worker trusts key."""
    single = score_fields(prediction_id=f"{label}-single")
    batch = [score_fields(prediction_id=f"{label}-batch-{n}") for n in range(3)]
    probed = probe(prediction_id=f"{label}-probe")
    return Sent(
        [
            signed(f"{label}-single", key, api_body(single)),
            signed(f"{label}-batch", key, batch_of(batch), BATCH_MESSAGE_TYPE),
            signed(f"{label}-probe", key, api_body(probed)),
        ],
        [single, *batch, *([probed] if trusted else [])],
        {} if trusted else {f"{label}-probe": (_SCHEMA, "probe")},
        Checks(signature=3) if trusted else Checks(validation=3),
    )


async def deliver(settings: Settings, db: asyncpg.Connection, sent: Sequence[Sent]) -> None:
    """Publish, run a worker (which reads the keys as it starts), and check the outcome."""
    stored = [score for each in sent for score in each.stored]
    dead = {case: outcome for each in sent for case, outcome in each.dead.items()}
    checks = Checks(
        sum(each.checks.signature for each in sent), sum(each.checks.validation for each in sent)
    )
    async with connect_broker(settings) as broker:
        await broker.publish(m for each in sent for m in each.messages)
        before = decoded_so_far()
        async with running_worker(collecting(settings)):
            assert await wait_for_count(db, COUNT_SCORES, len(stored)) == len(stored)
            await assert_dead_letters(broker, dead)
        assert decoded_since(before) == checks
        await broker.assert_stays_empty(QUEUE)
    assert await stored_ids(db) == ids_in(*stored)
    await db.execute("TRUNCATE scores")


async def test_after_rotation_the_previous_key_is_trusted_and_a_dropped_one_validated(
    settings: Settings, db: asyncpg.Connection, api_key: str, keys: list[SigningKey]
) -> None:
    first = keys[0]
    second = await rotate(db)
    assert [key.key_id for key in await newest_keys(db)] == [second.key_id, first.key_id]
    await deliver(
        settings,
        db,
        [signed_with("first", first, trusted=True), signed_with("second", second, trusted=True)],
    )

    third = await rotate(db)
    assert [key.key_id for key in await newest_keys(db)] == [third.key_id, second.key_id]
    await deliver(
        settings,
        db,
        [
            signed_with("dropped", first, trusted=False),
            signed_with("previous", second, trusted=True),
            signed_with("newest", third, trusted=True),
        ],
    )

    # An api started now signs with the newest key, and the worker stores what it signs.
    async with connect_broker(settings) as broker:
        async with signing_api(settings) as (client, signing_with):
            assert signing_with == third
            response = await client.post(
                url(PROJECT), json=score_body(), headers=basic_auth(api_key)
            )
            assert response.status_code == 200, response.text
        (published,) = await broker.take(QUEUE, 1)
        assert str((published.headers or {})[SIGNATURE_HEADER]).startswith(third.key_id + ".")
        async with running_worker(settings):
            await broker.publish([copy_of(published, keep_signature=True)])
            assert await wait_for_count(db, COUNT_SCORES, 1) == 1
    assert await stored_ids(db) == {response.json()["score_id"]}


async def test_decoding_trusts_exactly_the_keys_it_is_given(
    settings: Settings, keys: list[SigningKey]
) -> None:
    """decode_scores trusts the keys it is handed (the worker hands it its ring's), no others."""
    key, fields = keys[0], probe()
    async with connect_broker(settings) as broker:
        await broker.publish([signed("probe", key, api_body(fields))])
        (published,) = await broker.take(QUEUE, 1)
    (row,) = decode_scores(published, {key.key_id: key}, 16 * MIB)
    assert str(row.score_id) == fields["score_id"]
    stranger = new_key()
    for others in (
        {},
        {stranger.key_id: stranger},
        {key.key_id: SigningKey(key.key_id, bytes(32))},
    ):
        with pytest.raises(PoisonMessage) as poison:
            decode_scores(published, others, 16 * MIB)
        assert poison.value.reason == _SCHEMA
        assert "probe" in poison.value.detail


def test_a_row_has_the_fields_of_the_message_in_order() -> None:
    # _signed_rows reads a signed body field by field; a field added to the contract must be
    # added there too, and this fails until it is.
    assert ScoreRow._fields == tuple(ScoreMessage.model_fields)
