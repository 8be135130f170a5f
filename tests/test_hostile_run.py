"""A hostile run: every attack of issue 13 at once, while another tenant keeps posting.

A real api and worker run as subprocesses. Tenant `acme` posts single scores steadily
throughout; meanwhile another tenant and anonymous clients do everything they can to the
HTTP door and a direct publisher sends every kind of bad message to the queue, from a
process of their own (tests/support/hostile_clients.py), as from other machines: their
client-side work must not stall the clock that times acme's requests. Afterwards: every
score answered 200 is stored exactly once, acme's requests were each answered 200 within a
second, the worker never restarted, every dlq command works, the api stayed under 200 MB
and the worker within its byte budget plus 100 MB.
"""

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg

from api.keys import create_key
from shared.settings import MIB, Settings
from shared.topology import DEAD_LETTER_QUEUE
from tests.support.hostile_clients import ATTACK_SECONDS, ATTACKER
from tests.support.load import LoadGenerator, assert_stored_exactly_once
from tests.support.memory import rss_bytes
from tests.support.processes import (
    REPO_ROOT,
    CliProcess,
    api_process,
    connect_broker,
    settings_env,
    worker_process,
)

WORKER_BUDGET_BYTES = 64 * MIB
API_RSS_LIMIT_BYTES = 200 * 1000 * 1000
WORKER_RSS_MARGIN_BYTES = 100 * 1000 * 1000
PROMPT_SECONDS = 1.0
DEADLINE_SECONDS = ATTACK_SECONDS / 2


class PeakMemory:
    """Samples the RSS of some processes every 100 ms and keeps each one's peak."""

    def __init__(self, pids: dict[str, int]) -> None:
        self._pids = pids
        self.peaks = dict.fromkeys(pids, 0)
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while True:
            for name, pid in self._pids.items():
                self.peaks[name] = max(self.peaks[name], rss_bytes(pid))
            await asyncio.sleep(0.1)

    @contextlib.asynccontextmanager
    async def watching(self) -> AsyncIterator["PeakMemory"]:
        """Sample for the length of the block."""
        self._task = asyncio.create_task(self._sample())
        try:
            yield self
        finally:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def _attackers(settings: Settings, base_url: str, key: str) -> dict[str, Any]:
    """Run tests/support/hostile_clients.py to its end; what it reports."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.support.hostile_clients",
        base_url,
        key,
        cwd=REPO_ROOT,
        env=settings_env(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout=ATTACK_SECONDS + 60)
    except BaseException:  # timed out or cancelled: no attacker outlives the test
        process.kill()
        await process.wait()
        raise
    text = output.decode(errors="replace")
    assert process.returncode == 0, text
    report: dict[str, Any] = json.loads(text.splitlines()[-1])
    return report


async def test_a_hostile_run_harms_no_other_score_or_tenant(
    settings: Settings, db: asyncpg.Connection, api_key: str, tmp_path: Path
) -> None:
    _, attacker_key = await create_key(db, ATTACKER, name="mallory")
    hostile = settings.model_copy(
        update={
            "worker_prefetch_bytes": WORKER_BUDGET_BYTES,
            # Shorter than the attack, so that every slow client is cut while it lasts.
            "http_header_timeout_seconds": DEADLINE_SECONDS,
            "http_body_timeout_seconds": DEADLINE_SECONDS,
            "list_send_timeout_seconds": DEADLINE_SECONDS,
        }
    )
    async with (
        api_process(hostile) as api,
        worker_process(hostile) as worker,
    ):
        memory = PeakMemory({"api": api.process.pid, "worker": worker.pid})
        async with memory.watching(), LoadGenerator(api.base_url, api_key, clients=4) as load:
            attacked = await _attackers(hostile, api.base_url, attacker_key)
            await load.stop()
        odd_statuses, big_ids = attacked["odd"], attacked["big"]
        assert all(400 <= status < 500 for status in odd_statuses), odd_statuses

        slow = [o for o in load.outcomes if o.status != 200 or o.seconds > PROMPT_SECONDS]
        assert not slow, f"{len(slow)} of acme's {len(load.outcomes)} posts: {slow[:3]}"
        await assert_stored_exactly_once(db, load.accepted_ids() + big_ids)

        assert worker.returncode is None, worker.output
        assert "Traceback" not in worker.output, worker.output
        assert memory.peaks["api"] < API_RSS_LIMIT_BYTES, memory.peaks
        assert memory.peaks["worker"] < WORKER_BUDGET_BYTES + WORKER_RSS_MARGIN_BYTES, memory.peaks

        async with connect_broker(hostile) as broker:
            dead = await broker.wait_for_ready_count(DEAD_LETTER_QUEUE, 5, timeout=20)
            assert dead == 5, f"{dead} dead letters"
        await _every_dlq_command_works(hostile, tmp_path)


async def _dlq(settings: Settings, *args: str) -> str:
    async with CliProcess("dlq", ["dlq", *args], settings) as dlq:
        assert await dlq.wait(timeout=30) == 0, dlq.output
        return dlq.output


async def _every_dlq_command_works(settings: Settings, tmp_path: Path) -> None:
    """list, export and show every letter; replay one (it comes back, refused again); purge
    all of them into an export file."""
    await _dlq(settings, "list")
    exported = tmp_path / "letters.jsonl"
    await _dlq(settings, "export", str(exported))
    ids = [json.loads(line)["id"] for line in exported.read_text().splitlines()]
    assert len(ids) == 5, ids
    for letter_id in ids:
        await _dlq(settings, "show", letter_id)
    await _dlq(settings, "replay", "--id", ids[0])
    async with connect_broker(settings) as broker:
        assert await broker.wait_for_ready_count(DEAD_LETTER_QUEUE, 5, timeout=20) == 5
    purged = tmp_path / "purged.jsonl"
    await _dlq(settings, "purge", "--yes", "--export", str(purged))
    assert len(purged.read_text().splitlines()) == 5
    async with connect_broker(settings) as broker:
        assert await broker.ready_count(DEAD_LETTER_QUEUE) == 0
