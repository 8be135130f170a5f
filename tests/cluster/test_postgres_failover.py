"""PostgreSQL failover under load: the api, the worker and the CLI follow the primary.

A real `score-ingest api` and worker run against a PostgreSQL pair of the test's own, through
a DATABASE_URL naming both servers with target_session_attrs=read-write (and TLS, verified).
Clients post singles and batches, most with an Idempotency-Key, retrying 503s. The primary
is stopped as a crash would stop it and the standby promoted; then the old primary comes
back as a standby and the failover is repeated the other way, so both the first server
and the second one in the URL are once the primary. Afterwards every score answered 200 is
exactly one row on the last primary, every keyed request retried gets the ids it got
before, nothing is dead-lettered, and the CLI works without being told anything new. A
primary fenced read-only is the database being unavailable too, never a bad score.
"""

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx

from chaos.postgres import PostgresPair
from shared.db import database_name, with_database
from shared.settings import Settings
from shared.topology import DEAD_LETTER_QUEUE
from tests.conftest import ENTITY, PROJECT, basic_auth, score_body
from tests.support.load import assert_stored_exactly_once
from tests.support.processes import (
    api_process,
    connect_broker,
    run_cli,
    wait_until,
    worker_process,
)

SCORES_PATH = f"/v2/{ENTITY}/{PROJECT}/scores"
CLIENTS = 4
BATCH_SIZE = 5
FAILOVERS = 2
# Keyed requests accepted before a fault, and after the promotion, per failover.
ACCEPTED_BEFORE = 20
ACCEPTED_AFTER = 20
RETRY_PAUSE_SECONDS = 0.1
# A request is retried (503 or no answer) for at most this long.
RETRY_SECONDS = 60.0
PROGRESS_SECONDS = 60.0


@dataclass(frozen=True)
class Request:
    """One create as a client sends it: its body, and its Idempotency-Key if any."""

    path: str
    body: dict[str, Any]
    key: str | None

    def ids(self, response: httpx.Response) -> list[str]:
        """The score ids a 200 answered."""
        answer = response.json()
        return answer["score_ids"] if "score_ids" in answer else [answer["score_id"]]


