"""Backlogs: queue many scores while no worker runs, then time a worker draining them.

A backlog is counted in scores; it is queued either as one score.create.v1 message per
score or as score.batch.v1 messages of several scores each (`bench._direct.MessageKind`),
published straight to the broker (exchange `scores`) as a direct publisher would, or posted
to the api's batch endpoint, whose messages the api publishes to exchange `scores.api`.
"""

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass
from typing import Any

import aio_pika
import aiohttp
import asyncpg

from bench._direct import DEFAULT_BATCH_SCORES, MessageKind, publish_direct
from bench._services import BenchError, ServerProcess
from bench._system import CpuWindow, cpu_seconds, peak_rss_kib, rss_kib
from shared.settings import Settings
from shared.topology import persist_queues

_POLL_SECONDS = 0.25
_PERSISTED_METRIC = "score_ingest_scores_persisted_total "
_API_EXCHANGE_METRIC = 'score_ingest_messages_decoded_total{check="api_exchange"} '


@dataclass(frozen=True)
class PublishResult:
    """How fast the bench filled the queue, every message confirmed by the broker.

    per_s is scores per second (for single messages, also messages per second).
    """

    kind: MessageKind
    scores: int
    scores_per_message: int
    messages: int
    seconds: float
    per_s: float
    messages_per_s: float
    source: str = "direct"  # "direct": straight to the broker; "api": batch POSTs

    def to_json(self) -> dict[str, Any]:
        """As stored in results.json."""
        return asdict(self)


async def queue_depth(amqp_url: str) -> int:
    """Ready messages in scores.persist and its shards, where the api's go (those a consumer
    holds unacknowledged not counted)."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        depth = 0
        for name in persist_queues(Settings()):
            declared = await channel.declare_queue(name, passive=True)
            depth += declared.declaration_result.message_count or 0
        return depth


async def purge_queue(amqp_url: str) -> int:
    """Empty scores.persist and its shards (no consumer may be running); returns how many
    they held."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        purged = 0
        for name in persist_queues(Settings()):
            queue = await channel.declare_queue(name, passive=True)
            purged += (await queue.purge()).message_count or 0
        return purged


async def publish_backlog(
    amqp_url: str,
    count: int,
    project: str,
    kind: MessageKind = "single",
    batch_size: int = DEFAULT_BATCH_SCORES,
) -> PublishResult:
    """Publish count valid scores to exchange `scores` as `kind` messages (batch: of
    batch_size scores each), every message confirmed; timed."""
    started = time.monotonic()
    messages = await publish_direct(amqp_url, count, project, kind, batch_size)
    seconds = time.monotonic() - started
    return PublishResult(
        kind=kind,
        scores=count,
        scores_per_message=1 if kind == "single" else batch_size,
        messages=messages,
        seconds=round(seconds, 2),
        per_s=round(count / seconds, 1),
        messages_per_s=round(messages / seconds, 1),
    )


