"""Fairness (issue 17): one tenant's backlog must not delay another tenant's scores.

Tenant A posts a backlog (500k scores by default) in batch POSTs of 500 with wrk, four
connections as in the bench's batch load, as fast as the api takes them, for as long as
that backlog takes (at the rate of a 3 s probe); tenant B posts single
scores at a steady 50/s, on a project that lands on another shard than A's (the first
`fair-b-<i>` whose shard differs). One api and one worker, as in the rest of the bench.
B's accept-to-stored latency is read from its rows, `persisted_at - created_at` (the api's
time of acceptance to the start of the storing transaction), first with B alone for
QUIET_SECONDS, then while A posts and until A's whole backlog is stored. A's throughput is
its accepted scores per second beside B, compared with A posting alone for as long, its
backlog drained before B starts (a short run is faster: the queue takes the burst while
the worker has not yet caught up to compete for the cores, so the baseline lasts as long
as the run it is compared with), in A_ROUNDS interleaved rounds compared by their medians,
A alone first in odd rounds and beside B first in even ones.

Each round says whether RabbitMQ rolled its quorum-queue write-ahead log over meanwhile
(when the broker's files can be read here: a broker on this machine). Every ~30 s at A's
rate the broker writes the log's entries out to segment files, which takes 15-30 % of a
core for the seconds of one round and lowers A's rate in it by 10-30 %. A's own volume
decides when, not B, so it lands on rounds of either kind at random: nine rounds, compared
by their medians, keep a few such rounds from deciding the comparison (BENCHMARKS.md,
"Fairness", session 11).
"""

import asyncio
import glob
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

import aiohttp
import asyncpg

from bench._load import WrkResult, run_wrk
from bench._services import (
    ENTITY,
    BenchEnvironment,
    BenchError,
    ServerProcess,
    free_port,
    score_ingest_command,
)
from bench._system import CpuWindow
from shared.settings import Settings
from shared.topology import shard_of

A_PROJECT = "fair-a"
BATCH_SCORES = 500
A_CONNECTIONS = 4  # as the bench's batch load (--batch-connections)
A_THREADS = 2
A_PROBE_SECONDS = 3
A_ROUNDS = 9
B_RATE_PER_S = 50.0
QUIET_SECONDS = 10.0
IDLE_SECONDS = 5.0
B_P99_TARGET_S = 1.0
A_SHARE_TARGET = 0.9
_DRAIN_TIMEOUT_S = 900.0
# A broker of this machine's write-ahead log files (Debian's and RabbitMQ's own layout).
_RABBITMQ_WAL_FILES = "/var/lib/rabbitmq/mnesia/*/quorum/*/*.wal"
_LATENCIES = """
SELECT extract(epoch FROM persisted_at - created_at)::float8 AS seconds
FROM scores WHERE entity = $1 AND project = $2 AND prediction_id = $3 ORDER BY 1
"""


@dataclass(frozen=True)
class Latencies:
    """B's accept-to-stored seconds over one phase, from its rows."""

    sent: int
    answered_200: int
    stored: int
    p50_s: float
    p99_s: float
    max_s: float
    # The client's: from each request's scheduled time to its 200 (the api's share).
    answered_p50_s: float
    answered_p99_s: float


@dataclass(frozen=True)
class FairnessResult:
    """What the fairness phase measured."""

    shards: int
    a_project: str
    a_shard: int
    b_project: str
    b_shard: int
    backlog: int
    a_wrk_seconds: int
    b_rate_per_s: float
    b_alone: Latencies
    b_beside_a: Latencies
    a_probe_per_s: float
    a_alone_per_s: float  # medians of A_ROUNDS
    a_accepted_per_s: float
    a_alone_rounds: list[float]
    a_beside_rounds: list[float]
    # Each round's A latency p50 (ms) and who used the CPU meanwhile (wrk's cpu_percent).
    a_alone_round_p50_ms: list[float]
    a_beside_round_p50_ms: list[float]
    a_alone_round_cpu: list[dict[str, float]]
    a_beside_round_cpu: list[dict[str, float]]
    # Whether RabbitMQ rolled its write-ahead log over during the round (None: unknown).
    a_alone_round_wal_rollover: list[bool | None]
    a_beside_round_wal_rollover: list[bool | None]
    a_latency_p99_ms: float
    a_stored_seconds: float
    a_stored_per_s: float

    def to_json(self) -> dict[str, Any]:
        """As stored in results.json."""
        return asdict(self)


def b_project(shards: int) -> str:
    """Tenant B's project: the first `fair-b-<i>` on another shard than A's."""
    a_shard = shard_of(ENTITY, A_PROJECT, shards)
    i = 0
    while shard_of(ENTITY, f"fair-b-{i}", shards) == a_shard:
        i += 1
    return f"fair-b-{i}"


