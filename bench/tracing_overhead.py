"""CPU per request of ways to trace the api, in one process: `python -m bench.tracing_overhead`.

A FastAPI app of one trivial POST route, called through ASGI directly (no sockets, no
broker), behind the api's RequestContextMiddleware in every case:

- `off`: tracing off (no tracer provider), as the api runs without an endpoint;
- `ours`: api/tracing.py's span per request (RequestContextMiddleware with a Tracing);
- `asgi`: opentelemetry-instrumentation-asgi's OpenTelemetryMiddleware (if importable);
- `fastapi`: FastAPI's native telemetry, tracing only.

Every traced case has a tracer provider like the api's, whose batch processor hands its
spans to an OTLP exporter that encodes them to protobuf and discards the bytes, so the
figures hold the SDK's work and the encoding, not a collector's. CPU is the process's
(every thread's), per request, the median of interleaved rounds.
"""

import argparse
import asyncio
import importlib
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from starlette.types import ASGIApp, Message

from api.app import NO_OPENTELEMETRY
from api.metrics import RequestContextMiddleware
from shared.tracing import Tracing

TRACEPARENT = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class _EncodingSink(SpanExporter):
    """Encodes spans as the OTLP exporter does, counts them, and drops them."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        encode_spans(spans).SerializeToString()
        self.spans += len(spans)
        return SpanExportResult.SUCCESS


_SINKS: dict[str, _EncodingSink] = {}


def _provider(name: str) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: "bench"}))
    sink = _SINKS[name] = _EncodingSink()
    provider.add_span_processor(BatchSpanProcessor(sink))
    return provider


class _OursTracing(Tracing):
    """Tracing as the api builds it, with the encoding sink instead of the HTTP exporter."""

    def __init__(self) -> None:
        self._provider = _provider("ours")
        self.tracer = self._provider.get_tracer("score-ingest")


def _app(telemetry: Any = NO_OPENTELEMETRY) -> FastAPI:
    app = FastAPI(telemetry=telemetry)

    @app.post("/v2/{entity}/{project}/scores")
    async def create(entity: str, project: str) -> dict[str, str]:
        return {"score_id": "0192f0b4-6b7e-7c2a-9f3e-1a2b3c4d5e6f"}

    return app


def _variants() -> dict[str, tuple[ASGIApp, Callable[[], None]]]:
    variants: dict[str, tuple[ASGIApp, Callable[[], None]]] = {}
    variants["off"] = (RequestContextMiddleware(_app()), lambda: None)
    ours = _OursTracing()
    variants["ours"] = (RequestContextMiddleware(_app(), tracing=ours), ours.close)
    try:
        # Not a dependency: `pip install opentelemetry-instrumentation-asgi` to compare.
        asgi = importlib.import_module("opentelemetry.instrumentation.asgi")
    except ImportError:
        print("opentelemetry-instrumentation-asgi is not installed: its case is left out")
    else:
        provider = _provider("asgi")
        instrumented = asgi.OpenTelemetryMiddleware(_app(), tracer_provider=provider)
        variants["asgi"] = (RequestContextMiddleware(instrumented), provider.shutdown)
    provider = _provider("fastapi")
    native = _app({"tracing": True, "metrics": False, "logs": False, "tracer_provider": provider})
    variants["fastapi"] = (RequestContextMiddleware(native), provider.shutdown)
    return variants


async def _requests(app: ASGIApp, count: int) -> None:
    body = b'{"value": 1}'
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v2/acme/evals/scores",
        "raw_path": b"/v2/acme/evals/scores",
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"bench"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"traceparent", TRACEPARENT),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }

    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        pass

    for _ in range(count):
        await app(dict(scope), receive, send)


def main(argv: list[str] | None = None) -> None:
    """Interleaved rounds of each variant; prints CPU microseconds per request."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=5000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args(argv)
    variants = _variants()
    loop = asyncio.new_event_loop()
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for app, _ in variants.values():
        loop.run_until_complete(_requests(app, 500))  # warm-up
    for _ in range(options.rounds):
        for name, (app, _) in variants.items():
            started = time.process_time()
            loop.run_until_complete(_requests(app, options.requests))
            time.sleep(0.2)  # the exporter thread's share of this round, inside the window
            cpu[name].append(1e6 * (time.process_time() - started) / options.requests)
    for _, stop in variants.values():
        stop()
    sent = 500 + options.rounds * options.requests
    off = statistics.median(cpu["off"])
    for name, rounds in cpu.items():
        median = statistics.median(rounds)
        spans = _SINKS[name].spans / sent if name in _SINKS else 0
        print(
            f"{name:8} {median:7.1f} µs CPU a request ({median - off:+6.1f} over off),"
            f" {spans:g} spans a request"
        )


if __name__ == "__main__":
    main()
