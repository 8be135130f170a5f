"""The API's reads and writes of scores in PostgreSQL; every statement lives in api/sql.py."""

import json
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, NamedTuple
from uuid import UUID

import asyncpg
from asyncpg.pool import PoolAcquireContext
from pydantic_core import to_json

from api import sql
from shared.score_fields import ANSWERED_FIELDS, Kind, ScoreField

# A page of a list starts this small and doubles, up to PAGE_MAX_ROWS rows and about
# PAGE_BYTES of JSON Lines: scores may carry values of a megabyte each, and a page is held
# in memory whole.
FIRST_PAGE_ROWS = 16
PAGE_MAX_ROWS = 500
PAGE_BYTES = 256 * 1024
# Before every score id (ids are UUIDv7, never nil): the keyset of a list's first page.
_BEFORE_EVERY_SCORE = UUID(int=0)
_CLAIM_ATTEMPTS = 5
_CONNECT_TIMEOUT_SECONDS = 5
# The client's own deadline on a statement, past PostgreSQL's statement_timeout: it only
# fires when the server (or the network to it) stopped answering altogether.
_UNANSWERED_MARGIN_SECONDS = 1.0


class BoundedPool:
    """An asyncpg pool whose every use ends in bounded time.

    Waiting for a connection ends after `acquire_timeout` with TimeoutError (a 503 at the
    routes); each statement ends after `statement_timeout`, cancelled by PostgreSQL itself
    (`statement_timeout` on every connection) or, when the server does not answer at all,
    by the client shortly after. A transaction left idle is ended by PostgreSQL
    (`idle_in_transaction_session_timeout`).
    """

    def __init__(
        self, name: str, pool: asyncpg.Pool, acquire_timeout: float, statement_timeout: float
    ) -> None:
        self.name = name
        self.pool = pool
        self.acquire_timeout = acquire_timeout
        self.query_timeout = statement_timeout + _UNANSWERED_MARGIN_SECONDS

    def connection(self) -> PoolAcquireContext:
        """A connection of the pool, waited for at most acquire_timeout."""
        return self.pool.acquire(timeout=self.acquire_timeout)

    @property
    def in_use(self) -> int:
        """Connections lent out right now."""
        return self.pool.get_size() - self.pool.get_idle_size()

    @property
    def max_size(self) -> int:
        """The most connections the pool opens."""
        return self.pool.get_max_size()

    async def close(self) -> None:
        """Close every connection, waiting for those lent out to come back."""
        await self.pool.close()


def _milliseconds(seconds: float) -> str:
    return str(max(1, round(seconds * 1000)))


async def create_bounded_pool(
    url: str,
    name: str,
    *,
    max_size: int,
    acquire_timeout: float,
    statement_timeout: float,
    idle_in_transaction_timeout: float,
) -> BoundedPool:
    """A pool of up to max_size connections; none is opened before it is needed."""
    # min_size=0: the API starts, and serves cached keys, while PostgreSQL is down.
    pool = await asyncpg.create_pool(
        url,
        min_size=0,
        max_size=max_size,
        timeout=_CONNECT_TIMEOUT_SECONDS,
        server_settings={
            # pg_stat_activity shows whose connection it is.
            "application_name": f"score-ingest api {name}",
            "statement_timeout": _milliseconds(statement_timeout),
            "idle_in_transaction_session_timeout": _milliseconds(idle_in_transaction_timeout),
        },
    )
    return BoundedPool(name, pool, acquire_timeout, statement_timeout)


def _quoted(value: Any) -> bytes:
    return b'"%s"' % str(value).encode()  # a UUID's text: nothing in it to escape


def _text(value: str) -> bytes:
    return json.dumps(value).encode()


def _jsonb_text(value: str) -> bytes:
    return value.encode()  # PostgreSQL's own text of a jsonb: JSON already


def _time(value: datetime) -> bytes:
    return to_json(value)  # as pydantic writes it, as in the message


