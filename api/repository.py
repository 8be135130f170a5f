"""The API's reads and writes of scores in PostgreSQL; every statement lives in api/sql.py."""

import json
from collections.abc import AsyncIterator, Sequence
from uuid import UUID

import asyncpg

from api import sql

STREAM_CHUNK_ROWS = 500
_CLAIM_ATTEMPTS = 5


def score_json(row: asyncpg.Record) -> bytes:
    """A stored score as the API returns it; `value` is PostgreSQL's own jsonb text."""
    return b'{"score_id":"%s","scorer":%s,"value":%s,"evaluation_run_id":%s,"wb_user_id":%s}' % (
        str(row["score_id"]).encode(),
        json.dumps(row["scorer"]).encode(),
        row["value"].encode(),
        json.dumps(row["evaluation_run_id"]).encode(),
        json.dumps(row["created_by"]).encode(),
    )


async def read_score(pool: asyncpg.Pool, entity: str, project: str, score_id: UUID) -> bytes | None:
    """One score of the project as JSON, or None."""
    row = await pool.fetchrow(sql.READ_SCORE, entity, project, score_id)
    return None if row is None else score_json(row)


async def open_score_stream(
    pool: asyncpg.Pool,
    entity: str,
    project: str,
    evaluation_run_id: str | None,
    limit: int,
    offset: int,
) -> AsyncIterator[bytes]:
    """JSON Lines of the project's scores in creation order, read through a server-side cursor.

    The first chunk is fetched before this returns, so an unreachable database surfaces as
    an exception here, before any response has started; later chunks are read as the
    client consumes them, so memory stays at one chunk whatever the limit.
    """
    conn = await pool.acquire()
    transaction = conn.transaction(readonly=True)
    try:
        await transaction.start()
        cursor = await conn.cursor(
            sql.LIST_SCORES, entity, project, evaluation_run_id, limit, offset
        )
        first = await cursor.fetch(STREAM_CHUNK_ROWS)
    except BaseException:
        await pool.release(conn)
        raise

    async def chunks() -> AsyncIterator[bytes]:
        try:
            rows = first
            while rows:
                yield b"".join(score_json(row) + b"\n" for row in rows)
                if len(rows) < STREAM_CHUNK_ROWS:
                    break
                rows = await cursor.fetch(STREAM_CHUNK_ROWS)
            await transaction.commit()
        finally:
            await pool.release(conn)

    return chunks()


async def delete_scores(
    pool: asyncpg.Pool, entity: str, project: str, score_ids: Sequence[UUID]
) -> int:
    """Delete scores of the project and leave tombstones; returns how many rows went."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(sql.LOCK_PROJECT_EXCLUSIVE, entity, project)
        await conn.execute(sql.INSERT_TOMBSTONES, entity, project, score_ids)
        status = await conn.execute(sql.DELETE_SCORES, entity, project, score_ids)
    return int(status.rsplit(" ", 1)[-1])


async def claim_idempotency_key(
    pool: asyncpg.Pool,
    entity: str,
    project: str,
    key: str,
    request_hash: bytes,
    score_ids: Sequence[UUID],
    ttl_seconds: float,
) -> tuple[bytes, list[UUID]]:
    """Record key → (request_hash, score_ids) unless already recorded; returns what is stored."""
    for _ in range(_CLAIM_ATTEMPTS):
        row = await pool.fetchrow(
            sql.CLAIM_IDEMPOTENCY_KEY,
            entity,
            project,
            key,
            request_hash,
            score_ids,
            ttl_seconds,
        )
        if row is not None:
            return bytes(row["request_hash"]), list(row["score_ids"])
    raise RuntimeError(f"could not claim Idempotency-Key after {_CLAIM_ATTEMPTS} attempts")
