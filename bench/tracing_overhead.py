"""CPU per request of ways to trace the api, in one process: `python -m bench.tracing_overhead`.

A FastAPI app of one trivial POST route, called through ASGI directly (no sockets, no
broker), behind the api's RequestContextMiddleware in every case:

- `off`: tracing off (no tracer provider), as the api runs without an endpoint;
- `ours`: api/tracing.py's span per request (RequestContextMiddleware with a Tracing);
- `ours-10%`: the same, for requests without a traceparent, a tenth of them sampled;
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
from opentelemetry.sdk.trace.sampling import Sampler, TraceIdRatioBased
from starlette.types import ASGIApp, Message

from api.app import NO_OPENTELEMETRY
from api.metrics import RequestContextMiddleware
from shared.tracing import Tracing

TRACEPARENT = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
NEW_TRACES = {"ours-10%"}


class _EncodingSink(SpanExporter):
    """Encodes spans as the OTLP exporter does, counts them, and drops them."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        encode_spans(spans).SerializeToString()
        self.spans += len(spans)
        return SpanExportResult.SUCCESS


_SINKS: dict[str, _EncodingSink] = {}
_PROVIDERS: dict[str, TracerProvider] = {}


def _provider(name: str, sampler: Sampler | None = None) -> TracerProvider:
    """A provider like the api's, whose queue holds a whole round: a span dropped when the
    queue is full would not be encoded, and its cost not counted."""
    resource = Resource.create({SERVICE_NAME: name})
    provider = _PROVIDERS[name] = TracerProvider(resource=resource, sampler=sampler)
    sink = _SINKS[name] = _EncodingSink()
    provider.add_span_processor(BatchSpanProcessor(sink, max_queue_size=1_000_000))
    return provider


class _OursTracing(Tracing):
    """Tracing as the api builds it, with the encoding sink instead of the HTTP exporter."""

    def __init__(self, name: str, sampler: Sampler | None = None) -> None:
        self._provider = _provider(name, sampler)
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
    ours = _OursTracing("ours")
    variants["ours"] = (RequestContextMiddleware(_app(), tracing=ours), ours.close)
    # A tenth of new traces: its requests come without a traceparent (NEW_TRACES).
    tenth = _OursTracing("ours-10%", TraceIdRatioBased(0.1))
    variants["ours-10%"] = (RequestContextMiddleware(_app(), tracing=tenth), tenth.close)
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


async def _requests(app: ASGIApp, count: int, traceparent: bool = True) -> None:
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
            *([(b"traceparent", TRACEPARENT)] if traceparent else []),
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
    for name, (app, _) in variants.items():
        loop.run_until_complete(_requests(app, 500, name not in NEW_TRACES))  # warm-up
    for _ in range(options.rounds):
        for name, (app, _) in variants.items():
            started = time.process_time()
            loop.run_until_complete(_requests(app, options.requests, name not in NEW_TRACES))
            if name in _PROVIDERS:  # the exporter thread's share of this round, inside it
                _PROVIDERS[name].force_flush()
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
