"""POST /v2/{entity}/{project}/scores/batch: request order, limits, all-or-nothing validation."""

import json
from typing import Any

import aio_pika
import asyncpg
import httpx
import pytest

from api.keys import create_key
from api.schemas import MAX_BATCH_ITEMS
from shared.contract import BATCH_MESSAGE_TYPE, CONTENT_TYPE, ScoreBatchMessage
from shared.settings import MIB, Settings
from shared.topology import QUEUE
from tests.conftest import ENTITY, PROJECT, basic_auth, score_body, wait_for_count
from tests.support.processes import connect_broker
from worker.worker import ScoreWorker

URL = f"/v2/{ENTITY}/{PROJECT}/scores"
BATCH_URL = f"{URL}/batch"
COUNT_SCORES = "SELECT count(*) FROM scores"
# Everything a row holds that does not differ from score to score by nature.
ROW_COLUMNS = "entity, project, prediction_id, scorer, value, evaluation_run_id, created_by"


def _items(count: int) -> list[dict[str, object]]:
    return [score_body(prediction_id=f"item-{i}", value={"i": i}) for i in range(count)]


async def _post_batch(
    client: httpx.AsyncClient, api_key: str, items: list[dict[str, object]]
) -> list[str]:
    response = await client.post(BATCH_URL, json={"scores": items}, headers=basic_auth(api_key))
    assert response.status_code == 200, response.text
    body = response.json()
    assert list(body) == ["score_ids"]
    score_ids: list[str] = body["score_ids"]
    return score_ids


async def _ready_count(settings: Settings) -> int:
    async with connect_broker(settings) as broker:
        return await broker.ready_count(QUEUE)


async def _assert_nothing_published(settings: Settings) -> None:
    async with connect_broker(settings) as broker:
        await broker.assert_stays_empty(QUEUE)


async def test_score_ids_come_in_request_order(
    client: httpx.AsyncClient, api_key: str, db: asyncpg.Connection, worker: ScoreWorker
) -> None:
    items = _items(50)

    score_ids = await _post_batch(client, api_key, items)

    assert len(score_ids) == len(set(score_ids)) == 50
    assert await wait_for_count(db, COUNT_SCORES, 50) == 50
    rows = await db.fetch("SELECT score_id::text, prediction_id, value FROM scores")
    by_id = {row["score_id"]: row for row in rows}
    for i, score_id in enumerate(score_ids):
        assert by_id[score_id]["prediction_id"] == f"item-{i}"
        assert json.loads(by_id[score_id]["value"]) == {"i": i}
    # Created in request order, so listed in request order.
    listed = await client.get(URL, headers=basic_auth(api_key))
    assert [json.loads(line)["score_id"] for line in listed.text.splitlines()] == score_ids


async def test_a_batch_larger_than_a_single_body_may_be_is_accepted(
    client: httpx.AsyncClient,
    api_key: str,
    db: asyncpg.Connection,
    worker: ScoreWorker,
    settings: Settings,
) -> None:
    items = [score_body(prediction_id=f"item-{i}", value="v" * 3000) for i in range(500)]
    assert len(json.dumps({"scores": items})) > settings.max_body_bytes

    score_ids = await _post_batch(client, api_key, items)

    assert len(set(score_ids)) == 500
    assert await wait_for_count(db, COUNT_SCORES, 500, timeout=20) == 500


async def test_the_most_items_pass_and_one_more_is_422(
    client: httpx.AsyncClient, api_key: str, settings: Settings
) -> None:
    assert MAX_BATCH_ITEMS == 1000

    score_ids = await _post_batch(client, api_key, _items(MAX_BATCH_ITEMS))
    assert len(set(score_ids)) == MAX_BATCH_ITEMS
    assert await _ready_count(settings) == 1  # one score.batch.v1 message carries them all

    response = await client.post(
        BATCH_URL, json={"scores": _items(MAX_BATCH_ITEMS + 1)}, headers=basic_auth(api_key)
    )
    assert response.status_code == 422, response.text
    assert [error["loc"] for error in response.json()["detail"]] == [["body", "scores"]]
    assert await _ready_count(settings) == 1


async def test_a_batch_is_published_as_one_batch_message_in_request_order(
    client: httpx.AsyncClient, api_key: str, settings: Settings
) -> None:
    score_ids = await _post_batch(client, api_key, _items(3))

    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        queue = await (await connection.channel()).get_queue(QUEUE, ensure=False)
        message = await queue.get(no_ack=True, fail=True)
        assert message is not None
        assert await queue.get(no_ack=True, fail=False) is None
    assert (message.type, message.content_type) == (BATCH_MESSAGE_TYPE, CONTENT_TYPE)
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    batch = ScoreBatchMessage.model_validate_json(message.body)
    assert [str(score.score_id) for score in batch.scores] == score_ids
    assert [score.prediction_id for score in batch.scores] == ["item-0", "item-1", "item-2"]
    assert message.message_id not in score_ids


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"scores": []}, ["body", "scores"]),
        ({}, ["body", "scores"]),
        ({"scores": None}, ["body", "scores"]),
        ({"scores": score_body()}, ["body", "scores"]),
        ([score_body()], ["body"]),
    ],
    ids=["empty", "missing", "null", "not-a-list", "bare-list"],
)
async def test_a_batch_without_a_list_of_scores_is_422(
    client: httpx.AsyncClient, api_key: str, settings: Settings, body: Any, loc: list[str]
) -> None:
    response = await client.post(BATCH_URL, json=body, headers=basic_auth(api_key))

    assert response.status_code == 422, response.text
    assert [error["loc"] for error in response.json()["detail"]] == [loc]
    await _assert_nothing_published(settings)


