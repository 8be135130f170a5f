"""The cost of tracing (BENCHMARKS.md "Tracing"): single POSTs against an api with tracing
off, on, and on with a tenth of traces sampled, interleaved, and against the code of another
checkout (the code before tracing, with `--tracing-baseline DIR`).

With tracing on the api exports to a local OTLP/HTTP sink that reads and discards what it is
sent, so the cost measured is the api's own: spans made, encoded and posted by its exporter
thread. The worker runs untraced, the same for every contender.
"""

import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from bench import _load
from bench._services import ENTITY, BenchError, free_port, score_ingest_command

if TYPE_CHECKING:
    from bench.run import _Run


class _Sink:
    """Counts what exporters post to /v1/traces, and keeps none of it."""

    def __init__(self) -> None:
        self.posts = 0
        self.bytes = 0

    async def receive(self, request: web.Request) -> web.Response:
        self.bytes += len(await request.read())
        self.posts += 1
        return web.Response(body=b"", content_type="application/x-protobuf")


@contextlib.asynccontextmanager
async def _sink() -> AsyncIterator[tuple[_Sink, str]]:
    sink = _Sink()
    app = web.Application()
    app.router.add_post("/v1/traces", sink.receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield sink, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def _cpu_ms_per_request(result: _load.WrkResult) -> float:
    """The api's CPU time per answered request, in milliseconds."""
    cpu_seconds = result.cpu_percent.get("api", 0.0) / 100 * result.duration_s
    return round(1000 * cpu_seconds / max(result.requests, 1), 4)


def _median_of(runs: list[_load.WrkResult]) -> dict[str, Any]:
    by_rate = sorted(runs, key=lambda result: result.requests_per_s)
    by_cpu = sorted(_cpu_ms_per_request(result) for result in runs)
    middle = (len(runs) - 1) // 2
    return {
        **by_rate[middle].to_json(),
        "api_cpu_ms_per_request": by_cpu[middle],
        "rounds": [
            {"requests_per_s": r.requests_per_s, "api_cpu_ms_per_request": _cpu_ms_per_request(r)}
            for r in runs
        ],
    }


async def tracing_cost(
    run: "_Run", single: Path, settle: Callable[[dict[str, int]], Awaitable[object]]
) -> dict[str, Any]:
    """Interleaved rounds of single POSTs against each api; each by its median round."""
    options = run.options
    health = free_port()
    worker = run.server(
        "tracing-worker", [*score_ingest_command(), "worker"], WORKER_HEALTH_PORT=str(health)
    )
    await worker.wait_ready(f"http://127.0.0.1:{health}/readyz")
    async with _sink() as (sink, endpoint):
        on = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}
        # wrk sends no traceparent: every request starts a trace, a tenth of them sampled.
        tenth = {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}
        apis: dict[str, dict[str, str]] = {"off": {}, "on": on, "tenth": {**on, **tenth}}
        baseline: Path | None = options.tracing_baseline
        if baseline is not None:
            # The other checkout first on the path: its packages, this virtualenv's libraries.
            path = os.pathsep.join(filter(None, (str(baseline), os.environ.get("PYTHONPATH"))))
            apis = {"before": {"PYTHONPATH": path}, **apis}
        contenders = {}
        for name, env in apis.items():
            port = free_port()
            server = run.server(
                f"tracing-api-{name}",
                [*score_ingest_command(), "api"],
                API_HOST="127.0.0.1",
                API_PORT=str(port),
                **env,
            )
            base = f"http://127.0.0.1:{port}"
            await server.wait_ready(base + "/readyz")
            contenders[name] = (server, base, f"/v2/{ENTITY}/tracing-{name}/scores")
        rounds: dict[str, list[_load.WrkResult]] = {name: [] for name in contenders}
        for number in range(1, options.tracing_rounds + 1):
            for name, (server, base, path) in contenders.items():
                run.note_load(f"tracing-{name}-{number}")
                watch = {"api": server.pid, "worker": worker.pid}
                result = await run.wrk(base, path, single, options.connections, watch)
                if result.non_2xx or result.socket_errors:
                    raise BenchError(
                        f"tracing {name}: {result.non_2xx} answers not 2xx,"
                        f" {result.socket_errors} socket errors"
                    )
                rounds[name].append(result)
                print(
                    f"bench: tracing {name}, round {number}: {result.requests_per_s:,.0f} req/s,"
                    f" api {_cpu_ms_per_request(result)} ms CPU a request",
                    flush=True,
                )
                await settle({f"tracing-{name}": run.results["answered"][path]})
        for server, _, _ in contenders.values():
            run.group.stop(server)
        exported = {"posts": sink.posts, "bytes": sink.bytes}
    run.group.stop(worker)
    measured: dict[str, Any] = {name: _median_of(runs) for name, runs in rounds.items()}
    measured["sink"] = exported
    for name, than in (("on", "off"), ("tenth", "off"), ("off", "before")):
        if than in measured:
            measured[f"{name}_vs_{than}"] = _ratios(measured[name], measured[than])
    return measured


def _ratios(one: dict[str, Any], other: dict[str, Any]) -> dict[str, float]:
    return {
        "requests_per_s": round(one["requests_per_s"] / other["requests_per_s"], 3),
        "api_cpu_per_request": round(
            one["api_cpu_ms_per_request"] / other["api_cpu_ms_per_request"], 3
        ),
    }
