"""Where a process spends its time: py-spy samples, summarised by component and by function."""

import asyncio
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench._services import BenchError, tool

# Components of the api's request path, each known by the source file of a frame on the stack.
# Inclusive shares count a sample for every component on its stack, so they overlap (they
# nest); exclusive shares give each sample to the innermost component on it, so they add up.
COMPONENTS: dict[str, tuple[str, ...]] = {
    "uvicorn HTTP protocol (httptools)": ("uvicorn/protocols/http/",),
    "connection limits (api/http_server.py)": ("api/http_server.py",),
    "RequestContextMiddleware (request id, metrics)": ("api/metrics.py",),
    "request gate: names, key, charset, body read (api/request_gate.py)": (
        "api/request_gate.py",
        "api/limits.py",
    ),
    "Starlette/FastAPI routing and handler": ("starlette/routing.py", "fastapi/routing.py"),
    "FastAPI dependency resolution": ("fastapi/dependencies/utils.py",),
    "authentication (deps + key check)": ("api/deps.py", "api/keys.py", "fastapi/security/"),
    "write route (api/json_route.py): body decode + validation (pydantic), response": (
        "api/json_route.py",
        "shared/contract.py",
        "pydantic/",
        "pydantic_core/",
    ),
    "response serialisation": ("fastapi/encoders.py", "starlette/responses.py"),
    "service: build messages": ("api/service.py",),
    "publisher: publish + await confirm": ("api/publisher.py",),
    "AMQP client (aio-pika, aiormq, pamqp)": ("aio_pika/", "aiormq/", "pamqp/"),
    "api's AMQP publisher (api/amqp.py)": ("api/amqp.py",),
    "Prometheus client": ("prometheus_client/",),
    "logging": ("logging/__init__.py",),
    "worker: batching and acks": ("worker/worker.py",),
    "worker: decode + validate messages": ("worker/decode.py",),
    "worker: store (asyncpg)": ("worker/store.py", "asyncpg/"),
}
_LINE_NUMBER = re.compile(r":\d+\)$")
_OUTSIDE = "event loop, asyncio and the rest"


@dataclass(frozen=True)
class ProfileSummary:
    """The samples of one process's main thread, by component (inclusive) and function (self)."""

    samples: int
    seconds: float
    exclusive_percent: dict[str, float]
    components_percent: dict[str, float]
    top_self_percent: list[tuple[str, float]]
    folded_file: str

    def to_json(self) -> dict[str, Any]:
        """As stored in results.json."""
        return asdict(self)


async def record(pid: int, seconds: float, output: Path, rate: int = 100) -> None:
    """py-spy record of pid for seconds, as folded stacks (one `a;b;c count` line each).

    py-spy pauses the process for each sample, for whole stacks; that slows it down (the
    api by a quarter), so profiles run where no target is measured: phases of their own for
    the api, the large-backlog drain (whose rate is then only indicative) for the worker.
    """
    process = await asyncio.create_subprocess_exec(
        tool("py-spy"), "record", "--pid", str(pid), "--duration", f"{seconds:g}",
        "--rate", str(rate), "--format", "raw", "--threads", "--output", str(output),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    text, _ = await process.communicate()
    if process.returncode != 0:
        raise BenchError(f"py-spy failed ({process.returncode}): {text.decode(errors='replace')}")


def _innermost_component(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, markers in COMPONENTS.items():
            if any(marker in frame for marker in markers):
                return name
    return _OUTSIDE


def summarise(folded: Path, seconds: float, top: int = 20) -> ProfileSummary:
    """Component shares and the functions with the most self time, main thread only."""
    stacks: list[tuple[list[str], int]] = []
    by_thread: Counter[str] = Counter()
    # Non-blocking sampling can read a frame name mid-update: split on newlines only, and
    # skip a line that does not end in its count.
    for line in folded.read_bytes().decode(errors="replace").split("\n"):
        stack, _, samples = line.rpartition(" ")
        if not samples.isdigit():
            continue
        frames = stack.split(";")
        stacks.append((frames, int(samples)))
        by_thread[frames[0]] += int(samples)
    if not stacks:
        raise BenchError(f"py-spy recorded no samples in {folded}")
    # --threads puts the thread first; the event loop's thread is the busiest one.
    main_thread = by_thread.most_common(1)[0][0]
    main = [(frames[1:], count) for frames, count in stacks if frames[0] == main_thread]
    total = sum(count for _, count in main)
    components: Counter[str] = Counter()
    exclusive: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    for frames, count in main:
        for name, markers in COMPONENTS.items():
            if any(marker in frame for frame in frames for marker in markers):
                components[name] += count
        exclusive[_innermost_component(frames)] += count
        leaf = _LINE_NUMBER.sub(")", frames[-1]) if frames else "(no Python frame)"
        self_time[leaf] += count
    return ProfileSummary(
        samples=total,
        seconds=seconds,
        exclusive_percent={name: round(100 * n / total, 1) for name, n in exclusive.most_common()},
        components_percent={
            name: round(100 * n / total, 1) for name, n in components.most_common() if n
        },
        top_self_percent=[
            (name, round(100 * n / total, 1)) for name, n in self_time.most_common(top)
        ],
        folded_file=str(folded),
    )
