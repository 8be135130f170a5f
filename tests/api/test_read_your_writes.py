"""Read your writes: reads that wait for a fresh score, lists with `until`, creates with
`Prefer: return=representation`, and what became of a score (GET …/status)."""

import asyncio
import contextlib
import json
import secrets
import time
import uuid
from typing import Any

import aio_pika
import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from api.keys import create_key
from api.routes.scores import Preferences, preferences
from api.service import minted_seconds_ago
from shared.contract import CONTENT_TYPE, MESSAGE_TYPE
from shared.ids import new_score_id
from shared.settings import Settings
from tests.conftest import (
    ENTITY,
    PROJECT,
    basic_auth,
    score_body,
)
from tests.support.processes import (
    api_process,
    connect_broker,
    listening_app,
    running_worker,
    score_message,
    wait_until,
    worker_process,
)
from tests.support.tcp_proxy import TcpProxy

URL = f"/v2/{ENTITY}/{PROJECT}/scores"
OTHER_ENTITY = "globex"
# Creates, each read at once, all at the same time: as many reads as READ_MAX_WAITING allows.
LOAD_PAIRS = 500
# Generous, for a loaded machine: what is measured is that the reads wait, not how long.
LONG_WAIT_MS = 30_000


def _minted_ago(seconds: float) -> uuid.UUID:
    """A UUIDv7 whose timestamp is `seconds` before now."""
    milliseconds = int((time.time() - seconds) * 1000)
    random_bits = secrets.randbits(74)
    value = (milliseconds << 80) | (0x7 << 76) | ((random_bits >> 62) << 64)
    return uuid.UUID(int=value | (0b10 << 62) | (random_bits & ((1 << 62) - 1)))


def _published_body(score_id: uuid.UUID, **changes: Any) -> bytes:
    fields: dict[str, Any] = json.loads(score_message(score_id=score_id).model_dump_json())
    fields.update(changes)
    return json.dumps(fields).encode()


def _direct_message(body: bytes, score_id: uuid.UUID) -> aio_pika.Message:
    return aio_pika.Message(
        body=body,
        content_type=CONTENT_TYPE,
        type=MESSAGE_TYPE,
        message_id=str(score_id),
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


async def _create(client: httpx.AsyncClient, api_key: str, **overrides: object) -> str:
    response = await client.post(URL, json=score_body(**overrides), headers=basic_auth(api_key))
    assert response.status_code == 200, response.text
    score_id: str = response.json()["score_id"]
    return score_id


async def _status(client: httpx.AsyncClient, key: str, score_id: object) -> dict[str, Any]:
    response = await client.get(f"{URL}/{score_id}/status", headers=basic_auth(key))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert set(body) == {"state", "reason"}
    return body


def _lines(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    return [json.loads(line) for line in response.text.splitlines()]


@pytest.fixture
async def other_key(db: asyncpg.Connection) -> str:
    """A key of another entity."""
    _, secret = await create_key(db, OTHER_ENTITY, name="other")
    return secret


# --- Parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("return=representation", Preferences(True, None)),
        ("RETURN=Representation; x=1, wait=7", Preferences(True, 7.0)),
        ('wait=3, return="representation"', Preferences(True, 3.0)),
        ("return=representation, return=minimal", Preferences(True, None)),
        ("return=minimal", Preferences(False, None)),
        ("respond-async, wait=10", Preferences(False, 10.0)),
        ("return=representation, wait=soon", Preferences(True, None)),
        ("return=representation, wait=-1", Preferences(True, None)),
        ("", Preferences(False, None)),
    ],
)
def test_prefer_is_read_as_rfc_7240_says(header: str, expected: Preferences) -> None:
    assert preferences(header) == expected


def test_only_a_uuidv7_has_an_age() -> None:
    assert minted_seconds_ago(uuid.uuid4()) is None
    age = minted_seconds_ago(_minted_ago(120))
    assert age is not None
    assert 119 < age < 130
    fresh = minted_seconds_ago(new_score_id())
    assert fresh is not None
    assert abs(fresh) < 5


# --- Reads that wait --------------------------------------------------------------------------


