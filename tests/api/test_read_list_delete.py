"""Reading, listing and deleting scores: exact bodies, project scoping, JSON Lines, tombstones."""

import asyncio
import json
import re
import uuid
from typing import Any

import asyncpg
import httpx
import pytest

from api.keys import create_key
from api.schemas import DEFAULT_LIST_LIMIT, MAX_DELETE_IDS, MAX_LIST_LIMIT, MAX_LIST_OFFSET
from shared.contract import ScoreMessage
from shared.ids import new_score_id
from shared.score_fields import FIELD_NAMES
from shared.settings import Settings
from shared.topology import DEAD_LETTER_QUEUE, QUEUE
from tests.conftest import ENTITY, PROJECT, basic_auth, bearer_auth, score_body, wait_for_count
from tests.support.processes import (
    Broker,
    api_process,
    connect_broker,
    running_worker,
    score_message,
    wait_until,
)
from tests.support.rows import copy_scores
from worker import sql as worker_sql
from worker.decode import row_of
from worker.worker import ScoreWorker

OTHER_PROJECT = "other-evals"
OTHER_ENTITY = "globex"
READ_FIELDS = {"score_id", "scorer", "value", "evaluation_run_id", "wb_user_id"}
COUNT_SCORES = "SELECT count(*) FROM scores"
COUNT_STORED = "SELECT count(*) FROM scores WHERE score_id = ANY($1::uuid[])"
COUNT_LOCK_WAITERS = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND wait_event_type = 'Lock'
"""
BIG_LIST_ROWS = 200_000


def _url(entity: str = ENTITY, project: str = PROJECT) -> str:
    return f"/v2/{entity}/{project}/scores"


def _key_id(api_key: str) -> str:
    """The public id inside a key `si_<key_id>_<secret>`."""
    prefix, key_id, _ = api_key.split("_", 2)
    assert prefix == "si"
    assert re.fullmatch("[0-9a-f]{16}", key_id), key_id
    return key_id


async def _create(
    client: httpx.AsyncClient,
    api_key: str,
    entity: str = ENTITY,
    project: str = PROJECT,
    **overrides: object,
) -> str:
    # A scorer must be the entity's own.
    body = score_body(**{"scorer": f"weave:///{entity}/{project}/op/f:1", **overrides})
    response = await client.post(_url(entity, project), json=body, headers=basic_auth(api_key))
    assert response.status_code == 200, response.text
    score_id: str = response.json()["score_id"]
    return score_id


async def _wait_stored(db: asyncpg.Connection, score_ids: list[str], timeout: float = 10) -> None:
    stored = await wait_for_count(db, COUNT_STORED, len(score_ids), score_ids, timeout=timeout)
    assert stored == len(score_ids), f"only {stored} of {len(score_ids)} scores were stored"


async def _stored_count(db: asyncpg.Connection, score_ids: list[str]) -> int:
    count: int = await db.fetchval(COUNT_STORED, score_ids)
    return count


async def _list(
    client: httpx.AsyncClient, api_key: str, url: str = _url(), **params: Any
) -> list[dict[str, Any]]:
    response = await client.get(url, params=params, headers=basic_auth(api_key))
    assert response.status_code == 200, response.text
    return _json_lines(response)


def _json_lines(response: httpx.Response) -> list[dict[str, Any]]:
    """The objects of a JSON Lines body, checking that every line is one JSON object."""
    assert response.headers["content-type"].split(";")[0] == "application/jsonl"
    text = response.text
    if not text:
        return []
    assert text.endswith("\n"), "the last line must be terminated"
    objects = []
    for line in text.removesuffix("\n").split("\n"):
        item = json.loads(line)
        assert isinstance(item, dict), line
        assert set(item) == READ_FIELDS, line
        objects.append(item)
    return objects


async def _delete(
    client: httpx.AsyncClient,
    api_key: str,
    score_ids: list[str],
    entity: str = ENTITY,
    project: str = PROJECT,
) -> int:
    response = await client.delete(
        _url(entity, project), params={"score_ids": score_ids}, headers=basic_auth(api_key)
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert list(body) == ["num_deleted"]
    num_deleted: int = body["num_deleted"]
    return num_deleted


async def _take_published(broker: Broker) -> ScoreMessage:
    """Remove the one message the API published from scores.persist and return its score."""
    (message,) = await broker.take(QUEUE, 1)
    return ScoreMessage.model_validate_json(message.body)


async def _wait_processed(worker: ScoreWorker, messages: int, timeout: float = 15) -> None:
    """Wait until the worker has stored or skipped (as duplicate or deleted) this many messages."""
    await wait_until(
        lambda: worker.persisted + worker.duplicates >= messages,
        f"worker processed {messages} messages",
        timeout,
    )


async def test_read_returns_the_stored_score_exactly(
    client: httpx.AsyncClient, api_key: str, db: asyncpg.Connection, worker: ScoreWorker
) -> None:
    scorer = f"weave:///{ENTITY}/{PROJECT}/object/Judge:v3digest/attr/rubric"
    values: list[object] = [
        {"correct": True, "score": 0.75, "labels": ["a", "b"], "nested": {"none": None}},
        None,
        42,
        -2.5,
        "héllo ✓",
        [1, "two", {"three": 3}],
        10**30,
    ]
    created = []
    for i, value in enumerate(values):
        run = "run-7" if i % 2 else None
        score_id = await _create(client, api_key, scorer=scorer, value=value, evaluation_run_id=run)
        created.append((score_id, value, run))
    await _wait_stored(db, [score_id for score_id, _, _ in created])

    for score_id, value, run in created:
        response = await client.get(f"{_url()}/{score_id}", headers=basic_auth(api_key))
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
        assert response.json() == {
            "score_id": score_id,
            "scorer": scorer,
            "value": value,
            "evaluation_run_id": run,
            "wb_user_id": _key_id(api_key),
        }


async def test_read_is_404_until_the_worker_stored_the_score(
    client: httpx.AsyncClient, api_key: str, db: asyncpg.Connection, settings: Settings
) -> None:
    score_id = await _create(client, api_key)

    response = await client.get(f"{_url()}/{score_id}", headers=basic_auth(api_key))
    assert response.status_code == 404, response.text
    assert isinstance(response.json()["detail"], str)

    async with running_worker(settings):
        await _wait_stored(db, [score_id])
    response = await client.get(f"{_url()}/{score_id}", headers=basic_auth(api_key))
    assert response.status_code == 200, response.text


async def test_read_is_404_after_delete(
    client: httpx.AsyncClient, api_key: str, db: asyncpg.Connection, worker: ScoreWorker
) -> None:
    score_id = await _create(client, api_key)
    await _wait_stored(db, [score_id])

    assert await _delete(client, api_key, [score_id]) == 1

    response = await client.get(f"{_url()}/{score_id}", headers=basic_auth(api_key))
    assert response.status_code == 404, response.text


async def test_read_never_leaks_a_score_of_another_project_or_entity(
    client: httpx.AsyncClient, api_key: str, db: asyncpg.Connection, worker: ScoreWorker
) -> None:
    _, globex_key = await create_key(db, OTHER_ENTITY, name="globex")
    ours = await _create(client, api_key)
    theirs = await _create(client, globex_key, entity=OTHER_ENTITY, project=PROJECT)
    await _wait_stored(db, [ours, theirs])

    async def read(url: str, key: str) -> httpx.Response:
        # The ids are recent, so a read of one not in the project waits before its 404; a
        # short wait, not READ_WAIT_SECONDS, and what it finds after waiting is tested too.
        return await client.get(url, params={"wait_ms": 200}, headers=basic_auth(key))

    # Same entity, other project: the key may read there, but the score is not there.
    response = await read(f"{_url(project=OTHER_PROJECT)}/{ours}", api_key)
    assert response.status_code == 404, response.text
    # Another entity's score, asked for under our own project, and under another of theirs.
    response = await read(f"{_url()}/{theirs}", api_key)
    assert response.status_code == 404, response.text
    response = await read(f"{_url(OTHER_ENTITY, OTHER_PROJECT)}/{theirs}", globex_key)
    assert response.status_code == 404, response.text
    # Where they are stored, both are readable.
    for url, key in ((f"{_url()}/{ours}", api_key), (f"{_url(OTHER_ENTITY)}/{theirs}", globex_key)):
        response = await read(url, key)
        assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "score_id",
    [
        "not-a-uuid",
        "12345",
        "0192f0b4-6b7e-7c2a-9f3e-1a2b3c4d5e6",
        "0192f0b4-6b7e-7c2a-9f3e-1a2b3c4d5e6fg",
    ],
)
async def test_read_rejects_a_score_id_that_is_not_a_uuid(
    client: httpx.AsyncClient, api_key: str, score_id: str
) -> None:
    response = await client.get(f"{_url()}/{score_id}", headers=basic_auth(api_key))

    assert response.status_code == 422, response.text
    assert [error["loc"] for error in response.json()["detail"]] == [["path", "score_id"]]


@pytest.mark.parametrize(
    ("method", "url", "params", "allowed_status"),
    [
        ("GET", f"{_url()}/{uuid.UUID(int=1)}", {}, 404),
        ("GET", _url(), {}, 200),
        ("DELETE", _url(), {"score_ids": [str(uuid.UUID(int=1))]}, 200),
    ],
    ids=["read", "list", "delete"],
)
async def test_reads_and_deletes_need_a_key_for_the_project(
    client: httpx.AsyncClient,
    api_key: str,
    db: asyncpg.Connection,
    method: str,
    url: str,
    params: dict[str, Any],
    allowed_status: int,
) -> None:
    _, other_entity_key = await create_key(db, OTHER_ENTITY)
    _, other_project_key = await create_key(db, ENTITY, projects=[OTHER_PROJECT])

    wrong_secret = api_key[:-1] + ("A" if api_key[-1] != "A" else "B")
    for headers in ({}, bearer_auth("si_not_a_key"), basic_auth(wrong_secret)):
        response = await client.request(method, url, params=params, headers=headers)
        assert response.status_code == 401, response.text
        assert "Basic" in response.headers["www-authenticate"]
    for key in (other_entity_key, other_project_key):
        response = await client.request(method, url, params=params, headers=basic_auth(key))
        assert response.status_code == 403, response.text
    for headers in (basic_auth(api_key), bearer_auth(api_key)):
        response = await client.request(method, url, params=params, headers=headers)
        assert response.status_code == allowed_status, response.text


async def test_list_is_json_lines_of_read_bodies_in_creation_order(
    client: httpx.AsyncClient, api_key: str, db: asyncpg.Connection, worker: ScoreWorker
) -> None:
    created = [
        await _create(
            client,
            api_key,
            prediction_id=f"p-{i}",
            value={"i": i},
            evaluation_run_id=f"run-{i % 2}",
        )
        for i in range(12)
    ]
    await _wait_stored(db, created)

    response = await client.get(_url(), headers=basic_auth(api_key))
    assert response.status_code == 200, response.text
    listed = _json_lines(response)

    assert [item["score_id"] for item in listed] == created
    for item in listed:
        read = await client.get(f"{_url()}/{item['score_id']}", headers=basic_auth(api_key))
        assert read.json() == item
    assert [item["value"] for item in listed] == [{"i": i} for i in range(12)]
    assert {item["wb_user_id"] for item in listed} == {_key_id(api_key)}


async def test_list_of_an_empty_project_is_an_empty_body(
    client: httpx.AsyncClient, api_key: str
) -> None:
    response = await client.get(_url(), headers=basic_auth(api_key))

    assert response.status_code == 200, response.text
    assert response.headers["content-type"].split(";")[0] == "application/jsonl"
    assert response.content == b""


async def test_list_filters_by_evaluation_run(
    client: httpx.AsyncClient, api_key: str, db: asyncpg.Connection, worker: ScoreWorker
) -> None:
    runs = ["run-a", "run-b", None, "run-a", "run-b", "run-a"]
    created = [await _create(client, api_key, evaluation_run_id=run) for run in runs]
    await _wait_stored(db, created)

    for run in ("run-a", "run-b"):
        listed = await _list(client, api_key, evaluation_run_id=run)
        expected = [score_id for score_id, r in zip(created, runs, strict=True) if r == run]
        assert [item["score_id"] for item in listed] == expected
        assert {item["evaluation_run_id"] for item in listed} == {run}
    assert await _list(client, api_key, evaluation_run_id="run-none-such") == []


async def test_list_pages_concatenate_to_the_whole_list(
    client: httpx.AsyncClient, api_key: str, db: asyncpg.Connection, worker: ScoreWorker
) -> None:
    created = [
        await _create(client, api_key, evaluation_run_id="run-a" if i % 3 else "run-b")
        for i in range(23)
    ]
    await _wait_stored(db, created)

    for run, expected in (
        (None, created),
        ("run-a", [score_id for i, score_id in enumerate(created) if i % 3]),
    ):
        filters = {} if run is None else {"evaluation_run_id": run}
        pages = [
            [
                item["score_id"]
                for item in await _list(client, api_key, limit=5, offset=offset, **filters)
            ]
            for offset in range(0, len(expected) + 5, 5)
        ]
        assert all(len(page) == 5 for page in pages[:-2]), pages
        assert pages[-1] == [], "a page past the end is empty"
        assert [score_id for page in pages for score_id in page] == expected
    listed = await _list(client, api_key, limit=1, offset=22)
    assert [item["score_id"] for item in listed] == created[22:]


@pytest.mark.parametrize(
    ("params", "loc"),
    [
        ({"limit": 0}, ["query", "limit"]),
        ({"limit": -1}, ["query", "limit"]),
        ({"limit": MAX_LIST_LIMIT + 1}, ["query", "limit"]),
        ({"limit": "ten"}, ["query", "limit"]),
        ({"offset": -1}, ["query", "offset"]),
        ({"offset": MAX_LIST_OFFSET + 1}, ["query", "offset"]),
        ({"after": "not-a-uuid"}, ["query", "after"]),
        ({"evaluation_run_id": ""}, ["query", "evaluation_run_id"]),
    ],
)
async def test_list_rejects_out_of_bounds_paging(
    client: httpx.AsyncClient, api_key: str, params: dict[str, Any], loc: list[str]
) -> None:
    response = await client.get(_url(), params=params, headers=basic_auth(api_key))

    assert response.status_code == 422, response.text
    assert [error["loc"] for error in response.json()["detail"]] == [loc]


@pytest.mark.parametrize("offset", [2**63 - 1, 2**63, 10**30])
async def test_list_answers_any_offset_without_a_server_error(
    client: httpx.AsyncClient, api_key: str, offset: int
) -> None:
    response = await client.get(_url(), params={"offset": offset}, headers=basic_auth(api_key))

    # Past every row there is nothing to list; an offset it will not take is the client's error.
    if response.status_code == 200:
        assert response.content == b""
    else:
        assert response.status_code == 422, response.text
        assert [error["loc"] for error in response.json()["detail"]] == [["query", "offset"]]


async def test_list_accepts_the_maximum_limit(client: httpx.AsyncClient, api_key: str) -> None:
    response = await client.get(
        _url(), params={"limit": MAX_LIST_LIMIT}, headers=basic_auth(api_key)
    )

    assert response.status_code == 200, response.text


async def test_list_never_shows_another_projects_scores(
    client: httpx.AsyncClient, api_key: str, db: asyncpg.Connection, worker: ScoreWorker
) -> None:
    _, globex_key = await create_key(db, OTHER_ENTITY)
    ours = [await _create(client, api_key) for _ in range(3)]
    other_project = [await _create(client, api_key, project=OTHER_PROJECT) for _ in range(2)]
    other_entity = [await _create(client, globex_key, entity=OTHER_ENTITY) for _ in range(2)]
    await _wait_stored(db, ours + other_project + other_entity)

    for url, key, expected in (
        (_url(), api_key, ours),
        (_url(project=OTHER_PROJECT), api_key, other_project),
        (_url(OTHER_ENTITY), globex_key, other_entity),
        (_url(OTHER_ENTITY, OTHER_PROJECT), globex_key, []),
    ):
        listed = await _list(client, api_key=key, url=url, evaluation_run_id="run-1")
        assert [item["score_id"] for item in listed] == expected
        listed = await _list(client, api_key=key, url=url)
        assert [item["score_id"] for item in listed] == expected


async def test_list_streams_a_large_project_in_order(
    settings: Settings, api_key: str, db: asyncpg.Connection
) -> None:
    expected = await copy_scores(db, BIG_LIST_ROWS, created_by=_key_id(api_key))

    async with (
        api_process(settings) as api,
        httpx.AsyncClient(base_url=api.base_url, headers=basic_auth(api_key), timeout=30) as http,
    ):
        async with http.stream("GET", _url(), params={"limit": BIG_LIST_ROWS}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].split(";")[0] == "application/jsonl"
            assert "content-length" not in response.headers, "a stream has no length up front"
            position = 0
            async for line in response.aiter_lines():
                item = json.loads(line)
                assert item["score_id"] == expected[position], f"line {position}"
                assert item["value"] == position
                position += 1
        assert position == BIG_LIST_ROWS

        # Deep into the project, keyset paging takes over from offsets.
        response = await http.get(_url(), params={"after": expected[-4]})
        tail = [json.loads(line)["score_id"] for line in response.text.splitlines()]
        assert tail == expected[-3:]
        response = await http.get(_url(), params={"after": expected[-4], "offset": 1})
        assert [json.loads(line)["score_id"] for line in response.text.splitlines()] == (
            expected[-2:]
        )
        # Without a limit, the default one applies.
        response = await http.get(_url())
        lines = response.text.splitlines()
        assert len(lines) == DEFAULT_LIST_LIMIT
        assert json.loads(lines[-1])["score_id"] == expected[DEFAULT_LIST_LIMIT - 1]


async def test_delete_counts_only_rows_of_the_project_it_removed(
    client: httpx.AsyncClient, api_key: str, db: asyncpg.Connection, worker: ScoreWorker
) -> None:
    ours = [await _create(client, api_key) for _ in range(3)]
    theirs = await _create(client, api_key, project=OTHER_PROJECT)
    await _wait_stored(db, [*ours, theirs])

    never_existed = str(new_score_id())
    assert await _delete(client, api_key, [ours[0], ours[1], theirs, never_existed]) == 2

    assert await _stored_count(db, ours[:2]) == 0
    assert await _stored_count(db, [ours[2], theirs]) == 2
    assert [item["score_id"] for item in await _list(client, api_key)] == [ours[2]]


async def test_deleting_the_same_id_again_deletes_nothing(
    client: httpx.AsyncClient, api_key: str, db: asyncpg.Connection, worker: ScoreWorker
) -> None:
    score_id = await _create(client, api_key)
    await _wait_stored(db, [score_id])

    assert await _delete(client, api_key, [score_id, score_id]) == 1
    assert await _delete(client, api_key, [score_id]) == 0


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"score_ids": ""},
        {"score_ids": "not-a-uuid"},
        {"score_ids": [str(uuid.UUID(int=1)), "0192f0b4"]},
        {"score_ids": [str(uuid.UUID(int=i)) for i in range(MAX_DELETE_IDS + 1)]},
    ],
    ids=["none", "empty", "not-a-uuid", "one-bad", "too-many"],
)
async def test_delete_rejects_missing_or_malformed_ids(
    client: httpx.AsyncClient, api_key: str, db: asyncpg.Connection, params: dict[str, Any]
) -> None:
    response = await client.delete(_url(), params=params, headers=basic_auth(api_key))

    assert response.status_code == 422, response.text
    assert {tuple(error["loc"][:2]) for error in response.json()["detail"]} == {
        ("query", "score_ids")
    }
    assert await db.fetchval("SELECT count(*) FROM score_tombstones") == 0


async def test_a_deleted_score_stays_deleted_when_its_message_comes_again(
    client: httpx.AsyncClient, api_key: str, db: asyncpg.Connection, settings: Settings
) -> None:
    score_id = await _create(client, api_key)
    async with connect_broker(settings) as broker:
        published = await _take_published(broker)
        assert str(published.score_id) == score_id
        async with running_worker(settings) as worker:
            await broker.publish_scores([published])
            await _wait_stored(db, [score_id])

            assert await _delete(client, api_key, [score_id]) == 1
            # Redelivered, re-published by its producer, replayed from dead letters: all the same.
            await broker.publish_scores([published, published, published])
            await _wait_processed(worker, 4)
            assert worker.persisted == 1

            assert await _stored_count(db, [score_id]) == 0
            assert await broker.wait_for_ready_count(QUEUE, 0) == 0
            await broker.assert_stays_empty(DEAD_LETTER_QUEUE)
    response = await client.get(f"{_url()}/{score_id}", headers=basic_auth(api_key))
    assert response.status_code == 404, response.text


async def test_a_score_deleted_while_still_queued_is_never_stored(
    client: httpx.AsyncClient, api_key: str, db: asyncpg.Connection, settings: Settings
) -> None:
    queued = await _create(client, api_key)
    kept = await _create(client, api_key)

    assert await _delete(client, api_key, [queued]) == 0

    async with connect_broker(settings) as broker, running_worker(settings) as worker:
        await _wait_processed(worker, 2)
        assert await broker.wait_for_ready_count(QUEUE, 0) == 0
    assert worker.persisted == 1
    assert await _stored_count(db, [queued]) == 0
    assert await _stored_count(db, [kept]) == 1


async def test_a_delete_in_one_project_does_not_touch_another_projects_score(
    client: httpx.AsyncClient, api_key: str, db: asyncpg.Connection, settings: Settings
) -> None:
    # Project B's score is stored when project A deletes its id (a delete of an id still
    # queued keeps it out of every project of the entity: tests/worker/test_tombstones_and_limits).
    theirs = await _create(client, api_key, project=OTHER_PROJECT)

    async with connect_broker(settings) as broker, running_worker(settings) as worker:
        await _wait_stored(db, [theirs])
        assert await _delete(client, api_key, [theirs]) == 0
        assert await _stored_count(db, [theirs]) == 1

        (row,) = await db.fetch("SELECT * FROM scores WHERE score_id = $1", theirs)
        again = _message_of(row)
        await broker.publish_scores([again])
        await _wait_processed(worker, 2)
    assert worker.persisted == 1
    response = await client.get(
        f"{_url(project=OTHER_PROJECT)}/{theirs}", headers=basic_auth(api_key)
    )
    assert response.status_code == 200, response.text


def _message_of(row: asyncpg.Record) -> ScoreMessage:
    """The create message a stored row came from."""
    fields = {name: row[name] for name in FIELD_NAMES}
    return ScoreMessage.model_validate({**fields, "value": json.loads(row["value"])})


async def test_a_delete_racing_a_workers_insert_still_removes_the_score(
    client: httpx.AsyncClient, api_key: str, db: asyncpg.Connection, settings: Settings
) -> None:
    score = score_message(created_by=_key_id(api_key))
    # A worker's batch held in the middle: its project lock taken, its INSERT not committed.
    holder = await asyncpg.connect(settings.database_url)
    deleting: asyncio.Task[int] | None = None
    try:
        batch = holder.transaction()
        await batch.start()
        await holder.execute(worker_sql.LOCK_PROJECTS_SHARED, [ENTITY], [PROJECT])
        stored = await holder.fetch(worker_sql.INSERT_SCORES, *_columns(score))
        assert [row["scores"] for row in stored] == [1]

        deleting = asyncio.create_task(_delete(client, api_key, [str(score.score_id)]))
        await _wait_for_lock_waiter_or(deleting, db)
        await batch.commit()
        num_deleted = await deleting
    finally:
        await holder.close()
        if deleting is not None:
            deleting.cancel()  # only when a failed assertion left it running
            await asyncio.gather(deleting, return_exceptions=True)

    assert num_deleted == 1
    assert await _stored_count(db, [str(score.score_id)]) == 0


def _columns(score: ScoreMessage) -> list[list[object]]:
    """A one-score batch as the worker's INSERT takes it: one array per column."""
    return [[value] for value in row_of(score)]


