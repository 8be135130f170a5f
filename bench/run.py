"""The score-ingest benchmark, in one run on one machine: `python -m bench.run` (`make bench`).

Phases, in order (BENCHMARKS.md explains each and how to read the results):
1. bare and naive comparison apps and score-ingest's api + worker under wrk with the same
   connections and duration, single-score POSTs, in interleaved rounds (bare, naive,
   score-ingest, then again), each compared by its median round; then batch POSTs of 500;
2. a paced run at half score-ingest's single-POST rate: latency from 200 to row readable;
3. py-spy profiles of the api under the same wrk loads;
4. backlogs queued with no worker running, then drained by one worker: 200k scores as
   single-score messages published straight to the broker, 600k as score.batch.v1 messages
   of 500 posted to an api's batch endpoint (published by the api to exchange `scores.api`),
   and 600k as the same batch messages published straight to exchange `scores` (so
   validated in full); then 10k vs 1M single-score messages for the worker's
   memory (the worker is profiled while it drains the 1M backlog);
5. tracing's cost: single POSTs against an api with tracing off and on (and the code of
   another checkout, `--tracing-baseline`), interleaved (`--only-tracing`: this phase alone,
   written to bench/tracing.json).

Writes bench/results.json and bench/throughput_latency.png, prints every target as PASS or
FAIL, and exits 1 when any fails (2 when the bench itself could not run).
"""

import argparse
import asyncio
import base64
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import psutil
import uvloop
from prometheus_client.parser import text_string_to_metric_families

import api
from bench import _backlog, _fairness, _load, _profile
from bench._direct import MessageKind, messages_for
from bench._plot import plot
from bench._services import (
    ENTITY,
    BenchEnvironment,
    BenchError,
    ProcessGroup,
    ServerProcess,
    broker_pid,
    check_prerequisites,
    free_port,
    score_ingest_command,
    tool,
)
from bench._system import CpuWindow, RssSampler, load_average, peak_rss_kib
from bench._tracing import tracing_cost
from shared.contract import BATCH_MESSAGE_TYPE

BENCH_DIR = Path(__file__).resolve().parent
BATCH_SIZE = 500
SINGLE_BODY = {
    "prediction_id": "0192f0b4-6b7e-7c2a-9f3e-1a2b3c4d5e6f",
    "scorer": f"weave:///{ENTITY}/bench/op/exact_match:v1digest",
    "value": {"correct": True, "score": 0.92, "tokens": [1, 2, 3]},
    "evaluation_run_id": "run-42",
}
_DRAIN_WAIT_SECONDS = 300.0
ACCEPT_TO_STORED = "score_ingest_accept_to_stored_seconds"
_MAX_STOLEN_PERCENT = 5.0
_PARTIAL_RESULTS = Path(tempfile.gettempdir()) / "score-ingest-bench-partial.json"


def _options(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--connections", type=int, default=64, help="wrk connections for single POSTs")
    add("--threads", type=int, default=2, help="wrk threads")
    add("--duration", type=float, default=10, help="seconds of each measured wrk run")
    add("--warmup", type=float, default=2, help="seconds of wrk warm-up before each")
    add(
        "--rounds", type=int, default=3,
        help="interleaved rounds of the single-POST runs (bare, naive, score-ingest)",
    )  # fmt: skip
    add("--batch-connections", type=int, default=4, help="wrk connections for batch POSTs")
    add("--paced-duration", type=float, default=30, help="seconds of the half-load run")
    add(
        "--drain-backlog", type=int, default=200_000,
        help="backlog for the drain rate of single-score messages, in scores",
    )  # fmt: skip
    add(
        "--batch-drain-backlog", type=int, default=600_000,
        help=f"backlog for the drain rates of {BATCH_MESSAGE_TYPE} messages of {BATCH_SIZE}"
        " (the api's, then direct ones), in scores: about 10 s of draining, as long as a wrk"
        " run, where 200,000 took 3-4 s and one slow second moved the rate by a quarter",
    )  # fmt: skip
    add("--small-backlog", type=int, default=10_000, help="small backlog for worker memory")
    add("--large-backlog", type=int, default=1_000_000, help="large backlog for worker memory")
    add(
        "--large-drain", type=int, default=200_000,
        help="how much of the large backlog to drain while watching memory",
    )  # fmt: skip
    add("--profile-seconds", type=float, default=10, help="py-spy seconds (0: no profile)")
    add("--quiet-cpu", type=float, default=20, help="start when the machine is less busy (%%)")
    add("--quiet-wait", type=float, default=120, help="longest wait for that, in seconds")
    add("--tracing-rounds", type=int, default=1, help="interleaved rounds of tracing off/on")
    add("--tracing-baseline", type=Path, help="a checkout of the code to compare tracing off to")
    add("--only-tracing", action="store_true", help="run the tracing phase alone")
    add("--fairness-backlog", type=int, default=500_000, help="tenant A's backlog, in scores")
    add("--skip-fairness", action="store_true", help="leave the fairness phase out")
    add("--only-fairness", action="store_true", help="run the fairness phase alone")
    add("--output", type=Path, default=BENCH_DIR / "results.json")
    add("--plot", type=Path, default=BENCH_DIR / "throughput_latency.png")
    add("--profile-dir", type=Path, default=BENCH_DIR.parent / ".bench" / "profile")
    return parser.parse_args(argv)


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _basic_auth(key: str) -> str:
    return "Basic " + base64.b64encode(f"api:{key}".encode()).decode()


def _version(command: list[str]) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)  # noqa: S603
        lines = (result.stdout or result.stderr).strip().splitlines()
        if lines:
            return lines[0]
    return "unknown"


