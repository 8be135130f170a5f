"""Read your writes against a hostile tenant: what a client controls in a waiting read (ids,
wait_ms, until, Prefer) cannot keep another entity's reads from waiting for their scores,
nor make a read wait longer than its bounds."""

import asyncio
import contextlib
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from api.keys import create_key
from api.routes.scores import MAX_UNTIL_IDS
from api.stored_events import StoredEvents
from shared.ids import new_score_id
from shared.settings import Settings
from tests.conftest import ENTITY, PROJECT, basic_auth, score_body
from tests.support.processes import listening_app, running_worker, wait_until

URL = f"/v2/{ENTITY}/{PROJECT}/scores"
ATTACKER = "mallory"
ATTACKER_URL = f"/v2/{ATTACKER}/{PROJECT}/scores"
# Few places, so that one client fills them all with a handful of requests.
PLACES = 4
# Generous, for a loaded machine: what is tested is whether a request waits, not how long.
LONG_WAIT_MS = 30_000
AT_ONCE_SECONDS = LONG_WAIT_MS / 2000


def _minted_at(milliseconds: int) -> uuid.UUID:
    """A UUIDv7 with this timestamp, as any client can make one up."""
    random_bits = secrets.randbits(74)
    value = (milliseconds << 80) | (0x7 << 76) | ((random_bits >> 62) << 64)
    return uuid.UUID(int=value | (0b10 << 62) | (random_bits & ((1 << 62) - 1)))


@pytest.fixture
async def attacker_key(db: asyncpg.Connection) -> str:
    """A key of another entity, the one that attacks."""
    _, secret = await create_key(db, ATTACKER, name="mallory")
    return secret


def _app(
    settings: Settings, **changes: Any
) -> contextlib.AbstractAsyncContextManager[tuple[FastAPI, httpx.AsyncClient]]:
    return listening_app(settings, **{"read_max_waiting": PLACES, **changes})


def _events(app: FastAPI) -> StoredEvents:
    events: StoredEvents = app.state.services.stored_events
    return events


@contextlib.asynccontextmanager
async def _holding_every_place(
    client: httpx.AsyncClient, events: StoredEvents, key: str, request: str
) -> AsyncIterator[list[asyncio.Task[httpx.Response]]]:
    """The attacker's requests waiting the longest they may for fresh ids it made up, one in
    every place: reads, or lists `until` 100 such ids."""
    tasks: list[asyncio.Task[httpx.Response]] = []
    for _ in range(PLACES):
        params: dict[str, Any] = {"wait_ms": LONG_WAIT_MS}
        if request == "read":
            url = f"{ATTACKER_URL}/{new_score_id()}"
        else:
            url = ATTACKER_URL
            params["until"] = [str(new_score_id()) for _ in range(MAX_UNTIL_IDS)]
        tasks.append(asyncio.create_task(client.get(url, params=params, headers=basic_auth(key))))
    try:
        await wait_until(lambda: events.waiting_of(ATTACKER) == PLACES, "the attacker waits")
        yield tasks
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.parametrize("request_kind", ["read", "until"])
async def test_another_entity_holding_every_place_cannot_keep_a_read_from_waiting(
    settings: Settings, api_key: str, attacker_key: str, request_kind: str
) -> None:
    async with (
        _app(settings) as (app, client),
        _holding_every_place(client, _events(app), attacker_key, request_kind) as attacks,
    ):
        events = _events(app)
        created = await client.post(URL, json=score_body(), headers=basic_auth(api_key))
        score_id = created.json()["score_id"]  # no worker yet: it waits in the queue
        reading = asyncio.create_task(
            client.get(
                f"{URL}/{score_id}", params={"wait_ms": LONG_WAIT_MS}, headers=basic_auth(api_key)
            )
        )
        await wait_until(lambda: events.waiting_of(ENTITY) == 1, "the read waits")
        # It took the place of the attacker's longest-waiting request, answered at once.
        given_up = await asyncio.wait_for(attacks[0], AT_ONCE_SECONDS)
        assert given_up.status_code == (404 if request_kind == "read" else 200), given_up.text
        assert events.waiting == PLACES
        assert events.waiting_of(ATTACKER) == PLACES - 1
        assert not reading.done()
        async with running_worker(settings):
            read = await asyncio.wait_for(reading, LONG_WAIT_MS / 1000)
        assert read.status_code == 200, read.text
        assert read.json()["score_id"] == score_id


