"""POST /v2/{entity}/{project}/scores: the answer, the message it publishes, the row it becomes."""

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import asyncpg
import httpx
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from shared.contract import BATCH_MESSAGE_TYPE, MESSAGE_TYPE, ScoreBatchMessage, ScoreMessage
from shared.topology import API_EXCHANGE, QUEUE, ROUTING_KEY
from tests.conftest import ENTITY, PROJECT, basic_auth, score_body, wait_for_count
from worker.worker import ScoreWorker

URL = f"/v2/{ENTITY}/{PROJECT}/scores"


async def _take_only_message(queue: AbstractQueue) -> AbstractIncomingMessage:
    """The one message on the queue; fails if there is none or more than one."""
    message = await queue.get(no_ack=True, fail=False)
    assert message is not None, f"nothing was published to {QUEUE}"
    assert await queue.get(no_ack=True, fail=False) is None, f"more than one message on {QUEUE}"
    return message


def _key_id(api_key: str) -> str:
    """The public id inside a key `si_<key_id>_<secret>`."""
    prefix, key_id, _ = api_key.split("_", 2)
    assert prefix == "si"
    assert len(key_id) == 16
    return key_id


def _uuid7_time(score_id: uuid.UUID) -> datetime:
    """The creation time a UUIDv7 carries in its first 48 bits (Unix milliseconds)."""
    return datetime.fromtimestamp((score_id.int >> 80) / 1000, tz=UTC)


async def test_answers_only_a_uuid7_score_id(client: httpx.AsyncClient, api_key: str) -> None:
    before = datetime.now(UTC)
    response = await client.post(URL, json=score_body(), headers=basic_auth(api_key))

    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["score_id"]
    score_id = uuid.UUID(body["score_id"])
    assert body["score_id"] == str(score_id), "not the canonical lower-case hyphenated form"
    assert score_id.version == 7
    assert score_id.variant == uuid.RFC_4122
    assert before - timedelta(seconds=1) <= _uuid7_time(score_id) <= datetime.now(UTC)


async def test_each_score_gets_a_new_increasing_id(client: httpx.AsyncClient, api_key: str) -> None:
    ids = []
    for _ in range(10):
        response = await client.post(URL, json=score_body(), headers=basic_auth(api_key))
        assert response.status_code == 200, response.text
        ids.append(uuid.UUID(response.json()["score_id"]))

    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids), "score ids must be time-ordered"


async def test_concurrent_posts_are_each_published_once_and_may_share_a_message(
    client: httpx.AsyncClient, api_key: str, persist_queue: AbstractQueue
) -> None:
    responses = await asyncio.gather(
        *(
            client.post(URL, json=score_body(prediction_id=f"p{i}"), headers=basic_auth(api_key))
            for i in range(50)
        )
    )
    assert [r.status_code for r in responses] == [200] * 50
    answered = [r.json()["score_id"] for r in responses]
    assert len(set(answered)) == 50

    # Posts served in the same turn of the event loop travel as one score.batch.v1 message.
    published: list[str] = []
    messages = 0
    while (message := await persist_queue.get(no_ack=True, fail=False)) is not None:
        messages += 1
        if message.type == BATCH_MESSAGE_TYPE:
            batch = ScoreBatchMessage.model_validate_json(message.body)
            published += [str(score.score_id) for score in batch.scores]
        else:
            assert message.type == MESSAGE_TYPE
            published.append(str(ScoreMessage.model_validate_json(message.body).score_id))
            assert message.message_id == published[-1]
    assert sorted(published) == sorted(answered)
    assert 1 <= messages <= 50


async def test_publishes_the_score_message_to_scores_persist(
    client: httpx.AsyncClient, api_key: str, persist_queue: AbstractQueue
) -> None:
    body = score_body(
        prediction_id="pred-42",
        scorer=f"weave:///{ENTITY}/{PROJECT}/object/Judge:v3digest/attr/rubric",
        value={"correct": False, "reasons": ["too long", "off topic"]},
        evaluation_run_id="eval-run-7",
    )
    before = datetime.now(UTC)
    response = await client.post(URL, json=body, headers=basic_auth(api_key))
    assert response.status_code == 200, response.text
    score_id = response.json()["score_id"]

    message = await _take_only_message(persist_queue)
    assert message.exchange == API_EXCHANGE
    assert message.routing_key == ROUTING_KEY
    assert message.content_type == "application/json"
    assert message.type == "score.create.v1"
    assert message.message_id == score_id
    assert int(message.delivery_mode or 0) == aio_pika.DeliveryMode.PERSISTENT.value == 2

    score = ScoreMessage.model_validate_json(message.body)
    assert str(score.score_id) == score_id
    assert (score.entity, score.project) == (ENTITY, PROJECT)
    assert score.prediction_id == "pred-42"
    assert score.scorer == body["scorer"]
    assert score.value == {"correct": False, "reasons": ["too long", "off topic"]}
    assert score.evaluation_run_id == "eval-run-7"
    assert score.created_by == _key_id(api_key)
    assert before - timedelta(seconds=1) <= score.created_at <= datetime.now(UTC)


