"""Idempotency-Key: retries get the same score ids and at most one row, across api processes."""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import httpx
import pytest

from api.keys import create_key
from shared.settings import Settings
from shared.topology import QUEUE
from tests.conftest import ENTITY, PROJECT, basic_auth, score_body
from tests.support.processes import (
    ApiProcess,
    api_process,
    connect_broker,
    running_worker,
    wait_until,
)
from worker.worker import ScoreWorker

URL = f"/v2/{ENTITY}/{PROJECT}/scores"
BATCH_URL = f"{URL}/batch"
OTHER_PROJECT = "other-evals"
OTHER_ENTITY = "globex"
WARM_UP_PROJECT = "warm-up"
HEADER_LOC = ["header", "Idempotency-Key"]
EXPIRE_KEYS = "UPDATE idempotency_keys SET created_at = created_at - $1::interval"
COUNT_LOCK_WAITERS = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND wait_event_type = 'Lock'
"""


def _keyed(api_key: str, idempotency_key: str | bytes) -> dict[bytes, bytes]:
    """Auth and Idempotency-Key headers; bytes, so that keys may hold what str headers cannot."""
    raw = idempotency_key.encode("ascii") if isinstance(idempotency_key, str) else idempotency_key
    return {
        b"Authorization": basic_auth(api_key)["Authorization"].encode(),
        b"Idempotency-Key": raw,
    }


async def _post(
    client: httpx.AsyncClient,
    api_key: str,
    idempotency_key: str,
    body: dict[str, object] | None = None,
    url: str = URL,
) -> str:
    response = await client.post(
        url, json=body or score_body(), headers=_keyed(api_key, idempotency_key)
    )
    assert response.status_code == 200, response.text
    score_id: str = response.json()["score_id"]
    return score_id


def _assert_key_reused(response: httpx.Response) -> None:
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == HEADER_LOC
    assert error["type"] == "idempotency_key_reused"
    assert isinstance(error["msg"], str)


async def _ready_count(settings: Settings) -> int:
    async with connect_broker(settings) as broker:
        return await broker.ready_count(QUEUE)


async def _wait_processed(worker: ScoreWorker, messages: int, timeout: float = 15) -> None:
    """Wait until the worker has stored or skipped (as duplicate or deleted) this many messages."""
    await wait_until(
        lambda: worker.persisted + worker.duplicates >= messages,
        f"worker processed {messages} messages",
        timeout,
    )


async def test_the_same_key_twice_gives_the_same_score_and_one_row(
    client: httpx.AsyncClient, api_key: str, db: asyncpg.Connection, settings: Settings
) -> None:
    body = score_body(value={"a": 1, "b": [1, 2]})
    reordered = {key: body[key] for key in reversed(list(body))}
    reordered["value"] = {"b": [1, 2], "a": 1}

    async with running_worker(settings) as worker:
        first = await _post(client, api_key, "retry-1", body)
        assert await _post(client, api_key, "retry-1", body) == first
        # The same JSON, written in another key order, is the same request.
        assert await _post(client, api_key, "retry-1", reordered) == first
        await _wait_processed(worker, 3)

    assert worker.persisted == 1
    assert await db.fetchval("SELECT array_agg(score_id::text) FROM scores") == [first]


async def test_the_same_key_with_another_body_is_422_and_publishes_nothing(
    client: httpx.AsyncClient, api_key: str, settings: Settings
) -> None:
    first = await _post(client, api_key, "reused", score_body(value=1))
    assert await _ready_count(settings) == 1

    for other in (
        score_body(value=2),
        score_body(value=1, evaluation_run_id="run-2"),
        score_body(value=1, prediction_id="another"),
    ):
        response = await client.post(URL, json=other, headers=_keyed(api_key, "reused"))
        _assert_key_reused(response)
    response = await client.post(
        BATCH_URL, json={"scores": [score_body(value=1)]}, headers=_keyed(api_key, "reused")
    )
    _assert_key_reused(response)
    assert await _ready_count(settings) == 1

    # The key still stands for the first request.
    assert await _post(client, api_key, "reused", score_body(value=1)) == first


async def test_keys_are_scoped_to_the_project(
    client: httpx.AsyncClient, api_key: str, db: asyncpg.Connection
) -> None:
    _, globex_key = await create_key(db, OTHER_ENTITY)
    body = score_body()

    ours = await _post(client, api_key, "shared-key", body)
    other_project = await _post(
        client, api_key, "shared-key", body, f"/v2/{ENTITY}/{OTHER_PROJECT}/scores"
    )
    # The same score of entity OTHER_ENTITY, with a scorer of its own.
    their_body = score_body(scorer=f"weave:///{OTHER_ENTITY}/{PROJECT}/op/exact_match:abc123")
    other_entity = await _post(
        client, globex_key, "shared-key", their_body, f"/v2/{OTHER_ENTITY}/{PROJECT}/scores"
    )
    different_body = await _post(
        client, api_key, "shared-key", score_body(value=7), f"/v2/{ENTITY}/third/scores"
    )

    assert len({ours, other_project, other_entity, different_body}) == 4
    assert await _post(client, api_key, "shared-key", body) == ours


@contextlib.asynccontextmanager
async def _accepting_api(settings: Settings, api_key: str) -> AsyncIterator[httpx.AsyncClient]:
    """An api subprocess, yielded with a client once its publisher has confirmed a score."""
    async with (
        api_process(settings) as api,
        httpx.AsyncClient(base_url=api.base_url, timeout=10) as http,
    ):
        await _wait_accepting(api, http, api_key)
        yield http


async def _wait_accepting(api: ApiProcess, http: httpx.AsyncClient, api_key: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while True:
        response = await http.post(
            f"/v2/{ENTITY}/{WARM_UP_PROJECT}/scores", json=score_body(), headers=basic_auth(api_key)
        )
        if response.status_code == 200:
            return
        assert response.status_code == 503, response.text
        if loop.time() > deadline:
            raise api.process.failure("never accepted a score")
        await asyncio.sleep(0.1)


async def test_retries_across_two_api_processes_make_one_score(
    api_key: str, db: asyncpg.Connection, settings: Settings
) -> None:
    concurrent_keys = [f"concurrent-{i}" for i in range(10)]
    async with (
        running_worker(settings) as worker,
        _accepting_api(settings, api_key) as first,
        _accepting_api(settings, api_key) as second,
    ):
        # The first answer was lost: the client retries elsewhere, then where it began.
        lost = await _post(first, api_key, "lost-answer")
        assert await _post(second, api_key, "lost-answer") == lost
        assert await _post(first, api_key, "lost-answer") == lost

        # Both processes get the same key at the same moment.
        pairs = await asyncio.gather(
            *(
                asyncio.gather(_post(first, api_key, key), _post(second, api_key, key))
                for key in concurrent_keys
            )
        )
        for key, (one, other) in zip(concurrent_keys, pairs, strict=True):
            assert one == other, key

        await _wait_processed(worker, 2 + 3 + 2 * len(concurrent_keys))

    assert worker.persisted == 2 + 1 + len(concurrent_keys)
    stored = await db.fetch(
        "SELECT score_id::text FROM scores WHERE entity = $1 AND project = $2", ENTITY, PROJECT
    )
    assert sorted(row["score_id"] for row in stored) == sorted([lost, *(one for one, _ in pairs)])


async def _wait_blocked_or_done(tasks: list[asyncio.Task[str]], db: asyncpg.Connection) -> None:
    """Wait until every request either waits on a database lock or has been answered."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        waiting = await db.fetchval(COUNT_LOCK_WAITERS)
        if waiting + sum(task.done() for task in tasks) >= len(tasks):
            return
        assert loop.time() < deadline, "the requests neither waited on a lock nor finished"
        await asyncio.sleep(0.02)


