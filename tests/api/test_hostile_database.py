"""Every database resource an HTTP client can make the api hold is bounded, and the auth
cache keeps good keys: stalled lists, slow reads, deep offsets, floods of made-up keys."""

import asyncio
import contextlib
import json
import logging
import secrets
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from api.app import create_app
from api.keys import create_key
from api.repository import BoundedPool
from api.schemas import MAX_LIST_OFFSET
from shared.settings import Settings
from tests.conftest import (
    ENTITY,
    PROJECT,
    basic_auth,
    bearer_auth,
    running_app,
    score_body,
    serving,
)
from tests.support.processes import wait_until
from tests.support.rows import copy_scores
from tests.support.services import free_port
from tests.support.tcp_proxy import TcpProxy

URL = f"/v2/{ENTITY}/{PROJECT}/scores"
API_CONNECTIONS = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND application_name = $1 AND state = ANY($2::text[])
"""
BUSY = ["active", "idle in transaction", "idle in transaction (aborted)"]
STALLED_LISTS = 10
PROMPT_SECONDS = 1.0


@dataclass
class TcpApi:
    """The app served by uvicorn on a real socket (flow control and all), in this process."""

    app: FastAPI
    base_url: str
    port: int


@contextlib.asynccontextmanager
async def serving_over_tcp(settings: Settings) -> AsyncIterator[TcpApi]:
    """uvicorn serving the app on a free port; the test can still reach the app's pools."""
    app = create_app(settings)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_config=None,
            log_level="warning",
            timeout_graceful_shutdown=5,
        )
    )
    serve = asyncio.create_task(server.serve())
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not server.started:
            assert not serve.done(), "uvicorn stopped before serving"
            assert loop.time() < deadline, "uvicorn did not start within 10 s"
            await asyncio.sleep(0.02)
        await asyncio.wait_for(app.state.services.publisher.wait_ready(), timeout=10)
        yield TcpApi(app, f"http://127.0.0.1:{port}", port)
    finally:
        server.should_exit = True
        await asyncio.wait_for(serve, timeout=15)


async def _insert_rows(db: asyncpg.Connection, rows: int, value_bytes: int) -> list[str]:
    """COPY scores straight into the table, each with a value of about value_bytes."""
    return await copy_scores(
        db,
        rows,
        value=lambda i: json.dumps({"i": i, "pad": "x" * value_bytes}),
        evaluation_run_id=lambda i: f"run-{i % 2}",
    )


@contextlib.asynccontextmanager
async def stalled_lists(port: int, key: str) -> AsyncIterator[list[socket.socket]]:
    """STALLED_LISTS clients that each ask for a whole project's list, see the 200, then
    never read again (until the test does); their sockets are closed on the way out."""
    with contextlib.ExitStack() as stack:
        stalled = []
        for _ in range(STALLED_LISTS):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            await _ask_for_everything(sock, port, key)
            stalled.append(sock)
        yield stalled


async def _ask_for_everything(sock: socket.socket, port: int, key: str) -> None:
    loop = asyncio.get_running_loop()
    # A small receive window: the stream stalls once the server's socket buffers are full.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    authorization = basic_auth(key)["Authorization"]
    request = (
        f"GET {URL}?limit=1000000 HTTP/1.1\r\nHost: score-ingest\r\n"
        f"Authorization: {authorization}\r\n\r\n"
    )
    await loop.sock_sendall(sock, request.encode())
    status_line = b""
    while len(status_line) < 12:
        data = await asyncio.wait_for(loop.sock_recv(sock, 12 - len(status_line)), 5)
        assert data, f"the server hung up after {status_line!r}"
        status_line += data
    assert status_line == b"HTTP/1.1 200", status_line