async def test_entity_and_project_come_from_the_url(
    client: httpx.AsyncClient, api_key: str, persist_queue: AbstractQueue
) -> None:
    response = await client.post(
        f"/v2/{ENTITY}/other-project/scores", json=score_body(), headers=basic_auth(api_key)
    )
    assert response.status_code == 200, response.text

    score = ScoreMessage.model_validate_json((await _take_only_message(persist_queue)).body)
    assert (score.entity, score.project) == (ENTITY, "other-project")


async def test_omitted_evaluation_run_id_is_published_as_null(
    client: httpx.AsyncClient, api_key: str, persist_queue: AbstractQueue
) -> None:
    body = score_body()
    del body["evaluation_run_id"]
    response = await client.post(URL, json=body, headers=basic_auth(api_key))
    assert response.status_code == 200, response.text

    published = json.loads((await _take_only_message(persist_queue)).body)
    assert "evaluation_run_id" in published
    assert published["evaluation_run_id"] is None


def _typed(value: Any) -> Any:
    """value with every JSON scalar tagged by its type, so that 1, 1.0 and True differ."""
    if isinstance(value, dict):
        return {key: _typed(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_typed(item) for item in value]
    return (type(value).__name__, value)


def _nested(depth: int) -> Any:
    value: Any = "bottom"
    for level in range(depth):
        value = [value] if level % 2 else {"level": value}
    return value


# Floats are chosen to keep a fractional part: jsonb stores numbers as numeric, so 1e16
# would come back as the equal JSON number 10000000000000000, which Python reads as an int.
ROUND_TRIP_VALUES: dict[str, Any] = {
    "null": None,
    "true": True,
    "false": False,
    "zero": 0,
    "negative int": -17,
    "40-digit int": 1234567890123456789012345678901234567890,
    "negative 40-digit int": -9876543210987654321098765432109876543210,
    "float": 0.75,
    "negative float": -2.5e-05,
    "small float": 1e-07,
    "pi": 3.141592653589793,
    "float one": 1.0,
    "empty string": "",
    "unicode": "héllo wörld ✓ 日本語 한국어 🎉👩‍🔬",
    "control chars": "tab\there\nline\rcarriage\x01\x1f\x7f\b\f",
    "quotes and escapes": '"quoted" \\backslash\\ /slash/ \\u0000 as text',
    "line separators": "\u2028\u2029\ufeff\uffff",
    "empty list": [],
    "empty object": {},
    "nested": {
        "a": {"b": [1, 2.5, None, True, {"c": "d"}]},
        "": "empty key",
        "emoji 🎯 key": [[], {}],
        "tab\tkey": {"\n": "newline key"},
    },
    "list of kinds": [None, False, 0, -0.5, "x", [1], {"y": 2}],
    "64 levels deep": _nested(64),
}


async def test_values_round_trip_exactly_to_postgresql(
    client: httpx.AsyncClient, api_key: str, worker: ScoreWorker, db: asyncpg.Connection
) -> None:
    sent: dict[str, str] = {}
    for name, value in ROUND_TRIP_VALUES.items():
        response = await client.post(URL, json=score_body(value=value), headers=basic_auth(api_key))
        assert response.status_code == 200, f"{name}: {response.text}"
        sent[response.json()["score_id"]] = name

    stored_count = await wait_for_count(db, "SELECT count(*) FROM scores", len(sent))
    assert stored_count == len(sent)
    rows = await db.fetch("SELECT score_id::text AS score_id, value::text AS value FROM scores")
    stored = {sent[row["score_id"]]: json.loads(row["value"]) for row in rows}
    mismatches = {
        name: (value, stored[name])
        for name, value in ROUND_TRIP_VALUES.items()
        if _typed(stored[name]) != _typed(value)
    }
    assert mismatches == {}


async def test_stored_row_carries_every_field(
    client: httpx.AsyncClient, api_key: str, worker: ScoreWorker, db: asyncpg.Connection
) -> None:
    body = score_body(prediction_id="pred-1", evaluation_run_id="run-9")
    started = time.time()
    response = await client.post(URL, json=body, headers=basic_auth(api_key))
    assert response.status_code == 200, response.text
    score_id = response.json()["score_id"]

    assert await wait_for_count(db, "SELECT count(*) FROM scores", 1) == 1
    row = await db.fetchrow("SELECT * FROM scores")
    assert row is not None
    assert str(row["score_id"]) == score_id
    assert (row["entity"], row["project"]) == (ENTITY, PROJECT)
    assert (row["prediction_id"], row["scorer"]) == ("pred-1", body["scorer"])
    assert row["evaluation_run_id"] == "run-9"
    assert row["created_by"] == _key_id(api_key)
    assert json.loads(row["value"]) == body["value"]
    assert started - 1 <= row["created_at"].timestamp() <= row["persisted_at"].timestamp()