async def test_concurrent_first_uses_of_a_key_agree(
    client: httpx.AsyncClient, api_key: str, db: asyncpg.Connection, settings: Settings
) -> None:
    # An uncommitted claim of the key, rolled back once both requests wait on it: they then
    # race for the key, and the loser must find the winner's ids.
    locker = await asyncpg.connect(settings.database_url)
    attempts: list[asyncio.Task[str]] = []
    try:
        claim = locker.transaction()
        await claim.start()
        await locker.execute(
            "INSERT INTO idempotency_keys"
            " (entity, project, idempotency_key, request_hash, score_ids)"
            " VALUES ($1, $2, $3, $4, '{}')",
            ENTITY,
            PROJECT,
            "brand-new",
            b"",
        )
        attempts = [asyncio.create_task(_post(client, api_key, "brand-new")) for _ in range(2)]
        await _wait_blocked_or_done(attempts, db)
        await claim.rollback()
        one, other = await asyncio.gather(*attempts)
    finally:
        await locker.close()
        for task in attempts:
            task.cancel()  # only those a failed assertion left running
        await asyncio.gather(*attempts, return_exceptions=True)

    assert one == other


async def test_a_batch_retry_gets_the_same_ids_in_order(
    client: httpx.AsyncClient, api_key: str, db: asyncpg.Connection, settings: Settings
) -> None:
    batch = {"scores": [score_body(prediction_id=f"p-{i}", value=i) for i in range(5)]}

    async with running_worker(settings) as worker:
        responses = [
            await client.post(BATCH_URL, json=batch, headers=_keyed(api_key, "batch-key"))
            for _ in range(2)
        ]
        assert [response.status_code for response in responses] == [200, 200]
        first, retried = (response.json()["score_ids"] for response in responses)
        assert retried == first
        assert len(set(first)) == 5

        shuffled = {"scores": list(reversed(batch["scores"]))}
        response = await client.post(BATCH_URL, json=shuffled, headers=_keyed(api_key, "batch-key"))
        _assert_key_reused(response)
        await _wait_processed(worker, 10)

    assert worker.persisted == 5
    rows = await db.fetch("SELECT score_id::text, prediction_id FROM scores")
    assert {row["score_id"]: row["prediction_id"] for row in rows} == {
        score_id: f"p-{i}" for i, score_id in enumerate(first)
    }