async def test_a_score_is_read_right_after_its_create(
    client: httpx.AsyncClient, api_key: str, worker: object
) -> None:
    for i in range(20):
        body = score_body(prediction_id=f"p-{i}", value={"i": i})
        created = await client.post(URL, json=body, headers=basic_auth(api_key))
        assert created.status_code == 200, created.text
        score_id = created.json()["score_id"]
        read = await client.get(f"{URL}/{score_id}", headers=basic_auth(api_key))
        assert read.status_code == 200, f"create {i}: {read.text}"
        assert read.json()["score_id"] == score_id
        assert read.json()["value"] == {"i": i}


async def test_a_waiting_read_is_answered_when_the_worker_stores_the_score(
    settings: Settings, api_key: str, app: FastAPI, client: httpx.AsyncClient
) -> None:
    events = app.state.services.stored_events
    await wait_until(lambda: events.connected, "the listener connected")
    score_id = await _create(client, api_key)  # no worker yet: it waits in the queue
    reading = asyncio.create_task(
        client.get(
            f"{URL}/{score_id}", params={"wait_ms": LONG_WAIT_MS}, headers=basic_auth(api_key)
        )
    )
    # Waiting holds no database connection (the watch begins before the read, which takes
    # one for a moment).
    await wait_until(
        lambda: events.waiting == 1 and app.state.services.read_pool.in_use == 0,
        "the read waits, with no database connection",
    )
    assert not reading.done()
    async with running_worker(settings):
        read = await asyncio.wait_for(reading, LONG_WAIT_MS / 1000)
    assert read.status_code == 200, read.text
    assert read.json()["score_id"] == score_id
    assert events.waiting == 0


async def test_a_read_waits_at_most_its_wait_then_404(
    app: FastAPI, client: httpx.AsyncClient, api_key: str
) -> None:
    await wait_until(lambda: app.state.services.stored_events.connected, "listener connected")
    score_id = await _create(client, api_key)  # never stored: no worker runs
    started = time.monotonic()
    read = await client.get(
        f"{URL}/{score_id}", params={"wait_ms": 300}, headers=basic_auth(api_key)
    )
    assert read.status_code == 404, read.text
    assert time.monotonic() - started >= 0.3


@pytest.mark.parametrize(
    "score_id",
    [_minted_ago(600), uuid.uuid4(), "fresh, wait_ms=0"],
    ids=["an old UUIDv7", "a UUIDv4", "wait_ms=0"],
)
async def test_an_old_id_a_non_v7_id_or_wait_0_is_a_404_at_once(
    settings: Settings, api_key: str, score_id: object
) -> None:
    params = {"wait_ms": 0} if score_id == "fresh, wait_ms=0" else {}
    wanted = new_score_id() if params else score_id
    # A default wait long enough that having waited it could not pass for answering at once.
    async with listening_app(settings, read_wait_seconds=60) as (app, client):
        started = time.monotonic()
        read = await client.get(f"{URL}/{wanted}", params=params, headers=basic_auth(api_key))
        assert read.status_code == 404, read.text
        assert time.monotonic() - started < 30
        assert app.state.services.stored_events.waiting == 0


async def test_past_the_bound_of_waiting_reads_a_read_does_not_wait(
    settings: Settings, api_key: str
) -> None:
    async with listening_app(settings, read_max_waiting=1) as (app, client):
        events = app.state.services.stored_events
        waiting = asyncio.create_task(
            client.get(
                f"{URL}/{new_score_id()}",
                params={"wait_ms": LONG_WAIT_MS},
                headers=basic_auth(api_key),
            )
        )
        await wait_until(lambda: events.waiting == 1, "the first read waits")
        started = time.monotonic()
        read = await client.get(
            f"{URL}/{new_score_id()}",
            params={"wait_ms": LONG_WAIT_MS},
            headers=basic_auth(api_key),
        )
        assert read.status_code == 404, read.text
        assert time.monotonic() - started < LONG_WAIT_MS / 2000
        assert not waiting.done()
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)


async def test_a_read_waits_no_longer_than_read_wait_max_seconds(
    settings: Settings, api_key: str
) -> None:
    async with listening_app(settings, read_wait_max_seconds=0.2) as (_, client):
        started = time.monotonic()
        read = await client.get(
            f"{URL}/{new_score_id()}",
            params={"wait_ms": LONG_WAIT_MS},
            headers=basic_auth(api_key),
        )
        assert read.status_code == 404, read.text
        elapsed = time.monotonic() - started
        assert 0.2 <= elapsed < LONG_WAIT_MS / 2000


