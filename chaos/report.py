"""What each scenario did to the scores, measured once its fault is healed, against the targets.

A 200 means the score is safe: so, once every 200'd score had time to arrive, none may be
missing (lost), none stored twice under two ids (duplicated: two rows for one marker), none
dead-lettered; and clients may go without a 200 for at most GAP_TARGET_BROKER_SECONDS while a
broker node is lost, GAP_TARGET_DATABASE_SECONDS while the database fails over. A fault is
no reason for any answer but a 200 or a 503 (a dropped connection is retried like a 503).
"""

import asyncio
import contextlib
import itertools
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from rich.console import Console
from rich.table import Table

from chaos.load import ENTITY, PROJECT, LoadRecord
from shared.topology import DEAD_LETTER_QUEUE

GAP_TARGET_BROKER_SECONDS = 10.0
GAP_TARGET_DATABASE_SECONDS = 30.0
SETTLE_TIMEOUT_SECONDS = 90.0
_POLL_SECONDS = 0.5
_CONNECT_TIMEOUT_SECONDS = 5.0

STORED_AMONG = "SELECT score_id::text FROM scores WHERE score_id = ANY($1::uuid[])"
RUN_ROWS = """
SELECT count(*) FROM scores WHERE entity = $1 AND project = $2 AND evaluation_run_id = $3
"""
# Markers with more than one row: one score stored twice under two ids.
DUPLICATED_MARKERS = """
SELECT count(*) FROM (
    SELECT 1 FROM scores
    WHERE entity = $1 AND project = $2 AND evaluation_run_id = $3
    GROUP BY value->>'chaos', value->>'i'
    HAVING count(*) > 1
) AS twice
"""


@dataclass(frozen=True)
class ScenarioResult:
    """One scenario's answers and scores, and whether they met the targets."""

    name: str
    fault: str
    run_id: str
    seconds: float
    attempts: int
    ok: int
    unavailable: int
    other: dict[str, int]
    abandoned: int
    accepted: int
    stored: int
    lost: int
    duplicated: int
    dead_lettered: int
    longest_gap: float
    gap_target: float
    fault_failed: str | None = None
    lost_ids: list[str] = field(default_factory=list)
    # Per api: the longest time it answered nothing but 503s (chaos/load.py), not a target.
    api_unavailable: list[float] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        """Each target missed, said in words; empty when all were met."""
        missed = [self.fault_failed] if self.fault_failed else []
        if self.ok == 0:
            missed.append("no request was answered 200")
        if self.lost:
            missed.append(f"{self.lost} scores answered 200 were never stored")
        if self.duplicated:
            missed.append(f"{self.duplicated} scores were stored twice")
        if self.dead_lettered:
            missed.append(f"{self.dead_lettered} messages were dead-lettered")
        if unexpected := sum(n for what, n in self.other.items() if what.startswith("status")):
            missed.append(f"{unexpected} answers were neither 200 nor 503")
        if self.longest_gap > self.gap_target:
            missed.append(f"no 200 for {self.longest_gap:.1f}s (target {self.gap_target:.0f}s)")
        return missed


def longest_gap(started: float, stopped: float, ok_times: Sequence[float]) -> float:
    """The longest time without a 200 between the load's start and its stop."""
    moments = [started, *sorted(ok_times), stopped]
    return max(later - earlier for earlier, later in itertools.pairwise(moments))


async def measure(
    name: str,
    fault: str,
    run_id: str,
    record: LoadRecord,
    *,
    database_url: str,
    broker_urls: Sequence[str],
    gap_target: float,
    fault_failed: str | None = None,
    settle_timeout: float = SETTLE_TIMEOUT_SECONDS,
) -> ScenarioResult:
    """Wait (bounded) until every 200'd score is stored, then count what the targets ask."""
    missing = await _wait_until_stored(database_url, list(record.accepted), settle_timeout)
    stored, duplicated = await _run_counts(database_url, run_id)
    return ScenarioResult(
        name=name,
        fault=fault,
        run_id=run_id,
        seconds=round(record.stopped - record.started, 1),
        attempts=record.attempts,
        ok=record.ok,
        unavailable=record.unavailable,
        other=dict(record.other),
        abandoned=record.abandoned,
        accepted=len(record.accepted),
        stored=stored,
        lost=len(missing),
        duplicated=duplicated,
        dead_lettered=await count_dead_letters(broker_urls, run_id),
        longest_gap=round(longest_gap(record.started, record.stopped, record.ok_times), 2),
        gap_target=gap_target,
        fault_failed=fault_failed,
        lost_ids=sorted(missing)[:20],
        api_unavailable=[round(seconds, 2) for seconds in record.longest_unavailable],
    )