async def test_a_key_is_remembered_for_a_day_then_forgotten(
    client: httpx.AsyncClient, api_key: str, db: asyncpg.Connection
) -> None:
    first = await _post(client, api_key, "ageing")

    await db.execute(EXPIRE_KEYS, timedelta(hours=23))
    assert await _post(client, api_key, "ageing") == first

    await db.execute(EXPIRE_KEYS, timedelta(hours=2))
    fresh = await _post(client, api_key, "ageing")
    assert fresh != first
    assert await _post(client, api_key, "ageing") == fresh

    # Once forgotten, the key may come with another body.
    await db.execute(EXPIRE_KEYS, timedelta(days=2))
    another = await _post(client, api_key, "ageing", score_body(value="something else"))
    assert another not in (first, fresh)


async def test_concurrent_retries_of_an_expired_key_agree(
    client: httpx.AsyncClient, api_key: str, db: asyncpg.Connection, settings: Settings
) -> None:
    first = await _post(client, api_key, "expired")
    await db.execute(EXPIRE_KEYS, timedelta(days=2))

    # Hold the key's row so both retries are in the database, waiting, before either claims it.
    locker = await asyncpg.connect(settings.database_url)
    retries: list[asyncio.Task[str]] = []
    try:
        async with locker.transaction():
            await locker.execute(
                "SELECT 1 FROM idempotency_keys WHERE idempotency_key = $1 FOR UPDATE", "expired"
            )
            retries = [asyncio.create_task(_post(client, api_key, "expired")) for _ in range(2)]
            await _wait_blocked_or_done(retries, db)
        one, other = await asyncio.gather(*retries)
    finally:
        await locker.close()
        for task in retries:
            task.cancel()  # only those a failed assertion left running
        await asyncio.gather(*retries, return_exceptions=True)

    assert one == other, (
        f"two concurrent retries of one request got different score ids: {one} and {other} "
        f"(the expired key's old id was {first})"
    )
    assert one != first, "an expired key gets fresh score ids"


@pytest.mark.parametrize(
    "idempotency_key",
    [
        "",
        "k" * 256,
        "has space",
        "tab\there",
        "del\x7f",
        "bell\x07",
        "caf\xe9".encode("latin-1"),
        "café".encode(),
    ],
    ids=["empty", "too-long", "space", "tab", "del", "control", "latin-1", "utf-8"],
)
async def test_a_malformed_key_is_422_and_publishes_nothing(
    client: httpx.AsyncClient, api_key: str, settings: Settings, idempotency_key: str | bytes
) -> None:
    response = await client.post(URL, json=score_body(), headers=_keyed(api_key, idempotency_key))

    assert response.status_code == 422, response.text
    locs = [error["loc"] for error in response.json()["detail"]]
    assert locs == [HEADER_LOC]
    assert await _ready_count(settings) == 0


async def test_the_longest_and_widest_keys_are_accepted(
    client: httpx.AsyncClient, api_key: str
) -> None:
    printable = "".join(chr(code) for code in range(0x21, 0x7F))
    for key in ("k" * 255, printable, "x"):
        first = await _post(client, api_key, key)
        assert await _post(client, api_key, key) == first