async def post_backlog(
    url: str, authorization: str, body: bytes, scores_per_request: int, requests: int
) -> PublishResult:
    """POST body to the api's batch endpoint `requests` times, 4 at a time (as the bench's
    batch load does); every answer must be 200. Timed."""
    remaining = requests
    started = time.monotonic()
    headers = {"Authorization": authorization, "Content-Type": "application/json"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def post_some() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                async with session.post(url, data=body, headers=headers) as res:
                    if res.status != 200:
                        raise BenchError(f"the api answered {res.status}: {await res.text()}")

        await asyncio.gather(*(post_some() for _ in range(4)))
    seconds = time.monotonic() - started
    count = requests * scores_per_request
    return PublishResult(
        kind="batch",
        scores=count,
        scores_per_message=scores_per_request,
        messages=requests,
        seconds=round(seconds, 2),
        per_s=round(count / seconds, 1),
        messages_per_s=round(requests / seconds, 1),
        source="api",
    )


@dataclass(frozen=True)
class DrainResult:
    """A worker draining a backlog: how fast, whether it emptied, and its memory meanwhile.

    backlog, drained, per_s and rows count scores; messages is what the backlog was queued as.
    per_s counts from the worker's spawn; steady_per_s from its first stored scores (the
    targets use it: start-up, `startup_seconds`, is a fixed cost, not a rate).
    """

    kind: MessageKind
    backlog: int
    messages: int
    drained: int
    seconds: float
    per_s: float
    startup_seconds: float
    steady_per_s: float
    rows: int
    rows_per_s: float
    queue_ready_after: int
    api_exchange_messages: int  # came through scores.api: parsed, not validated again
    worker_rss_after_start_kib: int
    worker_rss_last_kib: int
    worker_rss_peak_kib: int
    worker_cpu_percent: float
    cpu_percent: dict[str, float]
    rss_by_drained: list[tuple[int, int]]

    def to_json(self) -> dict[str, Any]:
        """As stored in results.json."""
        return asdict(self)


async def _counter(session: aiohttp.ClientSession, metrics_url: str, prefix: str) -> int:
    async with session.get(metrics_url) as res:
        text = await res.text()
    for line in text.splitlines():
        if line.startswith(prefix):
            return int(float(line.removeprefix(prefix)))
    return 0


async def rows_stored(database_url: str, project: str) -> tuple[int, float]:
    """How many rows the project has, and over how many seconds of commits they came in."""
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow(
            "SELECT count(*), extract(epoch FROM max(persisted_at) - min(persisted_at))"
            " FROM scores WHERE entity = 'bench' AND project = $1",
            project,
        )
    finally:
        await conn.close()
    assert row is not None
    return int(row[0]), float(row[1] or 0.0)


def _spread(samples: list[tuple[int, int]], points: int = 20) -> list[tuple[int, int]]:
    if len(samples) <= points:
        return samples
    step = len(samples) / points
    return [*(samples[int(i * step)] for i in range(points)), samples[-1]]


async def measure_drain(
    *,
    start_worker: Callable[[], ServerProcess],
    metrics_url: str,
    amqp_url: str,
    database_url: str,
    project: str,
    backlog: int,
    kind: MessageKind,
    messages: int,
    drain_until: int,
    timeout_s: float,
    watch: dict[str, int],
    while_draining: Callable[[int], Coroutine[Any, Any, object]] | None = None,
) -> DrainResult:
    """Start a worker on a full queue and time it until drain_until scores are stored.

    backlog scores wait in the queue as `messages` messages of `kind`.

    The clock starts when the worker process is spawned, so start-up counts against it.
    Its resident memory is sampled as it goes, against how much it has drained.
    `while_draining(pid)` (a profiler) starts once the worker has stored its first scores.
    CPU use (`watch` names pids) is read before the worker stops, while its PostgreSQL
    backends still exist.
    """
    window = CpuWindow(watch)
    worker = start_worker()
    samples: list[tuple[int, int]] = []
    drained = 0
    first: tuple[float, int] | None = None  # when the first scores were seen stored, and how many
    side_task: asyncio.Task[object] | None = None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while True:
            elapsed = time.monotonic() - worker.started_at
            if elapsed > timeout_s:
                raise BenchError(
                    f"the worker drained {drained} of {drain_until} in {timeout_s:.0f}s:\n"
                    + worker.log_tail()
                )
            try:
                drained = await _counter(session, metrics_url, _PERSISTED_METRIC)
            except (aiohttp.ClientError, TimeoutError):
                drained = 0  # not serving yet
            rss = rss_kib(worker.pid)
            if rss is None:
                raise BenchError(f"the worker exited while draining:\n{worker.log_tail()}")
            samples.append((drained, rss))
            if drained > 0 and first is None:
                first = (time.monotonic(), drained)
            if drained >= drain_until:
                break
            if drained > 0 and while_draining is not None and side_task is None:
                side_task = asyncio.create_task(while_draining(worker.pid))
            await asyncio.sleep(_POLL_SECONDS)
        ended = time.monotonic()
        trusted = await _counter(session, metrics_url, _API_EXCHANGE_METRIC)
    if side_task is not None:
        await side_task
    seconds = ended - worker.started_at
    assert first is not None
    steady = (drained - first[1]) / (ended - first[0]) if ended > first[0] else 0.0
    peak = max(peak_rss_kib(worker.pid) or 0, *(rss for _, rss in samples))
    cpu = cpu_seconds(worker.pid) or 0.0
    used = window.finish()
    worker.stop()
    rows, commit_span = await rows_stored(database_url, project)
    after_start = next((rss for done, rss in samples if done > 0), samples[-1][1])
    return DrainResult(
        kind=kind,
        backlog=backlog,
        messages=messages,
        drained=drained,
        seconds=round(seconds, 2),
        per_s=round(drained / seconds, 1),
        startup_seconds=round(first[0] - worker.started_at, 2),
        steady_per_s=round(steady, 1),
        rows=rows,
        rows_per_s=round(rows / commit_span, 1) if commit_span > 0 else 0.0,
        queue_ready_after=await queue_depth(amqp_url),
        api_exchange_messages=trusted,
        worker_rss_after_start_kib=after_start,
        worker_rss_last_kib=samples[-1][1],
        worker_rss_peak_kib=peak,
        worker_cpu_percent=round(100 * cpu / seconds, 1),
        cpu_percent=used,
        rss_by_drained=_spread(samples),
    )