def _code() -> dict[str, Any]:
    """Which score-ingest was measured: the commit, and files changed since, if a checkout."""
    root = Path(api.__file__).resolve().parents[1]
    git = shutil.which("git")
    found: dict[str, Any] = {"source": str(root)}
    if git is not None and (root / ".git").exists():
        run = [git, "-C", str(root)]
        found["commit"] = _version([*run, "rev-parse", "HEAD"])
        status = subprocess.run(  # noqa: S603
            [*run, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        found["uncommitted_changes"] = status.stdout.split("\n")[:-1]
    return found


def _machine() -> dict[str, Any]:
    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    packages = ("fastapi", "starlette", "uvicorn", "uvloop", "httptools", "pydantic", "aio-pika")
    return {
        "cpus": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": {name: metadata.version(name) for name in packages},
        "rabbitmq": _version([tool("rabbitmqctl"), "-q", "version"]),
        "postgresql": _version([tool("psql"), "--version"]),
        "wrk": _version([tool("wrk"), "--version"]),
    }


async def _wait_for_quiet(max_percent: float, timeout_s: float) -> dict[str, Any]:
    """Wait (up to timeout_s) until the machine is less than max_percent busy (all cores)."""
    started = time.monotonic()
    while True:
        window = CpuWindow({})
        await asyncio.sleep(3)
        busy = window.finish()["machine"]
        waited = time.monotonic() - started
        if busy <= max_percent or waited >= timeout_s:
            quiet = busy <= max_percent
            if not quiet:
                _say(f"WARNING: the machine is still {busy}% busy: numbers will be noisy")
            return {"machine_busy_percent": busy, "waited_s": round(waited, 1), "quiet": quiet}
        _say(f"the machine is {busy}% busy before we start; waiting for it to be quieter")


@dataclass
class _Run:
    """What every phase needs: options, the environment, the processes, the files."""

    options: argparse.Namespace
    env: BenchEnvironment
    group: ProcessGroup
    work: Path
    results: dict[str, Any]
    broker_pid: int

    @property
    def authorization(self) -> str:
        return _basic_auth(self.env.api_key)

    def note_load(self, phase: str) -> None:
        self.results["meta"]["load"][phase] = [round(v, 2) for v in load_average()]

    def server(self, name: str, argv: list[str], **env: str) -> ServerProcess:
        return self.group.start(ServerProcess(name, argv, self.env.env(**env), self.work))

    async def wrk(
        self, base: str, path: str, body: Path, connections: int, watch: dict[str, int]
    ) -> _load.WrkResult:
        """A warm-up, then the measured run; both must answer only 2xx."""
        options = self.options
        watch = {**watch, "rabbitmq": self.broker_pid}
        runs = []
        for seconds in (options.warmup, options.duration):
            runs.append(
                await _load.run_wrk(
                    base, path=path, authorization=self.authorization, body_file=body,
                    connections=connections, threads=options.threads, duration_s=seconds,
                    watch=watch,
                )
            )  # fmt: skip
        warmup, measured = runs
        answered = self.results["answered"]
        answered[path] = answered.get(path, 0) + warmup.requests + measured.requests
        self.results["errors_during_warmups"] += warmup.non_2xx + warmup.socket_errors
        return measured


async def _start_comparison(run: _Run, name: str) -> tuple[ServerProcess, str]:
    """A comparison app, started and ready, and its base URL."""
    port = free_port()
    server = run.server(
        name,
        [sys.executable, "-m", "bench.serve", name, "--host", "127.0.0.1", "--port", str(port)],
    )
    base = f"http://127.0.0.1:{port}"
    await server.wait_ready(base + "/openapi.json")
    return server, base


def _median(runs: list[_load.WrkResult]) -> dict[str, Any]:
    """The run of median throughput (the lower middle of an even count), with every round's
    throughput and stolen CPU beside it."""
    ranked = sorted(runs, key=lambda result: result.requests_per_s)
    return {
        **ranked[(len(ranked) - 1) // 2].to_json(),
        "rounds": [
            {"requests_per_s": r.requests_per_s, "stolen_percent": r.cpu_percent.get("stolen", 0.0)}
            for r in runs
        ],
    }


async def _count_rows(database_url: str, query: str, *args: object) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval(query, *args))
    finally:
        await conn.close()


async def _wait_until_settled(run: _Run, expected: dict[str, int]) -> dict[str, int]:
    """Wait until each project has at least its expected rows, no more are coming (the api
    also finishes requests that wrk abandoned at its end) and the queue is empty, so the
    next phase starts on an idle api; returns the counts."""
    deadline = time.monotonic() + _DRAIN_WAIT_SECONDS
    query = "SELECT count(*) FROM scores WHERE entity = $1 AND project = $2"
    previous: dict[str, int] = {}
    while True:
        counts = {
            project: await _count_rows(run.env.database_url, query, ENTITY, project)
            for project in expected
        }
        stored = all(counts[p] >= n for p, n in expected.items())
        if stored and counts == previous and await _backlog.queue_depth(run.env.amqp_url) == 0:
            return counts
        if time.monotonic() > deadline:
            raise BenchError(f"scores still arriving after {_DRAIN_WAIT_SECONDS:.0f}s: {counts}")
        previous = counts
        await asyncio.sleep(1)


async def _visibility_from_rows(database_url: str, project: str) -> dict[str, float]:
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow(
            """
            SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY lag),
                   percentile_cont(0.99) WITHIN GROUP (ORDER BY lag)
            FROM (SELECT 1000 * extract(epoch FROM persisted_at - created_at) AS lag
                  FROM scores WHERE entity = $1 AND project = $2) AS lags
            """,
            ENTITY,
            project,
        )
    finally:
        await conn.close()
    assert row is not None
    return {"p50_ms": round(float(row[0] or 0), 1), "p99_ms": round(float(row[1] or 0), 1)}


async def _accept_to_stored_buckets(metrics_url: str) -> dict[float, float]:
    """The worker's score_ingest_accept_to_stored_seconds, summed over its entities: the
    cumulative count of each bucket, by upper bound."""
    async with aiohttp.ClientSession() as session, session.get(metrics_url) as response:
        text = await response.text()
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == ACCEPT_TO_STORED:
            for sample in family.samples:
                if sample.name == f"{ACCEPT_TO_STORED}_bucket":
                    bound = float(sample.labels["le"])
                    buckets[bound] = buckets.get(bound, 0.0) + sample.value
    return buckets


def _quantiles(before: dict[float, float], after: dict[float, float]) -> dict[str, float]:
    """p50 and p99 in ms of what the histogram gained between two readings, interpolated
    within a bucket as Prometheus's histogram_quantile does."""
    gained = sorted((bound, count - before.get(bound, 0.0)) for bound, count in after.items())
    total = gained[-1][1] if gained else 0.0
    found = {"scores": total}
    for name, q in (("p50_ms", 0.5), ("p99_ms", 0.99)):
        rank, lower, below = q * total, 0.0, 0.0
        for bound, cumulative in gained:
            if cumulative >= rank and total:
                if math.isinf(bound):
                    found[name] = round(1000 * lower, 1)
                else:
                    share = (rank - below) / (cumulative - below) if cumulative > below else 1.0
                    found[name] = round(1000 * (lower + (bound - lower) * share), 1)
                break
            lower, below = bound, cumulative
    return found


async def _score_ingest(
    run: _Run, single: Path, batch: Path, comparisons: dict[str, tuple[ServerProcess, str]]
) -> None:
    options, results = run.options, run.results
    port, health = free_port(), free_port()
    ports = {"API_HOST": "127.0.0.1", "API_PORT": str(port), "WORKER_HEALTH_PORT": str(health)}
    api = run.server("api", [*score_ingest_command(), "api"], **ports)
    worker = run.server("worker", [*score_ingest_command(), "worker"], **ports)
    base = f"http://127.0.0.1:{port}"
    await api.wait_ready(base + "/readyz")
    await worker.wait_ready(f"http://127.0.0.1:{health}/readyz")
    samplers = [RssSampler(api.pid), RssSampler(worker.pid)]
    for sampler in samplers:
        sampler.start()
    watch = {"api": api.pid, "worker": worker.pid, "rabbitmq": run.broker_pid}

    # Interleaved, so that a machine that slows down or speeds up over minutes (other guests
    # of the host, CPU clocks) weighs on every app alike; each is compared by its median.
    contenders = {
        name: (base_url, f"/v2/{ENTITY}/{name}/scores", {"server": server.pid})
        for name, (server, base_url) in comparisons.items()
    }
    contenders["single"] = (base, f"/v2/{ENTITY}/single/scores", watch)
    rounds: dict[str, list[_load.WrkResult]] = {name: [] for name in contenders}
    for number in range(1, options.rounds + 1):
        for name, (base_url, path, watched) in contenders.items():
            run.note_load(f"{name}-{number}")
            _say(
                f"round {number} of {options.rounds}, {name}: wrk {options.connections}"
                f" connections, {options.duration:g}s"
            )
            result = await run.wrk(base_url, path, single, options.connections, watched)
            rounds[name].append(result)
            _say(f"{name}: {result.requests_per_s:,.0f} req/s, p99 {result.latency_p99_ms} ms")
            if name == "single":
                await _wait_until_settled(run, {"single": results["answered"][path]})
    for name, (server, _) in comparisons.items():
        results["http"][name] = {
            **_median(rounds[name]),
            "server_peak_rss_kib": peak_rss_kib(server.pid),
        }
        run.group.stop(server)
    results["http"]["single"] = _median(rounds["single"])
    single_rate = results["http"]["single"]["requests_per_s"]

    answered = results["answered"]
    singles = {"single": answered[f"/v2/{ENTITY}/single/scores"]}

    run.note_load("batch")
    _say(f"score-ingest batch of {BATCH_SIZE}: wrk {options.batch_connections} connections")
    batch_result = await run.wrk(
        base, f"/v2/{ENTITY}/batch/scores/batch", batch, options.batch_connections, watch
    )
    backlog_after_batch = await _backlog.queue_depth(run.env.amqp_url)
    results["http"]["batch"] = {
        **batch_result.to_json(),
        "batch_size": BATCH_SIZE,
        "scores_per_s": round(batch_result.requests_per_s * BATCH_SIZE, 1),
        "queue_ready_at_end": backlog_after_batch,
    }
    _say(
        f"batch: {batch_result.requests_per_s * BATCH_SIZE:,.0f} scores/s; "
        f"{backlog_after_batch:,} left in the queue at the end"
    )
    await _wait_until_settled(
        run, {**singles, "batch": answered[f"/v2/{ENTITY}/batch/scores/batch"] * BATCH_SIZE}
    )

    rate = single_rate / 2
    worker_metrics = f"http://127.0.0.1:{health}/metrics"
    before = await _accept_to_stored_buckets(worker_metrics)
    run.note_load("visibility")
    _say(f"half load: {rate:,.0f} req/s paced for {options.paced_duration:g}s")
    paced = await _load.run_paced(
        f"{base}/v2/{ENTITY}/visibility/scores",
        authorization=run.authorization,
        body=json.dumps(SINGLE_BODY).encode(),
        rate_per_s=rate,
        duration_s=options.paced_duration,
        connections=options.connections,
        database_url=run.env.database_url,
        watch=watch,
    )
    await _wait_until_settled(run, {"visibility": paced.ok})
    results["visibility"] = {
        **paced.to_json(),
        "rows_persisted_minus_created": await _visibility_from_rows(
            run.env.database_url, "visibility"
        ),
        "worker_accept_to_stored": _quantiles(
            before, await _accept_to_stored_buckets(worker_metrics)
        ),
    }
    _say(
        f"visibility: p50 {paced.visibility_p50_ms} ms, p99 {paced.visibility_p99_ms} ms "
        f"(client held {paced.achieved_rate_per_s:,.0f} of {paced.target_rate_per_s:,.0f} req/s)"
    )

    if options.profile_seconds > 0:
        results["profile"] = {
            "single": await _profile_api(run, api.pid, base, "single", single, options.connections),
            "batch": await _profile_api(
                run, api.pid, base, "batch", batch, options.batch_connections
            ),
        }

    expected = {
        **singles,
        "batch": answered[f"/v2/{ENTITY}/batch/scores/batch"] * BATCH_SIZE,
        "visibility": paced.ok,
    }
    # Stopped only once idle, so nothing is published after its worker has gone.
    stored = await _wait_until_settled(run, {**expected, "profile": 0})
    api_peak = samplers[0].peak_kib()
    worker_peak = samplers[1].peak_kib()
    for sampler in samplers:
        await sampler.stop()
    run.group.stop(worker)
    run.group.stop(api)
    results["integrity"] = {
        project: {"answered_200": expected[project], "rows": stored[project]}
        for project in expected
    }
    results["memory"]["api_peak_rss_kib"] = api_peak
    results["memory"]["worker_peak_rss_kib_under_api_load"] = worker_peak


async def _profile_api(
    run: _Run, pid: int, base: str, kind: str, body: Path, connections: int
) -> dict[str, Any]:
    """py-spy on the api while wrk loads it as in the measured runs."""
    seconds = run.options.profile_seconds
    path = (
        f"/v2/{ENTITY}/profile/scores" if kind == "single" else f"/v2/{ENTITY}/profile/scores/batch"
    )
    run.options.profile_dir.mkdir(parents=True, exist_ok=True)
    folded = run.options.profile_dir / f"api-{kind}.folded"
    _say(f"profiling the api under {kind} load for {seconds:g}s (py-spy)")
    load = asyncio.create_task(
        _load.run_wrk(
            base, path=path, authorization=run.authorization, body_file=body,
            connections=connections, threads=run.options.threads, duration_s=seconds + 3,
            watch={"api": pid},
        )
    )  # fmt: skip
    await asyncio.sleep(1.5)
    await _profile.record(pid, seconds, folded)
    under = await load
    await _wait_until_settled(run, {"profile": 0})
    summary = _profile.summarise(folded, seconds)
    return {**summary.to_json(), "load": under.to_json()}


async def _backlogs(run: _Run) -> None:
    options, results, env = run.options, run.results, run.env
    health = free_port()

    def start_worker(name: str) -> Callable[[], ServerProcess]:
        return lambda: run.server(
            name, [*score_ingest_command(), "worker"], WORKER_HEALTH_PORT=str(health)
        )

    async def expect_queued(messages: int) -> None:
        depth = await _backlog.queue_depth(env.amqp_url)
        if depth != messages:
            raise BenchError(f"expected {messages} queued messages, the queue holds {depth}")

    async def fill(count: int, project: str, kind: MessageKind = "single") -> dict[str, Any]:
        run.note_load(f"publish-{project}")
        form = "single-score messages" if kind == "single" else f"batch messages of {BATCH_SIZE}"
        _say(f"publishing {count:,} scores as {form} to exchange `scores` (no worker running)")
        # What a stopped worker left unacknowledged went back to the queue: not this backlog.
        await _backlog.purge_queue(env.amqp_url)
        window = CpuWindow({"rabbitmq": run.broker_pid})
        published = await _backlog.publish_backlog(env.amqp_url, count, project, kind, BATCH_SIZE)
        cpu = window.finish()
        await expect_queued(published.messages)
        _say(
            f"published {count:,} scores in {published.messages:,} messages in "
            f"{published.seconds:.1f}s ({published.per_s:,.0f} scores/s)"
        )
        return {**published.to_json(), "cpu_percent": cpu}

    async def post(count: int, project: str) -> dict[str, Any]:
        """The api's own batch messages, through `scores.api`: an api runs alone and takes
        batch POSTs."""
        run.note_load(f"post-{project}")
        requests = messages_for(count, "batch", BATCH_SIZE)
        _say(f"posting {requests:,} batches of {BATCH_SIZE} to an api (no worker running)")
        await _backlog.purge_queue(env.amqp_url)
        port = free_port()
        api = run.server(f"api-{project}", [*score_ingest_command(), "api"], API_PORT=str(port))
        base = f"http://127.0.0.1:{port}"
        await api.wait_ready(base + "/readyz")
        window = CpuWindow({"api": api.pid, "rabbitmq": run.broker_pid})
        posted = await _backlog.post_backlog(
            f"{base}/v2/{ENTITY}/{project}/scores/batch",
            run.authorization,
            json.dumps({"scores": [SINGLE_BODY] * BATCH_SIZE}).encode(),
            BATCH_SIZE,
            requests,
        )
        cpu = window.finish()
        run.group.stop(api)
        await expect_queued(posted.messages)
        _say(f"posted {posted.scores:,} scores in {posted.seconds:.1f}s ({posted.per_s:,.0f}/s)")
        return {**posted.to_json(), "cpu_percent": cpu}

    async def drain(
        published: dict[str, Any], until: int, project: str, profile: bool = False
    ) -> dict[str, Any]:
        count, kind = published["scores"], published["kind"]
        run.note_load(f"drain-{project}")
        _say(
            f"one worker drains {until:,} of {count:,} scores ({published['messages']:,} messages)"
        )
        drained = await _backlog.measure_drain(
            start_worker=start_worker(f"worker-{project}"),
            metrics_url=f"http://127.0.0.1:{health}/metrics",
            amqp_url=env.amqp_url,
            database_url=env.database_url,
            project=project,
            backlog=count,
            kind=kind,
            messages=published["messages"],
            drain_until=until,
            timeout_s=max(120.0, until / 500),
            watch={"rabbitmq": run.broker_pid},
            while_draining=profile_worker if profile else None,
        )
        _say(
            f"drained {drained.drained:,} in {drained.seconds:.1f}s"
            f" ({drained.per_s:,.0f} scores/s from spawn; {drained.steady_per_s:,.0f}/s after"
            f" {drained.startup_seconds:.1f}s of start-up); worker peak RSS"
            f" {drained.worker_rss_peak_kib / 1024:.0f} MiB"
        )
        return drained.to_json()

    profiles: dict[str, Any] = {}

    async def profile_worker(pid: int) -> None:
        seconds = options.profile_seconds
        _say(f"profiling the worker while it drains, for {seconds:g}s (py-spy)")
        options.profile_dir.mkdir(parents=True, exist_ok=True)
        folded = options.profile_dir / "worker-drain.folded"
        window = CpuWindow({"worker": pid})
        await _profile.record(pid, seconds, folded)
        summary = _profile.summarise(folded, seconds)
        profiles["worker_drain"] = {**summary.to_json(), "cpu_percent": window.finish()}

    backlog: dict[str, Any] = {}
    backlog["drain_publish"] = await fill(options.drain_backlog, "drain")
    backlog["drain"] = await drain(backlog["drain_publish"], options.drain_backlog, "drain")
    batches = options.batch_drain_backlog
    backlog["drain_batch_publish"] = await post(batches, "drain-batch")
    backlog["drain_batch"] = await drain(backlog["drain_batch_publish"], batches, "drain-batch")
    backlog["drain_batch_direct_publish"] = await fill(batches, "drain-batch-direct", "batch")
    backlog["drain_batch_direct"] = await drain(
        backlog["drain_batch_direct_publish"], batches, "drain-batch-direct"
    )
    backlog["small_publish"] = await fill(options.small_backlog, "small")
    backlog["small"] = await drain(backlog["small_publish"], options.small_backlog, "small")
    backlog["large_publish"] = await fill(options.large_backlog, "large")
    backlog["large"] = await drain(
        backlog["large_publish"], options.large_drain, "large", profile=options.profile_seconds > 0
    )
    # The rest of the large backlog is not wanted: the fairness phase after it starts on
    # empty queues, not beside a worker draining 800,000 leftover messages (it did, until
    # session 11: its first rounds had the worker at 60-97 % of a core before A posted).
    await _backlog.purge_queue(env.amqp_url)
    results.setdefault("profile", {}).update(profiles)
    results["backlog"] = backlog
    results["memory"]["worker_peak_rss_kib_small_backlog"] = backlog["small"]["worker_rss_peak_kib"]
    results["memory"]["worker_peak_rss_kib_large_backlog"] = backlog["large"]["worker_rss_peak_kib"]
    results["memory"]["worker_peak_rss_kib_batch_backlog"] = backlog["drain_batch"][
        "worker_rss_peak_kib"
    ]


@dataclass(frozen=True)
class Verdict:
    """One target or check, measured in this run."""

    name: str
    measured: str
    required: str
    passed: bool

    def line(self) -> str:
        """As printed."""
        return (
            f"{'PASS' if self.passed else 'FAIL'}  {self.name}: {self.measured} ({self.required})"
        )


def _ratio(name: str, measured: float, baseline: float, at_least: float) -> Verdict:
    ratio = measured / baseline if baseline > 0 else float("inf")
    return Verdict(
        name,
        f"{ratio:.2f}x ({measured:,.0f} vs {baseline:,.0f})",
        f">= {at_least:g}x",
        ratio >= at_least and measured > 0,
    )


def _verdicts(results: dict[str, Any]) -> tuple[list[Verdict], list[Verdict]]:
    """The issue's targets, and the checks that the measurement itself is sound."""
    http, visibility, backlog = results["http"], results["visibility"], results["backlog"]
    single, naive, bare = (http[k]["requests_per_s"] for k in ("single", "naive", "bare"))
    batch = http["batch"]["scores_per_s"]
    drain_single = backlog["drain"]["steady_per_s"]
    drain_batch = backlog["drain_batch"]["steady_per_s"]
    non_2xx = (
        sum(http[k]["non_2xx"] + http[k]["socket_errors"] for k in http)
        + visibility["non_2xx"]
        + visibility["errors"]
        + results["errors_during_warmups"]
    )
    targets = [
        _ratio("single POST req/s vs naive", single, naive, 2),
        _ratio("single POST req/s vs bare", single, bare, 0.6),
        _ratio("batch scores/s vs naive single req/s", batch, naive, 15),
        _ratio(
            f"drain scores/s, the api's batch messages of {BATCH_SIZE}, vs batch accept scores/s",
            drain_batch,
            batch,
            1,
        ),
        _ratio(
            "drain scores/s, backlog of single-score messages, vs single POST req/s",
            drain_single,
            single,
            1,
        ),
        Verdict(
            "p99 200-to-readable at half load",
            f"{visibility['visibility_p99_ms']:.0f} ms",
            "< 500 ms",
            visibility["visibility_p99_ms"] < 500,
        ),
        Verdict("non-2xx and socket errors", str(non_2xx), "== 0", non_2xx == 0),
    ]
    memory = results["memory"]
    small, large = (
        memory["worker_peak_rss_kib_small_backlog"],
        memory["worker_peak_rss_kib_large_backlog"],
    )
    integrity = results["integrity"]
    lost = {p: v for p, v in integrity.items() if v["rows"] < v["answered_200"]}
    wrk_cpu = max(http[k]["cpu_percent"]["wrk"] for k in http if k != "batch")
    # CPU the hypervisor gave to other guests during a wrk run: the ratios compare runs of
    # a few seconds each, so steal in one of them skews them (seen: 26% in one run).
    stolen = {
        k: max(
            (r["stolen_percent"] for r in http[k].get("rounds", [])),
            default=http[k]["cpu_percent"].get("stolen", 0.0),
        )
        for k in http
    }
    checks = [
        Verdict(
            "worker RSS flat, 1M vs 10k backlog",
            f"{large / 1024:.0f} vs {small / 1024:.0f} MiB ({large / small:.2f}x)",
            "<= 1.25x",
            large <= 1.25 * small,
        ),
        Verdict("every 200 became a row", json.dumps(integrity), "rows >= answered", not lost),
        Verdict(
            "paced client held half load and its schedule",
            f"{visibility['achieved_rate_per_s']:.0f} of "
            f"{visibility['target_rate_per_s']:.0f} req/s, sent at most"
            f" {visibility['max_send_lag_ms']:.0f} ms late, client at"
            f" {visibility['client_cpu_percent']:.0f}% of a core",
            ">= 95%, < 100 ms",
            visibility["achieved_rate_per_s"] >= 0.95 * visibility["target_rate_per_s"]
            and visibility["max_send_lag_ms"] < 100,
        ),
        Verdict(
            "wrk is not the bottleneck",
            f"wrk used at most {wrk_cpu:.0f}% of a core",
            f"< 50% of its {results['settings']['threads']} threads",
            wrk_cpu < 50 * results["settings"]["threads"],
        ),
        Verdict(
            "the hypervisor took little CPU during the compared runs",
            ", ".join(f"{k} {v:g}%" for k, v in stolen.items()),
            f"<= {_MAX_STOLEN_PERCENT:g}% in each",
            max(stolen.values()) <= _MAX_STOLEN_PERCENT,
        ),
        Verdict(
            "large backlog drained as far as asked",
            f"{backlog['large']['drained']:,} of {backlog['large']['backlog']:,}",
            f">= {results['settings']['large_drain']:,}",
            backlog["large"]["drained"] >= results["settings"]["large_drain"],
        ),
        Verdict(
            "the worker took the api's messages by their exchange, the direct ones by validation",
            f"{backlog['drain_batch']['api_exchange_messages']} of"
            f" {backlog['drain_batch']['messages']} api messages through scores.api,"
            f" {backlog['drain_batch_direct']['api_exchange_messages']} direct ones",
            "all, and none",
            backlog["drain_batch"]["api_exchange_messages"] == backlog["drain_batch"]["messages"]
            and backlog["drain_batch_direct"]["api_exchange_messages"] == 0,
        ),
        *(
            Verdict(
                f"drain backlog emptied ({name})",
                f"{backlog[key]['rows']:,} rows of {backlog[key]['backlog']:,},"
                f" {backlog[key]['queue_ready_after']} messages left",
                "all rows, queue empty",
                backlog[key]["rows"] == backlog[key]["backlog"]
                and backlog[key]["queue_ready_after"] == 0,
            )
            for key, name in (
                ("drain", "single-score messages"),
                ("drain_batch", "the api's batch messages"),
                ("drain_batch_direct", "direct batch messages"),
            )
        ),
    ]
    return targets, checks


def _reported(results: dict[str, Any]) -> list[str]:
    """Measured and printed, but no target."""
    backlog, http = results["backlog"], results["http"]
    drains = [
        f"worker drain, {result['backlog']:,} scores as {result['messages']:,} {form}:"
        f" {result['steady_per_s']:,.0f} scores/s after {result['startup_seconds']:.1f}s of"
        f" start-up ({result['per_s']:,.0f}/s from spawn), worker peak RSS"
        f" {result['worker_rss_peak_kib'] / 1024:.0f} MiB"
        for result, form in (
            (backlog["drain"], "single-score messages"),
            (backlog["drain_batch"], f"{BATCH_MESSAGE_TYPE} messages from the api"),
            (backlog["drain_batch_direct"], f"{BATCH_MESSAGE_TYPE} messages, direct"),
        )
    ]
    direct = backlog["drain_batch_direct"]["steady_per_s"]
    batch = http["batch"]["scores_per_s"]
    worker_view = results["visibility"]["worker_accept_to_stored"]
    return [
        *drains,
        f"accept-to-stored at half load, from the worker's histogram ({ACCEPT_TO_STORED}):"
        f" p50 {worker_view.get('p50_ms', 0):.0f} ms, p99 {worker_view.get('p99_ms', 0):.0f} ms"
        f" over {worker_view['scores']:,.0f} scores",
        f"drain of direct publishers' (fully validated) batch messages vs batch"
        f" accept: {direct / batch:.2f}x ({direct:,.0f} vs {batch:,.0f} scores/s)",
        *_tracing_reported(results.get("tracing")),
    ]


def _tracing_reported(tracing: dict[str, Any] | None) -> list[str]:
    if tracing is None:
        return []
    off, on = tracing["off"], tracing["on"]
    return [
        f"tracing on (OTLP to a local sink) vs off, single POSTs: {on['requests_per_s']:,.0f} vs"
        f" {off['requests_per_s']:,.0f} req/s, api CPU {on['api_cpu_ms_per_request']:.3f} vs"
        f" {off['api_cpu_ms_per_request']:.3f} ms a request"
        f" ({tracing['on_vs_off']['api_cpu_per_request']:.2f}x; a tenth sampled:"
        f" {tracing['tenth_vs_off']['api_cpu_per_request']:.2f}x)"
    ]


def _keep_logs(work: Path) -> None:
    """Copy the servers' logs out of the temporary directory, for a run that failed."""
    logs = sorted(work.glob("*.log"))
    for log in logs:
        shutil.copy(log, BENCH_DIR / f"last-{log.name}")
    if logs:
        _say(f"server logs copied to {BENCH_DIR}/last-*.log")


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt, so the way out stops servers and removes data."""

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


async def bench(options: argparse.Namespace, results: dict[str, Any]) -> dict[str, Any]:
    """Run every phase, filling results as they come; returns them."""
    check_prerequisites()
    started = time.monotonic()
    results |= {
        "meta": {
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": _machine(),
            "code": _code(),
            "load_at_start": [round(v, 2) for v in load_average()],
            "load": {},
        },
        "settings": {
            key: str(value) if isinstance(value, Path) else value
            for key, value in vars(options).items()
        },
        "http": {},
        "memory": {},
        "answered": {},
        "errors_during_warmups": 0,
    }
    _say(f"load average {results['meta']['load_at_start']}; checking that the machine is quiet")
    results["meta"]["quiet"] = await _wait_for_quiet(options.quiet_cpu, options.quiet_wait)
    env = BenchEnvironment()
    with tempfile.TemporaryDirectory(prefix="score-ingest-bench-") as tmp:
        work = Path(tmp)
        single = work / "single.json"
        single.write_text(json.dumps(SINGLE_BODY))
        batch = work / "batch.json"
        batch.write_text(json.dumps({"scores": [SINGLE_BODY] * BATCH_SIZE}))
        try:
            _say(f"database and vhost of the bench's own: {env.database_url}, {env.amqp_url}")
            await env.setup()
            with ProcessGroup() as group:
                run = _Run(options, env, group, work, results, broker_pid())
                try:
                    if options.only_tracing:
                        results["tracing"] = await _tracing(run, single)
                        return results
                    if options.only_fairness:
                        results["fairness"] = await _fairness_phase(run)
                        return results
                    comparisons = {
                        name: await _start_comparison(run, name) for name in ("bare", "naive")
                    }
                    await _score_ingest(run, single, batch, comparisons)
                    naive_rows = await _count_rows(
                        env.database_url, "SELECT count(*) FROM naive_scores"
                    )
                    results["integrity"]["naive"] = {
                        "answered_200": results["answered"][f"/v2/{ENTITY}/naive/scores"],
                        "rows": naive_rows,
                    }
                    await _backlogs(run)
                    if not options.skip_fairness:
                        results["fairness"] = await _fairness_phase(run)
                    if options.tracing_rounds > 0:
                        results["tracing"] = await _tracing(run, single)
                except BaseException:
                    _keep_logs(work)
                    raise
        finally:
            await env.teardown()
    results["meta"]["duration_s"] = round(time.monotonic() - started, 1)
    results["meta"]["load_at_end"] = [round(v, 2) for v in load_average()]
    return results


async def _fairness_phase(run: _Run) -> dict[str, Any]:
    run.note_load("fairness")
    measured = await _fairness.measure_fairness(
        run.server,
        run.env,
        run.authorization,
        run.options.fairness_backlog,
        SINGLE_BODY,
        _say,
        run.work,
    )
    return measured.to_json()


def _fairness_verdicts(results: dict[str, Any]) -> list[Verdict]:
    batch = results.get("http", {}).get("batch", {}).get("scores_per_s")
    return [Verdict(*found) for found in _fairness.targets(results["fairness"], batch)]


async def _tracing(run: _Run, single: Path) -> dict[str, Any]:
    return await tracing_cost(run, single, lambda expected: _wait_until_settled(run, expected))


def main(argv: list[str] | None = None) -> int:
    """Run the bench, write results and plot, print verdicts; 0 only when all pass."""
    options = _options(argv)
    partial: dict[str, Any] = {}
    try:
        with _stop_on_sigterm():
            results = uvloop.run(bench(options, partial))
    except Exception as exc:
        if isinstance(exc, BenchError):
            print(f"bench: {exc}", file=sys.stderr)
        else:
            traceback.print_exc()
        _PARTIAL_RESULTS.write_text(json.dumps(partial, indent=2, default=str) + "\n")
        print(f"bench: what was measured before that is in {_PARTIAL_RESULTS}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "bench: interrupted; servers stopped, bench database and vhost removed", file=sys.stderr
        )
        return 2
    if options.only_tracing:
        (BENCH_DIR / "tracing.json").write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(results["tracing"], indent=2))
        return 0
    if options.only_fairness:
        (BENCH_DIR / "fairness.json").write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(results["fairness"], indent=2))
        verdicts = _fairness_verdicts(results)
        for verdict in verdicts:
            print("  " + verdict.line())
        return 0 if all(verdict.passed for verdict in verdicts) else 1
    targets, checks = _verdicts(results)
    if "fairness" in results:
        targets += _fairness_verdicts(results)
    results["targets"] = [vars(v) for v in targets]
    results["checks"] = [vars(v) for v in checks]
    options.output.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, options.plot)
    print("\nTargets (issue 5), ratios measured in this run:")
    for verdict in targets:
        print("  " + verdict.line())
    print("Checks that the measurement is sound:")
    for verdict in checks:
        print("  " + verdict.line())
    print("Reported (no target):")
    for line in _reported(results):
        print("  " + line)
    print(f"\nresults: {options.output}\nplot: {options.plot}")
    failed = [v for v in [*targets, *checks] if not v.passed]
    if failed:
        print(f"{len(failed)} FAILED: exit 1", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