async def _wait_for_lock_waiter_or(task: asyncio.Task[int], db: asyncpg.Connection) -> None:
    """Wait until a session waits on a lock, or the task ended without waiting on any."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while not task.done() and await db.fetchval(COUNT_LOCK_WAITERS) == 0:
        assert loop.time() < deadline, "the delete neither waited on a lock nor finished"
        await asyncio.sleep(0.02)


async def test_concurrent_deletes_and_republishing_never_resurrect_a_score(
    client: httpx.AsyncClient, api_key: str, db: asyncpg.Connection, settings: Settings
) -> None:
    stored_first = 120
    rounds = 4
    in_flight = 40
    async with connect_broker(settings) as broker, running_worker(settings) as worker:
        created = list(
            await asyncio.gather(
                *(_create(client, api_key, prediction_id=f"p-{i}") for i in range(stored_first))
            )
        )
        await _wait_stored(db, created)
        rows = await db.fetch("SELECT * FROM scores WHERE score_id = ANY($1::uuid[])", created)
        messages = [_message_of(row) for row in rows]

        async def republish() -> None:
            for _ in range(rounds):
                await broker.publish_scores(messages)

        async def delete_all() -> int:
            chunks = [created[i : i + 10] for i in range(0, len(created), 10)]
            counts = await asyncio.gather(*(_delete(client, api_key, chunk) for chunk in chunks))
            return sum(counts)

        async def create_and_delete_at_once() -> tuple[list[str], int]:
            # Deleted while their messages are queued, in the worker's hands, or just stored.
            ids = []
            deleted = 0
            for i in range(in_flight):
                score_id = await _create(client, api_key, prediction_id=f"late-{i}")
                ids.append(score_id)
                deleted += await _delete(client, api_key, [score_id])
            return ids, deleted

        _, num_deleted, (late, _) = await asyncio.gather(
            republish(), delete_all(), create_and_delete_at_once()
        )
        assert num_deleted == stored_first
        await _wait_processed(worker, stored_first * (1 + rounds) + in_flight, timeout=30)
        assert await broker.wait_for_ready_count(QUEUE, 0) == 0

    assert await _stored_count(db, created + late) == 0
    assert await db.fetchval(COUNT_SCORES) == 0


async def test_abandoned_list_streams_give_their_database_connection_back(
    settings: Settings, api_key: str, db: asyncpg.Connection
) -> None:
    rows = 20_000
    await copy_scores(db, rows, created_by=_key_id(api_key))
    small_pool = settings.model_copy(update={"db_read_pool_max_size": 2})

    async with api_process(small_pool) as api:
        # Each client reads one line, then hangs up with most of the stream unread.
        for _ in range(3 * small_pool.db_read_pool_max_size):
            async with (
                httpx.AsyncClient(base_url=api.base_url, headers=basic_auth(api_key)) as http,
                http.stream("GET", _url(), params={"limit": rows}) as response,
            ):
                assert response.status_code == 200
                async for _ in response.aiter_lines():
                    break
        async with httpx.AsyncClient(
            base_url=api.base_url, headers=basic_auth(api_key), timeout=5
        ) as http:
            response = await http.get(_url(), params={"limit": 1})
            assert response.status_code == 200, response.text