_ENCODERS: dict[Kind, Callable[[Any], bytes]] = {
    Kind.UUID: _quoted,
    Kind.TEXT: _text,
    Kind.JSON: _jsonb_text,
    Kind.TIME: _time,
}


def _or_null(encode: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    def encode_or_null(value: Any) -> bytes:
        return b"null" if value is None else encode(value)

    return encode_or_null


def answer_encoder(fields: Sequence[ScoreField]) -> Callable[[Iterable[Any]], bytes]:
    """How a row of the columns of fields that reads answer, in their order, becomes a
    score's JSON answer."""
    members = ",".join(f'"{field.answer}":%s' for field in fields)
    template = f"{{{members}}}".encode()
    encoders = [
        _or_null(_ENCODERS[field.kind]) if field.optional else _ENCODERS[field.kind]
        for field in fields
    ]

    def answer(row: Iterable[Any]) -> bytes:
        return template % tuple(
            [encode(value) for encode, value in zip(encoders, row, strict=True)]
        )

    return answer


# A stored score as the API returns it, from a row of a read's columns (api/sql.py).
score_json = answer_encoder(ANSWERED_FIELDS)


async def read_score(pool: BoundedPool, entity: str, project: str, score_id: UUID) -> bytes | None:
    """One score of the project as JSON, or None."""
    async with pool.connection() as conn:
        row = await conn.fetchrow(
            sql.READ_SCORE, entity, project, score_id, timeout=pool.query_timeout
        )
    return None if row is None else score_json(row)


async def read_scores(
    pool: BoundedPool, entity: str, project: str, score_ids: Sequence[UUID]
) -> dict[UUID, bytes]:
    """The scores of the project among score_ids, as JSON, by id."""
    async with pool.connection() as conn:
        rows = await conn.fetch(
            sql.READ_SCORES, entity, project, score_ids, timeout=pool.query_timeout
        )
    return {row["score_id"]: score_json(row) for row in rows}


async def read_scores_or_deleted(
    pool: BoundedPool, entity: str, project: str, score_ids: Sequence[UUID]
) -> tuple[dict[UUID, bytes], set[UUID]]:
    """The scores of the project among score_ids, as JSON by id, and those of the others that
    are deleted in the entity (never to be stored), on one connection."""
    async with pool.connection() as conn:
        rows = await conn.fetch(
            sql.READ_SCORES, entity, project, score_ids, timeout=pool.query_timeout
        )
        found = {row["score_id"]: score_json(row) for row in rows}
        missing = [score_id for score_id in score_ids if score_id not in found]
        if not missing:
            return found, set()
        deleted = await conn.fetch(sql.DELETED_IDS, entity, missing, timeout=pool.query_timeout)
    return found, {row["score_id"] for row in deleted}


class SettledScore(NamedTuple):
    """A stored score found by its id alone, with the project it belongs to."""

    entity: str
    project: str
    json: bytes


async def read_settled(pool: BoundedPool, score_ids: Sequence[str]) -> dict[str, SettledScore]:
    """The stored scores among score_ids, in whatever project, by id (as text)."""
    async with pool.connection() as conn:
        rows = await conn.fetch(sql.READ_SETTLED, score_ids, timeout=pool.query_timeout)
    return {
        str(row["score_id"]): SettledScore(
            row["entity"], row["project"], score_json(tuple(row)[2:])
        )
        for row in rows
    }


async def score_fate(
    pool: BoundedPool, entity: str, project: str, score_id: UUID
) -> asyncpg.Record:
    """When the score was stored in the project, deleted in the entity, and its latest
    refusal in the project (reason, detail, failed_at), each None if it never was."""
    async with pool.connection() as conn:
        row = await conn.fetchrow(
            sql.SCORE_FATE, entity, project, score_id, timeout=pool.query_timeout
        )
    assert row is not None  # the statement selects one row, whatever is found
    return row


async def _list_page(
    pool: BoundedPool,
    entity: str,
    project: str,
    evaluation_run_id: str | None,
    after: UUID,
    rows: int,
    offset: int,
) -> list[asyncpg.Record]:
    """Up to `rows` scores after the id `after` (then `offset` skipped), on a connection
    taken for this page alone."""
    async with pool.connection() as conn:
        if evaluation_run_id is None:
            return await conn.fetch(
                sql.LIST_SCORES_PAGE,
                entity,
                project,
                after,
                rows,
                offset,
                timeout=pool.query_timeout,
            )
        return await conn.fetch(
            sql.LIST_RUN_SCORES_PAGE,
            entity,
            project,
            evaluation_run_id,
            after,
            rows,
            offset,
            timeout=pool.query_timeout,
        )


def _next_page_rows(rows: int, page_bytes: int) -> int:
    """Twice the last page's rows, at most PAGE_MAX_ROWS and about PAGE_BYTES of output."""
    fitting = PAGE_BYTES * rows // max(page_bytes, 1)
    return max(1, min(PAGE_MAX_ROWS, 2 * rows, fitting))


async def open_score_stream(
    pool: BoundedPool,
    entity: str,
    project: str,
    evaluation_run_id: str | None,
    limit: int,
    offset: int,
    after: UUID | None,
) -> AsyncIterator[bytes]:
    """JSON Lines of the project's scores in creation order, read in keyset pages.

    Each page is one short query (`score_id > last` in score_id order) on a connection
    taken for it and given back at once, so a client that stops reading holds nothing in
    PostgreSQL, and a page deep into a project costs what the first does. Memory stays at
    one page whatever the limit. The first page is read before this returns, so an
    unreachable or busy database surfaces as an exception before any response has started.
    """
    asked = min(FIRST_PAGE_ROWS, limit)
    first = await _list_page(
        pool, entity, project, evaluation_run_id, after or _BEFORE_EVERY_SCORE, asked, offset
    )

    async def chunks() -> AsyncIterator[bytes]:
        page, rows_asked, remaining = first, asked, limit
        while page:
            chunk = b"".join(score_json(row) + b"\n" for row in page)
            yield chunk
            remaining -= len(page)
            if len(page) < rows_asked or remaining == 0:
                return
            rows_asked = min(remaining, _next_page_rows(len(page), len(chunk)))
            last = page[-1]["score_id"]
            page = await _list_page(pool, entity, project, evaluation_run_id, last, rows_asked, 0)

    return chunks()


async def delete_scores(
    pool: BoundedPool, entity: str, project: str, score_ids: Sequence[UUID]
) -> int:
    """Delete scores of the project and leave tombstones; returns how many rows went."""
    timeout = pool.query_timeout
    async with pool.connection() as conn, conn.transaction():
        await conn.execute(sql.LOCK_PROJECT_EXCLUSIVE, entity, project, timeout=timeout)
        await conn.execute(sql.INSERT_TOMBSTONES, entity, project, score_ids, timeout=timeout)
        status = await conn.execute(sql.DELETE_SCORES, entity, project, score_ids, timeout=timeout)
    return int(status.rsplit(" ", 1)[-1])


async def claim_idempotency_key(
    pool: BoundedPool,
    entity: str,
    project: str,
    key: str,
    request_hash: bytes,
    score_ids: Sequence[UUID],
    ttl_seconds: float,
) -> tuple[bytes, list[UUID]]:
    """Record key → (request_hash, score_ids) unless already recorded; returns what is stored."""
    async with pool.connection() as conn:
        for _ in range(_CLAIM_ATTEMPTS):
            row = await conn.fetchrow(
                sql.CLAIM_IDEMPOTENCY_KEY,
                entity,
                project,
                key,
                request_hash,
                score_ids,
                ttl_seconds,
                timeout=pool.query_timeout,
            )
            if row is not None:
                return bytes(row["request_hash"]), list(row["score_ids"])
    raise RuntimeError(f"could not claim Idempotency-Key after {_CLAIM_ATTEMPTS} attempts")