async def test_another_entity_holding_every_place_cannot_keep_a_create_from_its_201(
    settings: Settings, api_key: str, attacker_key: str
) -> None:
    async with (
        _app(settings) as (app, client),
        _holding_every_place(client, _events(app), attacker_key, "until"),
    ):
        headers = {**basic_auth(api_key), "Prefer": f"return=representation, wait={LONG_WAIT_MS}"}
        creating = asyncio.create_task(client.post(URL, json=score_body(), headers=headers))
        await wait_until(lambda: _events(app).waiting_of(ENTITY) == 1, "the create waits")
        async with running_worker(settings):
            created = await asyncio.wait_for(creating, LONG_WAIT_MS / 1000)
        assert created.status_code == 201, created.text


async def test_an_entity_at_its_share_takes_no_place_of_another(
    settings: Settings, api_key: str, attacker_key: str
) -> None:
    async with _app(settings) as (app, client):
        events = _events(app)
        created = await client.post(URL, json=score_body(), headers=basic_auth(api_key))
        reading = asyncio.create_task(
            client.get(
                f"{URL}/{created.json()['score_id']}",
                params={"wait_ms": LONG_WAIT_MS},
                headers=basic_auth(api_key),
            )
        )
        await wait_until(lambda: events.waiting_of(ENTITY) == 1, "the read waits")
        attacks = [
            asyncio.create_task(
                client.get(
                    f"{ATTACKER_URL}/{new_score_id()}",
                    params={"wait_ms": LONG_WAIT_MS},
                    headers=basic_auth(attacker_key),
                )
            )
            for _ in range(PLACES - 1)
        ]
        try:
            await wait_until(lambda: events.waiting == PLACES, "every place taken")
            # One more: the attacker holds more than the other entity, so it waits not at all.
            started = time.monotonic()
            refused = await client.get(
                f"{ATTACKER_URL}/{new_score_id()}",
                params={"wait_ms": LONG_WAIT_MS},
                headers=basic_auth(attacker_key),
            )
            assert refused.status_code == 404, refused.text
            assert time.monotonic() - started < AT_ONCE_SECONDS
            assert events.waiting_of(ENTITY) == 1
            assert events.waiting_of(ATTACKER) == PLACES - 1
            assert not reading.done()
            assert not any(attack.done() for attack in attacks)
        finally:
            for task in (reading, *attacks):
                task.cancel()
            await asyncio.gather(reading, *attacks, return_exceptions=True)


async def test_one_entity_alone_may_use_every_place(settings: Settings, api_key: str) -> None:
    async with _app(settings) as (app, client):
        reads = [
            asyncio.create_task(
                client.get(
                    f"{URL}/{new_score_id()}",
                    params={"wait_ms": LONG_WAIT_MS},
                    headers=basic_auth(api_key),
                )
            )
            for _ in range(PLACES)
        ]
        try:
            await wait_until(lambda: _events(app).waiting_of(ENTITY) == PLACES, "all wait")
        finally:
            for task in reads:
                task.cancel()
            await asyncio.gather(*reads, return_exceptions=True)
        assert _events(app).waiting == 0


# --- What a client may put in a waiting request -----------------------------------------------


@pytest.mark.parametrize("wait_ms", ["-1", "1.5", "soon", "9" * 5000, ""])
async def test_a_wait_ms_that_is_no_count_of_milliseconds_is_a_422(
    client: httpx.AsyncClient, api_key: str, wait_ms: str
) -> None:
    for url in (f"{URL}/{new_score_id()}", URL):
        response = await client.get(url, params={"wait_ms": wait_ms}, headers=basic_auth(api_key))
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"] == ["query", "wait_ms"]