async def _wait_until_stored(database_url: str, ids: list[str], seconds: float) -> set[str]:
    """The ids still not stored when all are, or when the seconds have passed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    missing = set(ids)
    while True:
        # The database may still be failing over: a refused connection is another poll.
        with contextlib.suppress(OSError, asyncpg.PostgresError):
            conn = await asyncpg.connect(database_url, timeout=_CONNECT_TIMEOUT_SECONDS)
            try:
                found = await conn.fetch(STORED_AMONG, list(missing))
            finally:
                await conn.close()
            missing -= {row["score_id"] for row in found}
        if not missing or loop.time() > deadline:
            return missing
        await asyncio.sleep(_POLL_SECONDS)


async def _run_counts(database_url: str, run_id: str) -> tuple[int, int]:
    conn = await asyncpg.connect(database_url, timeout=_CONNECT_TIMEOUT_SECONDS)
    try:
        stored: int = await conn.fetchval(RUN_ROWS, ENTITY, PROJECT, run_id)
        duplicated: int = await conn.fetchval(DUPLICATED_MARKERS, ENTITY, PROJECT, run_id)
    finally:
        await conn.close()
    return stored, duplicated


async def count_dead_letters(broker_urls: Sequence[str], run_id: str) -> int:
    """Messages in scores.dead that carry run_id, left where they are for an operator.

    They are taken without acknowledgement and return to the queue when the channel closes.
    The first node that answers is asked: a quorum queue is the same on every node.
    """
    failures: list[str] = []
    for url in broker_urls:
        try:
            connection = await aio_pika.connect(url, timeout=_CONNECT_TIMEOUT_SECONDS)
        except CONNECTION_EXCEPTIONS as exc:
            failures.append(f"{url}: {exc!r}")
            continue
        async with connection:
            channel = await connection.channel()
            queue = await channel.get_queue(DEAD_LETTER_QUEUE, ensure=False)
            needle = run_id.encode()
            count = 0
            while (message := await queue.get(no_ack=False, fail=False)) is not None:
                count += needle in message.body
            return count
    raise RuntimeError(f"no broker node answered for {DEAD_LETTER_QUEUE}: {failures}")


def table(results: Sequence[ScenarioResult]) -> Table:
    """The results as a table, one row a scenario."""
    grid = Table(title="chaos run")
    for column in (
        "scenario",
        "sent",
        "200",
        "503",
        "other",
        "scores 200",
        "stored",
        "lost",
        "dup",
        "dead",
        "gap s",
        "api 503s s",
        "result",
    ):
        grid.add_column(column, justify="left" if column in ("scenario", "result") else "right")
    for result in results:
        grid.add_row(
            result.name,
            str(result.attempts),
            str(result.ok),
            str(result.unavailable),
            str(sum(result.other.values())),
            str(result.accepted),
            str(result.stored),
            str(result.lost),
            str(result.duplicated),
            str(result.dead_lettered),
            f"{result.longest_gap:.1f}/{result.gap_target:.0f}",
            "/".join(f"{seconds:.1f}" for seconds in result.api_unavailable),
            "[green]ok[/]" if not result.failures else "[red]" + "; ".join(result.failures) + "[/]",
        )
    return grid


def print_report(results: Sequence[ScenarioResult], console: Console | None = None) -> None:
    """Print the table, and under it each scenario's fault."""
    # Piped, rich would fit the table into 80 columns.
    console = console or Console(width=None if sys.stdout.isatty() else 160)
    console.print(table(results))
    for result in results:
        other = f", other answers {result.other}" if result.other else ""
        console.print(f"{result.name}: {result.fault}{other}")


def as_json(results: Sequence[ScenarioResult], **run: Any) -> dict[str, Any]:
    """The run (seed, duration, ...) and each scenario's result, with its failures."""
    return {
        **run,
        "passed": all(not result.failures for result in results),
        "scenarios": [{**asdict(result), "failures": result.failures} for result in results],
    }


def write_json(path: Path, results: Sequence[ScenarioResult], **run: Any) -> None:
    """Write as_json's document to path."""
    path.write_text(json.dumps(as_json(results, **run), indent=2) + "\n")
