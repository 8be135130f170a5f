"""Writing scores to PostgreSQL, idempotently, a batch per statement."""

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import NamedTuple

import asyncpg

from shared.score_fields import FIELD_NAMES
from shared.stored_events import payloads
from worker import sql
from worker._metrics import observe_accept_to_stored
from worker.decode import ScoreRow

log = logging.getLogger(__name__)

_INSERT_TIMEOUT_SECONDS = 60
_FAILURE_TIMEOUT_SECONDS = 5
# Where a row holds its id, entity and project (the INSERT locks the projects, and
# announces the ids).
_SCORE_ID = FIELD_NAMES.index("score_id")
_ENTITY, _PROJECT = FIELD_NAMES.index("entity"), FIELD_NAMES.index("project")


class FailedScore(NamedTuple):
    """A score the worker refused, as its message named it."""

    score_id: str
    entity: str
    project: str


class StorageRejected(Exception):
    """PostgreSQL refused the data itself; retrying the same rows cannot succeed."""


# Errors caused by the rows, not by the database being unavailable.
_DATA_ERRORS = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.ProgramLimitExceededError,
)


class ScoreStore:
    """The scores table, behind a connection pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._begin_in_order = asyncio.Lock()  # asyncio's locks are fair: first come, first in

    async def persist_batch(self, rows: Sequence[ScoreRow]) -> int:
        """Insert rows in one transaction; returns how many were stored (new, not deleted)."""
        # One array per column: a row's values and sql.INSERT_SCORES's parameters are both
        # in the order of SCORE_FIELDS.
        columns = tuple(zip(*rows, strict=True))
        projects = set(zip(columns[_ENTITY], columns[_PROJECT], strict=True))  # nearly always one
        try:
            async with contextlib.AsyncExitStack() as stack:
                # Transactions begin in the order their batches were handed over (delivery
                # order), even with several in flight; they may commit in any order.
                async with self._begin_in_order:
                    conn = await stack.enter_async_context(self._pool.acquire())
                    await stack.enter_async_context(conn.transaction())
                await conn.execute(
                    sql.LOCK_PROJECTS_SHARED,
                    [entity for entity, _ in projects],
                    [project for _, project in projects],
                )
                stored = await conn.fetch(
                    sql.INSERT_SCORES, *columns, timeout=_INSERT_TIMEOUT_SECONDS
                )
                # Every id of the batch is settled at commit, stored now or before, or deleted.
                await conn.execute(sql.ANNOUNCE_SETTLED, payloads(columns[_SCORE_ID]))
        except _DATA_ERRORS as exc:
            raise StorageRejected(str(exc)) from exc
        try:
            groups = [(row["entity"], row["created_at"], row["scores"]) for row in stored]
            observe_accept_to_stored(groups, datetime.now(UTC))
        except Exception:  # metrics must never cost a stored batch its ack
            log.exception("observing a stored batch's accept-to-stored times failed")
        return sum(row["scores"] for row in stored)

    async def record_failures(
        self, failed: Sequence[FailedScore], reason: str, detail: str
    ) -> None:
        """Record why these scores were refused, and announce them as settled, at once."""
        ids = [score.score_id for score in failed]
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                sql.INSERT_FAILURES,
                ids,
                [score.entity for score in failed],
                [score.project for score in failed],
                reason,
                detail,
                timeout=_FAILURE_TIMEOUT_SECONDS,
            )
            await conn.execute(
                sql.ANNOUNCE_SETTLED, payloads(ids), timeout=_FAILURE_TIMEOUT_SECONDS
            )

    async def purge_failures(self, older_than_seconds: float, chunk: int = 10_000) -> int:
        """Forget refusals older than the retention period; returns how many."""
        return await self._purge(sql.PURGE_FAILURES, older_than_seconds, chunk)

    async def purge_idempotency_keys(self, older_than_seconds: float, chunk: int = 10_000) -> int:
        """Forget Idempotency-Keys older than the retention period; returns how many."""
        return await self._purge(sql.PURGE_IDEMPOTENCY_KEYS, older_than_seconds, chunk)

    async def purge_tombstones(self, older_than_seconds: float, chunk: int = 10_000) -> int:
        """Forget deletes older than the retention period; returns how many."""
        return await self._purge(sql.PURGE_TOMBSTONES, older_than_seconds, chunk)

    async def _purge(self, statement: str, older_than_seconds: float, chunk: int) -> int:
        # A chunk per statement: no long transaction, no lock held on a large table.
        purged = 0
        while True:
            status = await self._pool.execute(statement, older_than_seconds, chunk)
            deleted = int(status.rsplit(" ", 1)[-1])
            purged += deleted
            if deleted < chunk:
                return purged