async def test_a_huge_wait_ms_or_prefer_wait_waits_read_wait_max_seconds(
    settings: Settings, api_key: str
) -> None:
    async with _app(settings, read_wait_max_seconds=0.2) as (_, client):
        started = time.monotonic()
        read = await client.get(
            f"{URL}/{new_score_id()}",
            params={"wait_ms": str(10**40)},
            headers=basic_auth(api_key),
        )
        assert read.status_code == 404, read.text
        listed = await client.get(
            URL,
            params={"wait_ms": str(10**40), "until": str(new_score_id())},
            headers=basic_auth(api_key),
        )
        assert listed.status_code == 200, listed.text
        for wait in ("999999999", "9" * 5000, "1e400", "inf", "nan"):
            headers = {**basic_auth(api_key), "Prefer": f"return=representation, wait={wait}"}
            created = await client.post(URL, json=score_body(), headers=headers)  # no worker
            assert created.status_code == 202, f"wait={wait[:20]}: {created.text}"
        assert time.monotonic() - started < AT_ONCE_SECONDS


@pytest.mark.parametrize(
    "headers",
    [
        [("Prefer", "return=minimal"), ("Prefer", "return=representation")],
        [("Prefer", "return=minimal, return=representation")],
        [("Prefer", "wait=1, wait=2, return=representation;x=" + "y" * 4000)],
        [("Prefer", ",,,=,;;==, return , =representation")],
    ],
    ids=["two headers", "repeated", "long parameter", "malformed"],
)
async def test_prefer_headers_that_ask_nothing_of_a_create_answer_200(
    client: httpx.AsyncClient, api_key: str, headers: list[tuple[str, str]]
) -> None:
    response = await client.post(
        URL, json=score_body(), headers=[*basic_auth(api_key).items(), *headers]
    )
    if headers[0][1].startswith("wait=1"):
        assert response.status_code == 202, response.text  # no worker: not stored in 1 s
    else:
        assert response.status_code == 200, response.text
    assert set(response.json()) == {"score_id"}


# The furthest future a UUIDv7 can name (year 10889), and a day ahead: ids nobody minted yet.
FUTURE_IDS = [_minted_at((1 << 48) - 1), _minted_at(int((time.time() + 86_400) * 1000))]


@pytest.mark.parametrize("score_id", FUTURE_IDS, ids=["year 10889", "tomorrow"])
async def test_an_id_minted_in_the_future_waits_not_and_is_unknown(
    settings: Settings, api_key: str, score_id: uuid.UUID
) -> None:
    # A default wait long enough that having waited it could not pass for answering at once.
    async with _app(settings, read_wait_seconds=60) as (app, client):
        started = time.monotonic()
        read = await client.get(f"{URL}/{score_id}", headers=basic_auth(api_key))
        assert read.status_code == 404, read.text
        listed = await client.get(URL, params={"until": str(score_id)}, headers=basic_auth(api_key))
        assert listed.status_code == 200, listed.text
        assert time.monotonic() - started < AT_ONCE_SECONDS
        assert _events(app).waiting == 0
        status = await client.get(f"{URL}/{score_id}/status", headers=basic_auth(api_key))
        assert status.json()["state"] == "unknown", status.text


async def test_a_deleted_score_created_again_with_its_idempotency_key_stays_deleted(
    app: FastAPI, client: httpx.AsyncClient, api_key: str, worker: object
) -> None:
    await wait_until(lambda: _events(app).connected, "the listener connected")
    headers = {**basic_auth(api_key), "Idempotency-Key": "again", "Prefer": "return=representation"}
    first = await client.post(URL, json=score_body(), headers=headers)
    assert first.status_code == 201, first.text
    score_id = first.json()["score_id"]
    deleted = await client.delete(URL, params={"score_ids": score_id}, headers=basic_auth(api_key))
    assert deleted.json() == {"num_deleted": 1}
    # The replay republishes the same id; the worker settles it without storing it, which
    # ends the wait: a 202, long before the wait of 30 s is out.
    started = time.monotonic()
    wait = {"Prefer": f"return=representation, wait={LONG_WAIT_MS // 1000}"}
    again = await client.post(URL, json=score_body(), headers={**headers, **wait})
    assert again.status_code == 202, again.text
    assert again.json() == {"score_id": score_id}
    read = await client.get(
        f"{URL}/{score_id}", params={"wait_ms": LONG_WAIT_MS}, headers=basic_auth(api_key)
    )
    assert read.status_code == 404, read.text
    assert time.monotonic() - started < AT_ONCE_SECONDS
    status = await client.get(f"{URL}/{score_id}/status", headers=basic_auth(api_key))
    assert status.json()["state"] == "deleted", status.text