def _wal_files() -> tuple[str, ...] | None:
    """The broker's write-ahead log files, if its directory can be read here."""
    return tuple(sorted(glob.glob(_RABBITMQ_WAL_FILES))) or None


def _rolled_over(before: tuple[str, ...] | None) -> bool | None:
    """Whether the log files changed since `before` (None: they cannot be seen)."""
    after = _wal_files()
    return None if before is None or after is None else before != after


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


@dataclass
class _Sent:
    """What the paced client saw."""

    sent: int = 0
    ok: int = 0
    seconds: list[float] = field(default_factory=list)


async def _paced_singles(url: str, authorization: str, body: bytes, stop: asyncio.Event) -> _Sent:
    """POST body at B_RATE_PER_S until stop is set, open loop (each request at its time)."""
    headers = {"Authorization": authorization, "Content-Type": "application/json"}
    seen = _Sent()
    pending: set[asyncio.Task[None]] = set()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def post(scheduled: float) -> None:
            try:
                async with session.post(url, data=body, headers=headers) as res:
                    if res.status == 200:
                        seen.ok += 1
                        seen.seconds.append(time.monotonic() - scheduled)
            except (aiohttp.ClientError, TimeoutError):
                pass  # not answered 200: counted as sent only

        started = time.monotonic()
        while not stop.is_set():
            scheduled = started + seen.sent / B_RATE_PER_S
            delay = scheduled - time.monotonic()
            if delay > 0:
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                    break
                except TimeoutError:
                    pass
            task = asyncio.create_task(post(scheduled))
            pending.add(task)
            task.add_done_callback(pending.discard)
            seen.sent += 1
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    return seen


async def _b_latencies(database_url: str, project: str, label: str, sent: _Sent) -> Latencies:
    conn = await asyncpg.connect(database_url)
    try:
        seconds = [row["seconds"] for row in await conn.fetch(_LATENCIES, ENTITY, project, label)]
    finally:
        await conn.close()
    answered = sorted(sent.seconds)
    return Latencies(
        sent=sent.sent,
        answered_200=sent.ok,
        stored=len(seconds),
        p50_s=round(_quantile(seconds, 0.50), 3),
        p99_s=round(_quantile(seconds, 0.99), 3),
        max_s=round(seconds[-1], 3) if seconds else float("nan"),
        answered_p50_s=round(_quantile(answered, 0.50), 3),
        answered_p99_s=round(_quantile(answered, 0.99), 3),
    )


async def _count(database_url: str, project: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM scores WHERE entity = $1 AND project = $2", ENTITY, project
        )
    finally:
        await conn.close()
    return count