async def _read_to_end(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sent until it closed the connection; fails if it never does."""
    loop = asyncio.get_running_loop()
    received = bytearray()
    async with asyncio.timeout(timeout):
        while data := await loop.sock_recv(sock, 1 << 20):
            received += data
    return bytes(received)


async def _api_connections(db: asyncpg.Connection, pool: str, states: list[str]) -> int:
    count: int = await db.fetchval(API_CONNECTIONS, f"score-ingest api {pool}", states)
    return count


async def _wait_until_idle(db: asyncpg.Connection, pool: str, timeout: float = 5.0) -> None:
    """Poll until none of the pool's connections is running a statement or a transaction."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (busy := await _api_connections(db, pool, BUSY)) != 0:
        assert loop.time() < deadline, f"{busy} '{pool}' connections still busy after {timeout}s"
        await asyncio.sleep(0.05)


def _made_up_key() -> str:
    """A well-formed key that no one created."""
    return f"si_{secrets.token_hex(8)}_{secrets.token_urlsafe(32)}"


async def _timed(request: Any) -> tuple[httpx.Response, float]:
    loop = asyncio.get_running_loop()
    started = loop.time()
    response: httpx.Response = await request
    return response, loop.time() - started


def _assert_503_retry_after(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) >= 1
    assert isinstance(response.json()["detail"], str)


async def test_stalled_lists_hold_no_database_connection_and_are_cut(
    settings: Settings,
    db: asyncpg.Connection,
    api_key: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rows = 4000
    await _insert_rows(db, rows, value_bytes=2000)  # about 8 MB of JSON Lines
    send_timeout = 1.0
    tight = settings.model_copy(
        update={"list_send_timeout_seconds": send_timeout, "db_read_pool_max_size": 2}
    )

    caplog.set_level(logging.WARNING, logger="api.routes.scores")
    async with serving_over_tcp(tight) as api:
        loop = asyncio.get_running_loop()
        async with stalled_lists(api.port, api_key) as stalled:
            stalled_at = loop.time()
            # Five times the read budget in stalled lists, and PostgreSQL holds nothing for
            # them: no transaction, no statement.
            await _wait_until_idle(db, "reads")
            assert await _api_connections(db, "reads", ["idle in transaction"]) == 0
            async with httpx.AsyncClient(
                base_url=api.base_url, headers=basic_auth(api_key), timeout=5
            ) as http:
                listed, seconds = await _timed(http.get(URL, params={"limit": 1}))
                assert listed.status_code == 200, listed.text
                assert seconds < PROMPT_SECONDS, f"a list took {seconds:.2f}s"

            # Past the send timeout every stalled stream is cut: once the client reads again
            # it gets what was already in flight, then the end of the connection, without the
            # chunked body's last chunk.
            await wait_until(
                lambda: len(_cuts(caplog)) == STALLED_LISTS,
                "every stalled stream cut",
                timeout=send_timeout + 5,
            )
            cut_after = loop.time() - stalled_at
            bodies = [await _read_to_end(sock, timeout=10) for sock in stalled]

    assert cut_after >= send_timeout
    for body in bodies:
        assert not body.endswith(b"\r\n0\r\n\r\n"), "a stalled stream ended as if complete"
        assert body.count(b'"score_id"') < rows
    assert len(_cuts(caplog)) == STALLED_LISTS


def _cuts(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith("list stream cut")]


async def test_reads_cannot_starve_key_lookups_deletes_or_idempotency_keys(
    settings: Settings, db: asyncpg.Connection, api_key: str
) -> None:
    score_ids = await _insert_rows(db, 4000, value_bytes=2000)
    _, uncached_key = await create_key(db, ENTITY, name="never used yet")
    acquire_timeout = 0.5
    tight = settings.model_copy(
        update={
            "db_read_pool_max_size": 2,
            "db_acquire_timeout_seconds": acquire_timeout,
            "list_send_timeout_seconds": 30,
        }
    )

    async with serving_over_tcp(tight) as api, stalled_lists(api.port, api_key):
        # Slow reads: every connection of the read budget busy with a long statement.
        read_pool: BoundedPool = api.app.state.services.read_pool
        sleeping: set[int] = set()

        async def slow_read() -> None:
            async with read_pool.connection() as conn:
                sleeping.add(conn.get_server_pid())
                with contextlib.suppress(asyncpg.QueryCanceledError):
                    await conn.execute("SELECT pg_sleep(4)")

        slow = [asyncio.create_task(slow_read()) for _ in range(tight.db_read_pool_max_size)]
        try:
            await wait_until(
                lambda: len(sleeping) == tight.db_read_pool_max_size, "read budget taken", 5
            )
            async with httpx.AsyncClient(base_url=api.base_url, timeout=10) as http:
                reads = [
                    asyncio.ensure_future(
                        _timed(http.get(f"{URL}/{score_id}", headers=basic_auth(api_key)))
                    )
                    for score_id in score_ids[:10]
                ]
                created, create_seconds = await _timed(
                    http.post(URL, json=score_body(), headers=basic_auth(uncached_key))
                )
                deleted, delete_seconds = await _timed(
                    http.delete(
                        URL, params={"score_ids": score_ids[-3:]}, headers=basic_auth(api_key)
                    )
                )
                claimed, claim_seconds = await _timed(
                    http.post(
                        URL,
                        json=score_body(),
                        headers={**basic_auth(api_key), "Idempotency-Key": "starved-not"},
                    )
                )
                answered_reads = await asyncio.gather(*reads)
        finally:
            for pid in sleeping:
                await db.execute("SELECT pg_cancel_backend($1)", pid)
            await asyncio.gather(*slow)

    assert created.status_code == 200, created.text
    assert deleted.status_code == 200, deleted.text
    assert deleted.json() == {"num_deleted": 3}
    assert claimed.status_code == 200, claimed.text
    for what, seconds in (("create", create_seconds), ("delete", delete_seconds)):
        assert seconds < PROMPT_SECONDS, f"{what} took {seconds:.2f}s"
    assert claim_seconds < PROMPT_SECONDS, f"Idempotency-Key create took {claim_seconds:.2f}s"
    # The reads waited for a connection of their own budget, at most its acquire timeout.
    for response, seconds in answered_reads:
        _assert_503_retry_after(response)
        assert acquire_timeout <= seconds < acquire_timeout + PROMPT_SECONDS, seconds


async def test_a_statement_over_its_time_is_cancelled_and_answered_503(
    settings: Settings, db: asyncpg.Connection, api_key: str
) -> None:
    (score_id,) = await _insert_rows(db, 1, value_bytes=10)
    statement_timeout = 0.5
    tight = settings.model_copy(update={"db_statement_timeout_seconds": statement_timeout})

    async with serving(tight) as client:
        # Something else holds the project's lock: the delete's wait for it is a statement
        # that would never end.
        async with db.transaction():
            await db.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended($1 || '/' || $2, 0))",
                ENTITY,
                PROJECT,
            )
            async with asyncio.timeout(statement_timeout + 5):
                blocked, seconds = await _timed(
                    client.delete(
                        URL, params={"score_ids": [score_id]}, headers=basic_auth(api_key)
                    )
                )
            _assert_503_retry_after(blocked)
            assert statement_timeout <= seconds < statement_timeout + PROMPT_SECONDS, seconds
            await _wait_until_idle(db, "writes")
        deleted = await client.delete(
            URL, params={"score_ids": [score_id]}, headers=basic_auth(api_key)
        )
        assert deleted.json() == {"num_deleted": 1}, deleted.text