@dataclass
class Clients:
    """CLIENTS clients posting until stopped; each request retried until it is answered 200."""

    http: httpx.AsyncClient
    headers: dict[str, str]
    accepted: list[tuple[Request, list[str], float]] = field(default_factory=list)
    refusals: int = 0
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    async def post_until_accepted(self, request: Request) -> list[str]:
        """Send request until it is answered 200; any answer but 200 or 503 fails the test."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RETRY_SECONDS
        headers = dict(self.headers)
        if request.key is not None:
            headers["Idempotency-Key"] = request.key
        while True:
            with contextlib.suppress(httpx.TransportError):
                response = await self.http.post(request.path, json=request.body, headers=headers)
                if response.status_code == 200:
                    return request.ids(response)
                assert response.status_code == 503, (response.status_code, response.text)
            self.refusals += 1
            assert loop.time() < deadline, f"not accepted within {RETRY_SECONDS}s: {request}"
            await asyncio.sleep(RETRY_PAUSE_SECONDS)

    async def run(self, client: int) -> None:
        """Post a keyed single, a keyed batch and an unkeyed single, in turn, until stopped."""
        loop = asyncio.get_running_loop()
        sent = 0
        while not self.stopping.is_set():
            sent += 1
            request = _request(client, sent)
            ids = await self.post_until_accepted(request)
            self.accepted.append((request, ids, loop.time()))

    def longest_keyed_gap(self) -> float:
        """The longest time (seconds) between two keyed requests' 200s: no 200 needing
        PostgreSQL was answered meanwhile."""
        times = sorted(at for request, _, at in self.accepted if request.key)
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)

    async def wait_for_keyed(self, count: int, since: float, when: str) -> None:
        """Wait until `count` keyed requests were accepted at or after `since` (event loop
        clock)."""
        await wait_until(
            lambda: sum(1 for r, _, at in self.accepted if r.key and at >= since) >= count,
            f"{count} keyed requests accepted {when}",
            PROGRESS_SECONDS,
        )


def _request(client: int, sent: int) -> Request:
    name = f"failover-{client}-{sent}"
    match sent % 3:
        case 0:
            return Request(SCORES_PATH, score_body(prediction_id=name), key=None)
        case 1:
            return Request(SCORES_PATH, score_body(prediction_id=name), key=name)
        case _:
            scores = [score_body(prediction_id=f"{name}-{n}") for n in range(BATCH_SIZE)]
            return Request(f"{SCORES_PATH}/batch", {"scores": scores}, key=name)


@contextlib.asynccontextmanager
async def _connection(url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(url)
    try:
        yield conn
    finally:
        await conn.close()


def _verified_url(pair: PostgresPair) -> str:
    return f"{pair.database_url()}&sslmode=verify-full&sslrootcert={pair.ca_file()}"


def test_a_url_of_two_servers_names_its_database_and_keeps_its_options() -> None:
    url = (
        "postgresql://postgres@10.0.0.1:5432,10.0.0.2:5433/score_ingest"
        "?target_session_attrs=read-write&sslmode=verify-full&sslrootcert=/ca.pem"
    )
    assert database_name(url) == "score_ingest"
    assert with_database(url, "postgres") == url.replace("/score_ingest?", "/postgres?")


async def test_api_worker_and_cli_follow_the_primary(
    pair: PostgresPair, settings: Settings
) -> None:
    settings = settings.model_copy(update={"database_url": _verified_url(pair)})
    migrated = run_cli(settings, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    created = run_cli(settings, "keys", "create", "--entity", ENTITY, "--name", "failover")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip().splitlines()[-1]

    loop = asyncio.get_running_loop()
    async with (
        api_process(settings) as api,
        worker_process(settings),
        httpx.AsyncClient(base_url=api.base_url, timeout=10) as http,
    ):
        clients = Clients(http, basic_auth(secret))
        posting = [asyncio.create_task(clients.run(n)) for n in range(CLIENTS)]
        try:
            for failover in range(FAILOVERS):
                await clients.wait_for_keyed(ACCEPTED_BEFORE, loop.time(), "before the fault")
                stopped = loop.time()
                old_primary = pair.primary
                await asyncio.to_thread(pair.stop_primary)
                await asyncio.to_thread(pair.promote_standby)
                promoted = loop.time()
                assert pair.primary != old_primary
                await clients.wait_for_keyed(ACCEPTED_AFTER, promoted, "after the promotion")
                print(
                    f"failover {failover}: stop+promote {promoted - stopped:.2f}s, "
                    f"longest gap between keyed 200s {clients.longest_keyed_gap():.2f}s, "
                    f"refusals so far {clients.refusals}"
                )
                if failover + 1 < FAILOVERS:
                    await asyncio.to_thread(pair.rebuild_standby)
        finally:
            clients.stopping.set()
            await asyncio.gather(*posting)

        keyed = [(request, ids) for request, ids, _ in clients.accepted if request.key]
        for request, ids in keyed:
            assert await clients.post_until_accepted(request) == ids, request.key

        async with _connection(settings.database_url) as conn:
            assert not await conn.fetchval("SELECT pg_is_in_recovery()")
            accepted_ids = [score_id for _, ids, _ in clients.accepted for score_id in ids]
            await assert_stored_exactly_once(conn, accepted_ids)
        async with connect_broker(settings) as broker:
            assert await broker.ready_count(DEAD_LETTER_QUEUE) == 0

    migrated_again = run_cli(settings, "migrate")
    assert migrated_again.returncode == 0, migrated_again.stderr
    assert "schema is up to date" in migrated_again.stdout
    listed = run_cli(settings, "keys", "list", "--entity", ENTITY)
    assert listed.returncode == 0, listed.stderr
    assert "failover" in listed.stdout


async def test_a_primary_that_takes_no_writes_is_unavailable_not_a_bad_score(
    pair: PostgresPair, settings: Settings
) -> None:
    # A fenced primary (default_transaction_read_only) and a standby: the sessions the
    # pools hold have their writes refused, and a new connection finds no server that
    # takes writes. Both are the database being unavailable: 503s, and retries in the
    # worker, until the primary takes writes again.
    settings = settings.model_copy(update={"database_url": _verified_url(pair)})
    assert run_cli(settings, "migrate").returncode == 0
    created = run_cli(settings, "keys", "create", "--entity", ENTITY)
    assert created.returncode == 0, created.stderr
    headers = basic_auth(created.stdout.strip().splitlines()[-1])
    # The first server in the URL: the primary of a pair that never failed over.
    any_server = pair.database_url("postgres").replace("=read-write", "=any")
    loop = asyncio.get_running_loop()
    async with (
        api_process(settings) as api,
        worker_process(settings),
        httpx.AsyncClient(base_url=api.base_url, timeout=10) as http,
        _connection(any_server) as admin,
    ):
        clients = Clients(http, headers)
        before = _request(0, 1)
        accepted = [await clients.post_until_accepted(before)]
        await admin.execute("ALTER SYSTEM SET default_transaction_read_only = on")
        await admin.execute("SELECT pg_reload_conf()")
        deadline = loop.time() + PROGRESS_SECONDS
        sent = 1
        while True:
            sent += 1
            keyed = _request(0, 3 * sent + 1)
            response = await http.post(
                keyed.path, json=keyed.body, headers=headers | {"Idempotency-Key": str(keyed.key)}
            )
            if response.status_code == 503:
                break
            assert response.status_code == 200, response.text
            accepted.append(keyed.ids(response))
            assert loop.time() < deadline, "no 503 while the primary takes no writes"
        # A score that needs no database is taken, and waits in the queue for the worker.
        unkeyed = _request(1, 3)
        accepted.append(await clients.post_until_accepted(unkeyed))
        await admin.execute("SET default_transaction_read_only = off")
        await admin.execute("ALTER SYSTEM RESET default_transaction_read_only")
        await admin.execute("SELECT pg_reload_conf()")
        accepted.append(await clients.post_until_accepted(_request(1, 4)))

        async with _connection(settings.database_url) as conn:
            await assert_stored_exactly_once(conn, [i for ids in accepted for i in ids])
        async with connect_broker(settings) as broker:
            assert await broker.ready_count(DEAD_LETTER_QUEUE) == 0