async def _wait_for_rows(database_url: str, project: str, count: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while (stored := await _count(database_url, project)) < count:
        if time.monotonic() > deadline:
            raise BenchError(f"{stored:,} of {count:,} scores of {project} stored in {timeout_s}s")
        await asyncio.sleep(0.25)


async def _wrk_batches(
    base: str, authorization: str, body_file: Path, seconds: float, watch: dict[str, int]
) -> WrkResult:
    """A's batch POSTs for `seconds` with wrk; every answer must be 200."""
    result = await run_wrk(
        base,
        path=f"/v2/{ENTITY}/{A_PROJECT}/scores/batch",
        authorization=authorization,
        body_file=body_file,
        connections=A_CONNECTIONS,
        threads=A_THREADS,
        duration_s=seconds,
        watch=watch,
    )
    if result.non_2xx or result.socket_errors:
        errors = f"{result.non_2xx} not 2xx, {result.socket_errors} socket errors"
        raise BenchError(f"A's batch POSTs: {errors}")
    return result


async def measure_fairness(
    start: Callable[..., ServerProcess],
    env: BenchEnvironment,
    authorization: str,
    backlog: int,
    body: dict[str, Any],
    say: Callable[[str], None],
    work: Path,
) -> FairnessResult:
    """Run the phase: an api and a worker of its own (`start(name, argv, **env)`), B alone,
    then A's backlog beside B until it is stored."""
    shards = Settings().queue_shards
    if shards < 2:
        raise BenchError(f"the fairness phase needs QUEUE_SHARDS of 2 or more, not {shards}")
    b = b_project(shards)
    port, health = free_port(), free_port()
    ports = {"API_PORT": str(port), "WORKER_HEALTH_PORT": str(health)}
    api = start("api-fairness", [*score_ingest_command(), "api"], **ports)
    worker = start("worker-fairness", [*score_ingest_command(), "worker"], **ports)
    base = f"http://127.0.0.1:{port}"
    await api.wait_ready(base + "/readyz")
    await worker.wait_ready(f"http://127.0.0.1:{health}/readyz")
    b_url = f"{base}/v2/{ENTITY}/{b}/scores"

    async def b_phase(label: str, until: asyncio.Event) -> _Sent:
        single = json.dumps({**body, "prediction_id": label}).encode()
        return await _paced_singles(b_url, authorization, single, until)

    say(f"fairness: B ({b}, shard {shard_of(ENTITY, b, shards)}) alone, {B_RATE_PER_S:g}/s")
    watch = {"api": api.pid, "worker": worker.pid}
    idle = CpuWindow(watch)
    await asyncio.sleep(IDLE_SECONDS)
    say(f"fairness: nothing posting for {IDLE_SECONDS:g} s, CPU % {_cpu(idle.finish())}")
    quiet = asyncio.Event()
    window = CpuWindow(watch)
    quiet_task = asyncio.create_task(b_phase("quiet", quiet))
    await asyncio.sleep(QUIET_SECONDS)
    quiet.set()
    alone_sent = await quiet_task
    say(f"fairness: B alone, CPU % {_cpu(window.finish())}")
    await _wait_for_rows(env.database_url, b, alone_sent.ok, 60)
    b_alone = await _b_latencies(env.database_url, b, "quiet", alone_sent)
    say(
        f"fairness: B alone p50 {b_alone.p50_s} s, p99 {b_alone.p99_s} s "
        f"(answered p99 {b_alone.answered_p99_s} s)"
    )

    # A probe sets how long A posts for its backlog. Then rounds, each A alone for that long
    # (its scores stored) and A as long again beside B (until its scores are stored): A's
    # rates are compared by their medians, as the single POSTs are, because on this shared
    # machine one run of A alone and one beside B, one after the other, differ by up to a
    # fifth either way with no B at all (BENCHMARKS.md, "Fairness").
    a_body = work / "fairness-batch.json"
    a_body.write_text(json.dumps({"scores": [body] * BATCH_SCORES}))
    probe = await _wrk_batches(base, authorization, a_body, A_PROBE_SECONDS, watch)
    probe_per_s = _scores_per_s(probe)
    seconds = max(1, round(backlog / probe_per_s))  # wrk takes whole seconds
    a_total = probe.requests * BATCH_SCORES
    await _wait_for_rows(env.database_url, A_PROJECT, a_total, _DRAIN_TIMEOUT_S)
    alone_runs: list[WrkResult] = []
    beside: list[WrkResult] = []
    stored_seconds: list[float] = []
    alone_rolled: list[bool | None] = []
    beside_rolled: list[bool | None] = []
    burst_sent = _Sent()

    async def a_alone(number: int) -> None:
        nonlocal a_total
        wal = _wal_files()
        alone = await _wrk_batches(base, authorization, a_body, seconds, watch)
        alone_runs.append(alone)
        a_total += alone.requests * BATCH_SCORES
        await _wait_for_rows(env.database_url, A_PROJECT, a_total, _DRAIN_TIMEOUT_S)
        alone_rolled.append(_rolled_over(wal))
        say(
            f"fairness: round {number}, A alone accepted "
            f"{_scores_per_s(alone):,.0f} scores/s, {_cpu_and_p50(alone)}"
            f"{_rollover_note(alone_rolled[-1])}"
        )

    async def a_beside_b(number: int) -> None:
        nonlocal a_total
        burst = asyncio.Event()
        burst_task = asyncio.create_task(b_phase("burst", burst))
        wal = _wal_files()
        started = time.monotonic()
        posted = await _wrk_batches(base, authorization, a_body, seconds, watch)
        a_total += posted.requests * BATCH_SCORES
        await _wait_for_rows(env.database_url, A_PROJECT, a_total, _DRAIN_TIMEOUT_S)
        stored_seconds.append(time.monotonic() - started)
        beside_rolled.append(_rolled_over(wal))
        burst.set()
        sent = await burst_task
        burst_sent.sent += sent.sent
        burst_sent.ok += sent.ok
        burst_sent.seconds += sent.seconds
        beside.append(posted)
        say(
            f"fairness: round {number}, A beside B accepted "
            f"{_scores_per_s(posted):,.0f} scores/s, all stored in "
            f"{stored_seconds[-1]:.1f} s, {_cpu_and_p50(posted)}"
            f"{_rollover_note(beside_rolled[-1])}"
        )

    # Alone first in odd rounds, beside B first in even ones: the table grows, and
    # PostgreSQL vacuums and checkpoints after what came before, so whichever always came
    # second would be measured on a busier database.
    for number in range(1, A_ROUNDS + 1):
        first, second = (a_alone, a_beside_b) if number % 2 else (a_beside_b, a_alone)
        await first(number)
        await second(number)
    await _wait_for_rows(env.database_url, b, alone_sent.ok + burst_sent.ok, 60)
    b_beside_a = await _b_latencies(env.database_url, b, "burst", burst_sent)
    # The medians; the round beside B nearest its median gives the latency and store time.
    accepted_per_s = median([_scores_per_s(run) for run in beside])
    alone_per_s = median([_scores_per_s(run) for run in alone_runs])
    posted = min(beside, key=lambda run: abs(_scores_per_s(run) - accepted_per_s))
    a_stored_seconds = stored_seconds[beside.index(posted)]
    say(
        f"fairness: A alone {alone_per_s:,.0f}, beside B {accepted_per_s:,.0f} scores/s "
        f"(medians of {A_ROUNDS} rounds; {sum(map(bool, alone_rolled))} and"
        f" {sum(map(bool, beside_rolled))} with a WAL rollover); B beside A p50"
        f" {b_beside_a.p50_s} s, p99 "
        f"{b_beside_a.p99_s} s (answered p99 {b_beside_a.answered_p99_s} s)"
    )
    worker.stop()
    api.stop()
    return FairnessResult(
        shards=shards,
        a_project=A_PROJECT,
        a_shard=shard_of(ENTITY, A_PROJECT, shards),
        b_project=b,
        b_shard=shard_of(ENTITY, b, shards),
        backlog=posted.requests * BATCH_SCORES,
        a_wrk_seconds=seconds,
        b_rate_per_s=B_RATE_PER_S,
        b_alone=b_alone,
        b_beside_a=b_beside_a,
        a_probe_per_s=round(probe_per_s, 1),
        a_alone_per_s=round(alone_per_s, 1),
        a_accepted_per_s=round(accepted_per_s, 1),
        a_alone_rounds=[round(_scores_per_s(r), 1) for r in alone_runs],
        a_beside_rounds=[round(_scores_per_s(r), 1) for r in beside],
        a_alone_round_p50_ms=[r.latency_p50_ms for r in alone_runs],
        a_beside_round_p50_ms=[r.latency_p50_ms for r in beside],
        a_alone_round_cpu=[r.cpu_percent for r in alone_runs],
        a_beside_round_cpu=[r.cpu_percent for r in beside],
        a_alone_round_wal_rollover=alone_rolled,
        a_beside_round_wal_rollover=beside_rolled,
        a_latency_p99_ms=posted.latency_p99_ms,
        a_stored_seconds=round(a_stored_seconds, 1),
        a_stored_per_s=round(posted.requests * BATCH_SCORES / a_stored_seconds, 1),
    )


def _scores_per_s(run: WrkResult) -> float:
    """A's accepted scores per second in one wrk run of batch POSTs."""
    return run.requests_per_s * BATCH_SCORES


def _rollover_note(rolled: bool | None) -> str:
    return {True: "; RabbitMQ rolled its WAL over", False: "", None: "; WAL unseen"}[rolled]


def _cpu(percents: dict[str, float]) -> str:
    return ", ".join(f"{name} {percent:g}" for name, percent in percents.items())


def _cpu_and_p50(run: WrkResult) -> str:
    """A round's latency p50 and who used the CPU meanwhile (percent of one core)."""
    return f"p50 {run.latency_p50_ms:.1f} ms, CPU % {_cpu(run.cpu_percent)}"


def targets(
    fairness: dict[str, Any], batch_scores_per_s: float | None
) -> list[tuple[str, str, str, bool]]:
    """(name, measured, required, passed) of the phase's targets. A beside B is compared
    with A alone, each the median of the phase's interleaved rounds; the run's batch figure
    (wrk's batch POSTs, B absent, earlier in the run on a smaller table), when there is one,
    is shown beside it."""
    beside = fairness["b_beside_a"]
    found = [
        (
            "fairness: B's accept-to-stored p99 while A's backlog drains",
            f"{beside['p99_s']:.3f} s (alone {fairness['b_alone']['p99_s']:.3f} s; "
            f"{beside['stored']} of {beside['answered_200']} stored)",
            f"< {B_P99_TARGET_S:g} s",
            beside["p99_s"] < B_P99_TARGET_S and beside["stored"] == beside["answered_200"] > 0,
        )
    ]
    accepted, alone = fairness["a_accepted_per_s"], fairness["a_alone_per_s"]
    share = accepted / alone if alone > 0 else 0.0
    versus_batch = (
        f"; {accepted / batch_scores_per_s:.2f}x the run's batch scores/s"
        if batch_scores_per_s
        else ""
    )
    found.append(
        (
            "fairness: A's accepted scores/s beside B vs A alone's (medians of rounds)",
            f"{share:.2f}x ({accepted:,.0f} vs {alone:,.0f}{versus_batch})",
            f">= {A_SHARE_TARGET:g}x",
            share >= A_SHARE_TARGET,
        )
    )
    return found