def _closed(conn: Any) -> bool:
    try:
        return bool(conn.is_closed())
    except asyncpg.InterfaceError:  # released: asyncpg detached it when the session ended
        return True


async def test_every_api_connection_has_statement_and_idle_transaction_timeouts(
    settings: Settings, db: asyncpg.Connection
) -> None:
    tight = settings.model_copy(
        update={
            "db_statement_timeout_seconds": 2.5,
            "db_idle_in_transaction_timeout_seconds": 0.3,
        }
    )
    async with running_app(tight) as app:
        services = app.state.services
        for pool in (services.key_pool, services.pool, services.read_pool):
            async with pool.connection() as conn:
                assert await conn.fetchval("SHOW statement_timeout") == "2500ms"
                pid = conn.get_server_pid()
                # A transaction left open and idle, as a stalled cursor once did: PostgreSQL
                # ends the session, and the pool gets a fresh connection next time.
                transaction = conn.transaction()
                await transaction.start()
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 5
                while await db.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid
                ):
                    assert loop.time() < deadline, f"{pool.name}: an idle transaction stayed open"
                    await asyncio.sleep(0.05)
                # The client learns it from the socket the server closed, and asyncpg then
                # detaches the pool's proxy. (A query sent while asyncpg is still reading the
                # FATAL message fails in a racy way instead, so none is sent.)
                while not _closed(conn):
                    assert loop.time() < deadline, f"{pool.name}: the client kept a dead session"
                    await asyncio.sleep(0.05)
            async with pool.connection() as conn:
                assert await conn.fetchval("SELECT 1") == 1