@pytest.mark.parametrize(
    ("size", "index", "field", "bad"),
    [
        (50, 17, "scorer", "not-a-weave-ref"),
        (50, 0, "prediction_id", ""),
        (50, 49, "evaluation_run_id", "x" * 257),
        (50, 3, "value", {"text": "nul \u0000 inside"}),
        (MAX_BATCH_ITEMS, MAX_BATCH_ITEMS - 1, "scorer", 42),
    ],
    ids=["scorer", "prediction_id", "evaluation_run_id", "value", "last-of-1000"],
)
async def test_one_invalid_item_fails_the_whole_batch(
    client: httpx.AsyncClient,
    api_key: str,
    settings: Settings,
    size: int,
    index: int,
    field: str,
    bad: object,
) -> None:
    items = _items(size)
    items[index] = {**items[index], field: bad}

    response = await client.post(BATCH_URL, json={"scores": items}, headers=basic_auth(api_key))

    assert response.status_code == 422, response.text
    assert [error["loc"] for error in response.json()["detail"]] == [
        ["body", "scores", index, field]
    ]
    await _assert_nothing_published(settings)


async def test_a_missing_field_names_its_item(
    client: httpx.AsyncClient, api_key: str, settings: Settings
) -> None:
    items = _items(30)
    del items[17]["scorer"]
    del items[21]["prediction_id"]

    response = await client.post(BATCH_URL, json={"scores": items}, headers=basic_auth(api_key))

    assert response.status_code == 422, response.text
    assert [error["loc"] for error in response.json()["detail"]] == [
        ["body", "scores", 17, "scorer"],
        ["body", "scores", 21, "prediction_id"],
    ]
    await _assert_nothing_published(settings)


async def test_batch_scores_are_stored_exactly_like_single_ones(
    client: httpx.AsyncClient, api_key: str, db: asyncpg.Connection, worker: ScoreWorker
) -> None:
    bodies = [
        score_body(
            prediction_id="same",
            scorer=f"weave:///{ENTITY}/{PROJECT}/object/Judge:v3digest/attr/rubric",
            value={"nested": [1, 2.5, None, "ü"], "ok": True},
            evaluation_run_id="run-9",
        ),
        score_body(prediction_id="no-run", value=None, evaluation_run_id=None),
    ]
    singles = []
    for body in bodies:
        response = await client.post(URL, json=body, headers=basic_auth(api_key))
        assert response.status_code == 200, response.text
        singles.append(response.json()["score_id"])
    batched = await _post_batch(client, api_key, bodies)
    assert await wait_for_count(db, COUNT_SCORES, 4) == 4

    query = f"SELECT {ROW_COLUMNS} FROM scores WHERE score_id = $1"
    for single, batch in zip(singles, batched, strict=True):
        single_row = await db.fetchrow(query, single)
        batch_row = await db.fetchrow(query, batch)
        assert single_row is not None
        assert batch_row is not None
        assert dict(batch_row) == dict(single_row)
        assert batch_row["created_by"] == api_key.split("_")[1]
        assert (batch_row["entity"], batch_row["project"]) == (ENTITY, PROJECT)


async def test_a_batch_over_the_byte_limit_is_413(
    client: httpx.AsyncClient, api_key: str, settings: Settings
) -> None:
    assert settings.max_batch_body_bytes == 16 * MIB
    items = [score_body(value="v" * MIB) for _ in range(17)]

    response = await client.post(BATCH_URL, json={"scores": items}, headers=basic_auth(api_key))

    assert response.status_code == 413, response.text
    assert "16777216" in response.json()["detail"]
    await _assert_nothing_published(settings)


async def test_a_batch_needs_a_key_for_the_project(
    client: httpx.AsyncClient, api_key: str, db: asyncpg.Connection, settings: Settings
) -> None:
    _, other_entity_key = await create_key(db, "globex")
    _, other_project_key = await create_key(db, ENTITY, projects=["other-evals"])
    batch = {"scores": _items(3)}

    response = await client.post(BATCH_URL, json=batch)
    assert response.status_code == 401, response.text
    for key in (other_entity_key, other_project_key):
        response = await client.post(BATCH_URL, json=batch, headers=basic_auth(key))
        assert response.status_code == 403, response.text
    await _assert_nothing_published(settings)