async def test_a_deleted_id_ends_the_wait_at_once(
    app: FastAPI, client: httpx.AsyncClient, api_key: str, settings: Settings
) -> None:
    events = app.state.services.stored_events
    await wait_until(lambda: events.connected, "the listener connected")
    score_id = await _create(client, api_key)
    deleted = await client.delete(URL, params={"score_ids": score_id}, headers=basic_auth(api_key))
    assert deleted.json() == {"num_deleted": 0}  # not stored yet: a tombstone only
    # Deleted before the read: its tombstone says it will never be stored, no waiting it out.
    read = await asyncio.wait_for(
        client.get(
            f"{URL}/{score_id}", params={"wait_ms": LONG_WAIT_MS}, headers=basic_auth(api_key)
        ),
        LONG_WAIT_MS / 2000,
    )
    assert read.status_code == 404, read.text
    assert events.waiting == 0


async def test_create_then_read_under_load(settings: Settings, api_key: str) -> None:
    # 500 reads at once take the read pool's 5 connections for longer than its 1 s bound on a
    # machine others load too, and the api sheds them (503, as without waiting): a generous
    # bound here, since what is tested is that each read finds its score, not that budget.
    loaded = settings.model_copy(
        update={"read_wait_seconds": LONG_WAIT_MS / 1000, "db_acquire_timeout_seconds": 30}
    )
    # The worker reaches PostgreSQL over a slow link, as one behind a busy queue or far from
    # its database would: every read comes before its score is stored, and must wait for it.
    async with TcpProxy.for_url(settings.database_url, latency=0.2) as slow_link:
        slow_worker = loaded.model_copy(
            update={"database_url": slow_link.url_through(settings.database_url)}
        )
        async with (
            worker_process(slow_worker),
            api_process(loaded) as api,
            contextlib.AsyncExitStack() as stack,
        ):
            # Clients of 20 connections each, as separate pipelines would be: httpcore looks
            # through a client's every connection for each request, so one client of
            # hundreds spends more CPU than the api serving them.
            clients = [
                await stack.enter_async_context(
                    httpx.AsyncClient(
                        base_url=api.base_url, limits=httpx.Limits(max_connections=20), timeout=60
                    )
                )
                for _ in range(LOAD_PAIRS // 20)
            ]

            async def create_then_read(i: int) -> tuple[int, int, str]:
                client = clients[i % len(clients)]
                body = score_body(prediction_id=f"load-{i}", value=i)
                created = await client.post(URL, json=body, headers=basic_auth(api_key))
                assert created.status_code == 200, created.text
                score_id = created.json()["score_id"]
                read = await client.get(f"{URL}/{score_id}", headers=basic_auth(api_key))
                return read.status_code, i, read.text

            answers = await asyncio.gather(*(create_then_read(i) for i in range(LOAD_PAIRS)))
    failed = [(i, status, text) for status, i, text in answers if status != 200]
    assert failed == [], f"{len(failed)} reads failed, e.g. {failed[:3]}"
    assert sorted(json.loads(text)["value"] for _, _, text in answers) == list(range(LOAD_PAIRS))


async def test_the_listener_comes_back_after_losing_its_connection(
    settings: Settings, api_key: str
) -> None:
    async with TcpProxy.for_url(settings.database_url) as proxy:
        through = proxy.url_through(settings.database_url)
        async with (
            listening_app(settings, database_url=through) as (app, client),
            running_worker(settings),
        ):
            events = app.state.services.stored_events
            await proxy.cut()
            await wait_until(lambda: not events.connected, "the listener saw its loss")
            await proxy.restore()
            # Whether the listener is back yet or not, a read that waits is answered: by an
            # announcement, or by re-reading while announcements are not heard.
            score_id = await _create(client, api_key)
            read = await client.get(
                f"{URL}/{score_id}", params={"wait_ms": LONG_WAIT_MS}, headers=basic_auth(api_key)
            )
            assert read.status_code == 200, read.text
            await wait_until(lambda: events.connected, "the listener reconnected")
            score_id = await _create(client, api_key)
            read = await client.get(f"{URL}/{score_id}", headers=basic_auth(api_key))
            assert read.status_code == 200, read.text


# --- Lists with until -------------------------------------------------------------------------


async def test_a_list_until_the_last_creates_sees_every_score(
    client: httpx.AsyncClient, api_key: str, worker: object
) -> None:
    singles = await asyncio.gather(
        *(_create(client, api_key, prediction_id=f"single-{i}") for i in range(10))
    )
    batch = await client.post(
        f"{URL}/batch",
        json={"scores": [score_body(prediction_id=f"batch-{i}") for i in range(30)]},
        headers=basic_auth(api_key),
    )
    assert batch.status_code == 200, batch.text
    batch_ids = batch.json()["score_ids"]
    # The last id of each create: a batch is stored in one transaction.
    until = [*singles, batch_ids[-1]]
    listed = await client.get(URL, params={"until": until}, headers=basic_auth(api_key))
    assert sorted(score["score_id"] for score in _lines(listed)) == sorted(singles + batch_ids)


async def test_until_takes_at_most_100_ids(client: httpx.AsyncClient, api_key: str) -> None:
    until = [str(new_score_id()) for _ in range(101)]
    listed = await client.get(URL, params={"until": until}, headers=basic_auth(api_key))
    assert listed.status_code == 422
    assert listed.json()["detail"][0]["loc"] == ["query", "until"]


# --- Prefer: return=representation ------------------------------------------------------------


async def test_prefer_representation_answers_201_with_the_stored_score(
    client: httpx.AsyncClient, api_key: str, worker: object
) -> None:
    headers = {**basic_auth(api_key), "Prefer": "return=representation"}
    created = await client.post(URL, json=score_body(value={"x": 1}), headers=headers)
    assert created.status_code == 201, created.text
    assert created.headers["preference-applied"] == "return=representation"
    stored = created.json()
    read = await client.get(
        f"{URL}/{stored['score_id']}", headers=basic_auth(api_key), params={"wait_ms": 0}
    )
    assert read.status_code == 200
    assert read.json() == stored
    assert stored["value"] == {"x": 1}


async def test_prefer_representation_on_a_batch_answers_the_scores_in_order(
    client: httpx.AsyncClient, api_key: str, worker: object
) -> None:
    headers = {**basic_auth(api_key), "Prefer": "return=representation; wait=20"}
    bodies = [score_body(prediction_id=f"b-{i}", value=i) for i in range(50)]
    created = await client.post(f"{URL}/batch", json={"scores": bodies}, headers=headers)
    assert created.status_code == 201, created.text
    assert created.headers["preference-applied"] == "return=representation"
    scores = created.json()
    assert [score["value"] for score in scores] == list(range(50))
    listed = await client.get(URL, headers=basic_auth(api_key))
    assert _lines(listed) == sorted(scores, key=lambda score: score["score_id"])


@pytest.mark.parametrize("path", ["", "/batch"], ids=["single", "batch"])
async def test_prefer_representation_not_stored_in_time_is_a_202_with_the_ids(
    client: httpx.AsyncClient, api_key: str, path: str
) -> None:
    headers = {**basic_auth(api_key), "Prefer": "return=representation, wait=1"}
    body = {"scores": [score_body(), score_body()]} if path else score_body()
    created = await client.post(URL + path, json=body, headers=headers)  # no worker runs
    assert created.status_code == 202, created.text
    assert "preference-applied" not in created.headers
    ids = created.json()
    assert set(ids) == ({"score_ids"} if path else {"score_id"})
    score_id = ids["score_ids"][0] if path else ids["score_id"]
    assert (await _status(client, api_key, score_id))["state"] == "accepted"


async def test_without_prefer_or_with_another_preference_a_create_is_answered_as_ever(
    client: httpx.AsyncClient, api_key: str
) -> None:
    for prefer in (None, "return=minimal", "respond-async"):
        headers = basic_auth(api_key) | ({"Prefer": prefer} if prefer else {})
        created = await client.post(URL, json=score_body(), headers=headers)
        assert created.status_code == 200, created.text
        assert list(created.json()) == ["score_id"]
        assert "preference-applied" not in created.headers


async def test_the_openapi_document_describes_prefer(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    for path, stored in ((URL_TEMPLATE, "ScoreReadRes"), (f"{URL_TEMPLATE}/batch", None)):
        operation = document["paths"][path]["post"]
        prefer = [p for p in operation["parameters"] if p["name"] == "Prefer"]
        assert len(prefer) == 1
        assert prefer[0]["in"] == "header"
        assert "return=representation" in prefer[0]["description"]
        responses = operation["responses"]
        assert set(responses) >= {"200", "201", "202"}
        assert "Preference-Applied" in responses["201"]["headers"]
        schema = responses["201"]["content"]["application/json"]["schema"]
        if stored is not None:
            assert schema == {"$ref": f"#/components/schemas/{stored}"}
        else:
            assert schema["items"] == {"$ref": "#/components/schemas/ScoreReadRes"}
    status = document["paths"][f"{URL_TEMPLATE}/{{score_id}}/status"]["get"]
    assert status["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ScoreStatusRes"
    }


URL_TEMPLATE = "/v2/{entity}/{project}/scores"


# --- What became of a score -------------------------------------------------------------------


async def test_the_status_of_a_stored_then_deleted_score(
    client: httpx.AsyncClient, api_key: str, worker: object, other_key: str
) -> None:
    headers = {**basic_auth(api_key), "Prefer": "return=representation"}
    created = await client.post(URL, json=score_body(), headers=headers)
    assert created.status_code == 201, created.text
    score_id = created.json()["score_id"]
    stored = await _status(client, api_key, score_id)
    assert stored["state"] == "stored"
    assert stored["reason"].startswith("stored at ")
    # Another entity's key learns nothing: what it hears of any recent id.
    other = f"/v2/{OTHER_ENTITY}/{PROJECT}/scores/{score_id}"
    assert (await client.get(other, headers=basic_auth(other_key))).status_code == 404
    seen = (await client.get(f"{other}/status", headers=basic_auth(other_key))).json()
    never = (
        await client.get(
            f"/v2/{OTHER_ENTITY}/{PROJECT}/scores/{new_score_id()}/status",
            headers=basic_auth(other_key),
        )
    ).json()
    assert seen["state"] == never["state"] == "accepted"
    # Nor may it ask on this entity's path.
    assert (
        await client.get(f"{URL}/{score_id}/status", headers=basic_auth(other_key))
    ).status_code == 403

    await client.delete(URL, params={"score_ids": score_id}, headers=basic_auth(api_key))
    deleted = await _status(client, api_key, score_id)
    assert deleted["state"] == "deleted"
    assert "never stored again" in deleted["reason"]


async def test_the_status_of_ids_the_service_cannot_know(
    client: httpx.AsyncClient, api_key: str
) -> None:
    v4 = await _status(client, api_key, uuid.uuid4())
    assert v4["state"] == "unknown"
    assert "not a UUIDv7" in v4["reason"]
    old = await _status(client, api_key, _minted_ago(3600))
    assert old["state"] == "unknown"
    fresh = await _status(client, api_key, new_score_id())
    assert fresh["state"] == "accepted"
    assert fresh["reason"].startswith("in flight")
    assert (
        await client.get(f"{URL}/not-a-uuid/status", headers=basic_auth(api_key))
    ).status_code == 422


async def test_a_score_the_worker_refused_is_dead_lettered_with_why_until_it_is_stored(
    settings: Settings, client: httpx.AsyncClient, api_key: str, other_key: str
) -> None:
    score_id = new_score_id()
    refused = _published_body(score_id, comment="not a field of a score")
    async with connect_broker(settings) as broker, running_worker(settings):
        await broker.publish([_direct_message(refused, score_id)])
        await broker.take_dead_letters(1)
        status = await _status(client, api_key, score_id)
        assert status["state"] == "dead_lettered", status
        assert status["reason"].startswith("schema_violation: ")
        assert "comment" in status["reason"]
        # Another entity's key, on its own path, hears what it hears of any recent id.
        other = await client.get(
            f"/v2/{OTHER_ENTITY}/{PROJECT}/scores/{score_id}/status",
            headers=basic_auth(other_key),
        )
        assert other.json()["state"] == "accepted"
        # The publisher fixes its message and publishes it again (or an operator replays
        # the letter, edited): stored, whatever was refused before.
        await broker.publish([_direct_message(_published_body(score_id), score_id)])
        read = await client.get(
            f"{URL}/{score_id}", params={"wait_ms": LONG_WAIT_MS}, headers=basic_auth(api_key)
        )
        assert read.status_code == 200, read.text
    assert (await _status(client, api_key, score_id))["state"] == "stored"