async def test_offsets_are_bounded_and_keyset_pages_read_the_whole_list(
    client: httpx.AsyncClient, db: asyncpg.Connection, api_key: str
) -> None:
    # Values big enough that pages shrink to a dozen rows: page seams are everywhere.
    score_ids = await _insert_rows(db, 300, value_bytes=20_000)
    headers = basic_auth(api_key)

    whole = await client.get(URL, headers=headers)
    assert whole.status_code == 200, whole.text
    reads = [(await client.get(f"{URL}/{score_id}", headers=headers)) for score_id in score_ids]
    # Byte for byte, each line is the read body of its score.
    assert whole.content == b"".join(read.content + b"\n" for read in reads)

    for filters, expected in (
        ({}, score_ids),
        ({"evaluation_run_id": "run-1"}, score_ids[1::2]),
    ):
        paged: list[str] = []
        after: str | None = None
        for _ in range(len(expected)):
            params: dict[str, Any] = {"limit": 7, **filters}
            if after is not None:
                params["after"] = after
            page = await client.get(URL, params=params, headers=headers)
            ids = [json.loads(line)["score_id"] for line in page.text.splitlines()]
            if not ids:
                break
            paged += ids
            after = ids[-1]
        assert paged == expected

    # `after` need not be a stored id; `offset` then skips from there.
    between = str(uuid.UUID(int=uuid.UUID(score_ids[99]).int + 1))
    response = await client.get(
        URL, params={"after": between, "offset": 2, "limit": 3}, headers=headers
    )
    assert [json.loads(line)["score_id"] for line in response.text.splitlines()] == (
        score_ids[102:105]
    )

    deep = await client.get(URL, params={"offset": MAX_LIST_OFFSET + 1}, headers=headers)
    assert deep.status_code == 422, deep.text
    (error,) = deep.json()["detail"]
    assert error["loc"] == ["query", "offset"]
    assert error["type"] == "less_than_equal"
    assert (await client.get(URL, params={"offset": MAX_LIST_OFFSET}, headers=headers)).content == (
        b""
    )

    spec = (await client.get("/openapi.json")).json()
    operation = spec["paths"]["/v2/{entity}/{project}/scores"]["get"]
    parameters = {parameter["name"]: parameter for parameter in operation["parameters"]}
    assert parameters["offset"]["schema"]["maximum"] == MAX_LIST_OFFSET
    assert "after" in parameters["offset"]["description"]
    assert {"type": "string", "format": "uuid"} in parameters["after"]["schema"]["anyOf"]


async def _post_with(client: httpx.AsyncClient, key: str) -> httpx.Response:
    return await client.post(URL, json=score_body(), headers=bearer_auth(key))


