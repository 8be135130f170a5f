"""Load generators: wrk for closed-loop maximum load, a paced Python client for a fixed rate.

wrk has no rate limit (wrk2 is not packaged in Debian), so the fixed-rate run is an open-loop
client of our own, on keep-alive connections, that sends on a schedule and measures latency
from the scheduled time, which keeps a slow server from hiding its queueing delay
(coordinated omission). The same client records when each 200 arrived and polls PostgreSQL
until the score's row is readable.
"""

import asyncio
import collections
import contextlib
import json
import math
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import asyncpg

from bench._services import BenchError, tool
from bench._system import CpuWindow

LUA_SCRIPT = Path(__file__).with_name("post_score.lua")
_RESULT_PREFIX = "BENCH_RESULT "
_VISIBILITY_POLL_SECONDS = 0.01
_VISIBILITY_TIMEOUT_SECONDS = 30.0
_FIND_VISIBLE = "SELECT score_id::text FROM scores WHERE score_id = ANY($1::uuid[])"


def percentile(values: list[float], pct: float) -> float:
    """The pct-th percentile (nearest rank) of values; NaN for none."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class WrkResult:
    """One wrk run: throughput, latency, errors, and who used the CPU meanwhile."""

    connections: int
    threads: int
    duration_s: float
    requests: int
    requests_per_s: float
    latency_p50_ms: float
    latency_p90_ms: float
    latency_p99_ms: float
    latency_max_ms: float
    non_2xx: int
    socket_errors: int
    cpu_percent: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        """As stored in results.json."""
        return asdict(self)


async def run_wrk(
    url: str,
    *,
    path: str,
    authorization: str,
    body_file: Path,
    connections: int,
    threads: int,
    duration_s: float,
    watch: dict[str, int],
) -> WrkResult:
    """POST body_file to url+path for duration_s with wrk; watch maps names to pids for CPU%."""
    env = {
        "BENCH_PATH": path,
        "BENCH_AUTHORIZATION": authorization,
        "BENCH_BODY_FILE": str(body_file),
    }
    argv = [
        tool("wrk"), f"-t{threads}", f"-c{connections}", f"-d{duration_s:g}s", "--timeout", "10s",
        "-s", str(LUA_SCRIPT), url,
    ]  # fmt: skip
    # wrk's own CPU: what our finished children used, which during this call is wrk alone.
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    window = CpuWindow(watch)
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await process.communicate()
    wall = time.monotonic() - started
    cpu = window.finish()
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    wrk_cpu = (
        children_after.ru_utime + children_after.ru_stime
        - children_before.ru_utime - children_before.ru_stime
    )  # fmt: skip
    cpu["wrk"] = round(100 * wrk_cpu / wall, 1)
    text = output.decode(errors="replace")
    lines = [line for line in text.splitlines() if line.startswith(_RESULT_PREFIX)]
    if process.returncode != 0 or not lines:
        raise BenchError(f"wrk failed ({process.returncode}):\n{text}")
    raw = json.loads(lines[-1].removeprefix(_RESULT_PREFIX))
    seconds = raw["duration_us"] / 1e6
    return WrkResult(
        connections=connections,
        threads=threads,
        duration_s=round(seconds, 2),
        requests=raw["requests"],
        requests_per_s=round(raw["requests"] / seconds, 1),
        latency_p50_ms=raw["latency_p50_us"] / 1000,
        latency_p90_ms=raw["latency_p90_us"] / 1000,
        latency_p99_ms=raw["latency_p99_us"] / 1000,
        latency_max_ms=raw["latency_max_us"] / 1000,
        non_2xx=raw["non_2xx_3xx"],
        socket_errors=sum(
            raw[key] for key in ("connect_errors", "read_errors", "write_errors", "timeouts")
        ),
        cpu_percent=cpu,
    )


@dataclass(frozen=True)
class PacedResult:
    """A fixed-rate run: did the client hold the rate, and how soon were the scores readable."""

    target_rate_per_s: float
    achieved_rate_per_s: float
    sent: int
    ok: int
    non_2xx: int
    errors: int
    max_send_lag_ms: float
    client_cpu_percent: float
    latency_p50_ms: float
    latency_p99_ms: float
    latency_over_500ms: int
    slow_seconds: list[dict[str, float]]
    visibility_p50_ms: float
    visibility_p99_ms: float
    visibility_max_ms: float
    never_visible: int
    poll_interval_ms: float
    cpu_percent: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        """As stored in results.json."""
        return asdict(self)


def _slow_seconds(timeline: list[tuple[float, float]]) -> list[dict[str, float]]:
    """The seconds of a run (by scheduled send time) in which some request took > 500 ms."""
    seconds: dict[int, list[float]] = {}
    for offset, latency in timeline:
        seconds.setdefault(int(offset), []).append(latency)
    return [
        {
            "second": second,
            "requests": len(latencies),
            "over_500ms": sum(1 for latency in latencies if latency > 0.5),
            "max_ms": round(1000 * max(latencies), 1),
        }
        for second, latencies in sorted(seconds.items())
        if max(latencies) > 0.5
    ]


class _Visibility:
    """Polls PostgreSQL for the rows of answered scores; a row's visibility time is the start
    of the first query that saw it (its snapshot), so it errs late by at most one interval."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn
        self.pending: dict[str, float] = {}
        self.delays: list[float] = []

    async def poll_until(self, stop: asyncio.Event) -> None:
        while not (stop.is_set() and not self.pending):
            if self.pending:
                ids = list(self.pending)
                started = time.perf_counter()
                for row in await self._conn.fetch(_FIND_VISIBLE, ids):
                    answered = self.pending.pop(row[0])
                    self.delays.append(started - answered)
            await asyncio.sleep(_VISIBILITY_POLL_SECONDS)


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection carrying one request at a time.

    aiohttp costs the paced client about 0.2 ms of CPU per request, so at 3,400 req/s it
    could not keep its schedule on this machine; this sends a request made once and reads
    just the status line, Content-Length and body of each response.
    """

    def __init__(
        self,
        request: bytes,
        answered: Callable[["_Connection", int, bytes], None],
        lost: Callable[[], None],
    ) -> None:
        self._request = request
        self._answered = answered
        self._lost = lost
        self._transport: asyncio.Transport | None = None
        self._buffer = b""
        self.scheduled = 0.0  # of the request in flight

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, though they act as one.
        self._transport = cast(asyncio.Transport, transport)

    def send(self, scheduled: float) -> None:
        assert self._transport is not None
        self.scheduled = scheduled
        self._transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while True:
            head_end = self._buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self._buffer[:head_end].decode("latin-1").split("\r\n")
            length = next(
                (
                    int(line.partition(":")[2])
                    for line in head[1:]
                    if line.lower().startswith("content-length:")
                ),
                None,
            )
            if length is None:
                raise BenchError(f"a response without Content-Length: {head[0]}")
            end = head_end + 4 + length
            if len(self._buffer) < end:
                return
            body, self._buffer = self._buffer[head_end + 4 : end], self._buffer[end:]
            self._answered(self, int(head[0].split()[1]), body)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


async def run_paced(
    url: str,
    *,
    authorization: str,
    body: bytes,
    rate_per_s: float,
    duration_s: float,
    connections: int,
    database_url: str,
    watch: dict[str, int],
) -> PacedResult:
    """POST body to url at rate_per_s for duration_s; measure latency and 200-to-readable.

    Open loop: each request has a scheduled time, and its latency counts from it, waiting
    for a free connection included. send lag is how late the client's own loop dispatched
    a request: the client is sound while it stays small.
    """
    total = int(rate_per_s * duration_s)
    latencies: list[float] = []
    timeline: list[tuple[float, float]] = []
    send_lags: list[float] = []
    statuses: dict[int, int] = {}
    conn = await asyncpg.connect(database_url)
    visibility = _Visibility(conn)
    stop_polling = asyncio.Event()
    parts = urlsplit(url)
    request = (
        f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Authorization: {authorization}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    # Used in turn (oldest idle first), so that none waits idle past the api's header
    # timeout (HTTP_HEADER_TIMEOUT_SECONDS), which closes it.
    idle: collections.deque[_Connection] = collections.deque()
    waiting: collections.deque[float] = collections.deque()  # scheduled times, no connection
    done = asyncio.Event()
    answered_count = 0
    closing = False

    def lost() -> None:
        if not closing:
            done.set()  # early: the check after the wait says what is missing

    def answered(connection: _Connection, status: int, payload: bytes) -> None:
        nonlocal answered_count
        now = time.perf_counter()
        scheduled = connection.scheduled
        statuses[status] = statuses.get(status, 0) + 1
        if status == 200:
            visibility.pending[json.loads(payload)["score_id"]] = now
            latencies.append(now - scheduled)
            timeline.append((scheduled - start, now - scheduled))
        answered_count += 1
        if waiting:
            connection.send(waiting.popleft())
        else:
            idle.append(connection)
        if answered_count == total:
            done.set()

    loop = asyncio.get_running_loop()
    opened: list[_Connection] = []
    poller: asyncio.Task[None] | None = None
    try:
        for _ in range(connections):
            _, connection = await loop.create_connection(
                lambda: _Connection(request, answered, lost),
                parts.hostname or "127.0.0.1",
                parts.port or 80,
            )
            opened.append(connection)
        idle.extend(opened)
        window = CpuWindow(watch)
        cpu_before = time.process_time()
        poller = asyncio.create_task(visibility.poll_until(stop_polling))
        start = time.perf_counter() + 0.05  # the schedule's origin; answered() reads it
        for i in range(total):
            scheduled = start + i / rate_per_s
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            send_lags.append(time.perf_counter() - scheduled)
            if idle:
                idle.popleft().send(scheduled)
            else:
                waiting.append(scheduled)
        sending_ended = time.perf_counter()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), _VISIBILITY_TIMEOUT_SECONDS)
        if answered_count < total:
            raise BenchError(
                f"the paced run got {answered_count} of {total} answers (a connection lost?)"
            )
        cpu = window.finish()
        client_cpu = time.process_time() - cpu_before
        client_wall = time.perf_counter() - start
        stop_polling.set()
        # Rows not readable by then count as never visible.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(poller, _VISIBILITY_TIMEOUT_SECONDS)
    finally:
        closing = True
        for connection in opened:
            connection.close()
        if poller is not None:
            poller.cancel()
        await conn.close()
    ok = statuses.get(200, 0)
    never = len(visibility.pending)
    delays = visibility.delays + [math.inf] * never
    return PacedResult(
        target_rate_per_s=round(rate_per_s, 1),
        achieved_rate_per_s=round(total / (sending_ended - start), 1),
        sent=total,
        ok=ok,
        non_2xx=sum(n for status, n in statuses.items() if not 200 <= status < 300),
        errors=total - answered_count,
        max_send_lag_ms=round(1000 * max(send_lags, default=0.0), 1),
        client_cpu_percent=round(100 * client_cpu / client_wall, 1),
        latency_p50_ms=round(1000 * percentile(latencies, 50), 2),
        latency_p99_ms=round(1000 * percentile(latencies, 99), 2),
        latency_over_500ms=sum(1 for latency in latencies if latency > 0.5),
        slow_seconds=_slow_seconds(timeline),
        visibility_p50_ms=round(1000 * percentile(delays, 50), 1),
        visibility_p99_ms=round(1000 * percentile(delays, 99), 1),
        visibility_max_ms=round(1000 * max(delays, default=math.nan), 1),
        never_visible=never,
        poll_interval_ms=_VISIBILITY_POLL_SECONDS * 1000,
        cpu_percent=cpu,
    )
