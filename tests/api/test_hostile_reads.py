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
from tests.conftest import ENTITY, PROJECT, basic_auth, client_for, running_app, score_body
from tests.support.processes import running_worker, wait_until

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


@contextlib.asynccontextmanager
async def _app(settings: Settings, **changes: Any) -> AsyncIterator[tuple[FastAPI, Any]]:
    changed = settings.model_copy(update={"read_max_waiting": PLACES, **changes})
    async with running_app(changed) as app, client_for(app) as client:
        await wait_until(
            lambda: app.state.services.stored_events.connected, "the listener connected"
        )
        yield app, client


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