async def test_made_up_keys_never_push_a_good_key_out_of_the_cache(
    settings: Settings, db: asyncpg.Connection, api_key: str
) -> None:
    ttl = 0.5
    async with TcpProxy.for_url(settings.database_url) as proxy:
        through_proxy = settings.model_copy(
            update={
                "database_url": proxy.url_through(settings.database_url),
                "auth_cache_ttl_seconds": ttl,
                "auth_cache_max_entries": 50,
            }
        )
        async with serving(through_proxy) as client:
            assert (await _post_with(client, api_key)).status_code == 200

            statuses: dict[int, int] = {}
            for _ in range(20):
                answers = await asyncio.gather(
                    *(_post_with(client, _made_up_key()) for _ in range(100))
                )
                for answer in answers:
                    statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1
                    if answer.status_code == 503:
                        _assert_503_retry_after(answer)
            # Many made-up keys were looked up (and cached as unknown); the rest were over
            # the lookup rate, refused at once.
            assert set(statuses) <= {401, 503}, statuses
            assert statuses.get(401, 0) >= through_proxy.auth_cache_max_entries, statuses

            await proxy.cut()
            await asyncio.sleep(ttl + 0.1)  # the good key's entry is stale: only it stands
            kept = await _post_with(client, api_key)
            assert kept.status_code == 200, kept.text


async def test_key_lookups_beyond_their_rate_are_refused_at_once(
    settings: Settings, db: asyncpg.Connection, api_key: str
) -> None:
    rate = 5.0
    _, new_key = await create_key(db, ENTITY, name="arrives during the flood")
    bounded = settings.model_copy(update={"auth_lookups_per_second": rate})
    async with serving(bounded) as client:
        assert (await _post_with(client, api_key)).status_code == 200
        made_up = [_made_up_key() for _ in range(30)]
        answers = [await _post_with(client, key) for key in made_up]
        refused = [key for key, a in zip(made_up, answers, strict=True) if a.status_code == 503]
        unknown = [key for key, a in zip(made_up, answers, strict=True) if a.status_code == 401]
        # The bucket held `rate` lookups; a token or two may have refilled meanwhile.
        assert rate - 1 <= len(unknown) <= rate + 2, [a.status_code for a in answers]
        assert len(unknown) + len(refused) == len(made_up)
        for answer in answers:
            if answer.status_code == 503:
                _assert_503_retry_after(answer)

        # Neither a cached good key nor a key already found unknown needs a lookup.
        assert (await _post_with(client, api_key)).status_code == 200
        assert (await _post_with(client, unknown[0])).status_code == 401
        # Once the bucket refills, a key not yet seen is looked up again.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while (fresh := await _post_with(client, new_key)).status_code == 503:
            assert loop.time() < deadline, "the lookup rate never refilled"
            await asyncio.sleep(1 / rate)
        assert fresh.status_code == 200, fresh.text


async def test_key_lookups_beyond_their_concurrency_are_refused_not_queued(
    settings: Settings, db: asyncpg.Connection
) -> None:
    concurrency = 2
    # Every lookup is slow: PostgreSQL answers a second late.
    async with TcpProxy.for_url(settings.database_url, latency=1.0) as proxy:
        slow_database = settings.model_copy(
            update={
                "database_url": proxy.url_through(settings.database_url),
                "auth_lookup_concurrency": concurrency,
            }
        )
        async with serving(slow_database) as client:
            answered = await asyncio.gather(
                *(_timed(_post_with(client, _made_up_key())) for _ in range(20))
            )
    prompt = [seconds < 0.5 for _, seconds in answered]
    for response, _ in answered:
        _assert_503_retry_after(response)
    assert prompt.count(True) >= len(answered) - concurrency, answered


async def test_a_key_found_unknown_stays_401_through_a_database_outage(
    settings: Settings,
) -> None:
    unknown = _made_up_key()
    async with TcpProxy.for_url(settings.database_url) as proxy:
        through_proxy = settings.model_copy(
            update={"database_url": proxy.url_through(settings.database_url)}
        )
        async with serving(through_proxy) as client:
            assert (await _post_with(client, unknown)).status_code == 401
            await proxy.cut()
            assert (await _post_with(client, unknown)).status_code == 401
            _assert_503_retry_after(await _post_with(client, _made_up_key()))
