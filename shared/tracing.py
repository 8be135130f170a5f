"""OpenTelemetry traces, exported by OTLP/HTTP when OTEL_EXPORTER_OTLP_ENDPOINT is set.

Without an endpoint nothing is created: no tracer provider, no exporter thread, no header on
any message, and the api and worker each pay one `is None` check (per request, per batch).

Trace context travels as W3C `traceparent` values (https://www.w3.org/TR/trace-context/):
from an HTTP client to the api, and from the api (or any direct publisher) to the worker in
the AMQP message's headers — `traceparent` for a message holding one request's scores,
`traceparents` (an array) for one the api gathered from several requests. The worker's
`store` span links to each message's context: one stored batch, many traces.

The OpenTelemetry SDK is imported only when tracing starts.
"""

import re
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Final

from opentelemetry.trace import SpanContext, TraceFlags

from shared.settings import Settings

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

TRACEPARENT_HEADER: Final = "traceparent"
TRACEPARENTS_HEADER: Final = "traceparents"
MAX_LINKS: Final = 128
"""Links a `store` span holds at most; past them, the span counts what it left out."""

current_traceparent: ContextVar[str | None] = ContextVar("current_traceparent", default=None)
"""The traceparent of the request being handled, when it is sampled: what its message carries."""

# version-trace_id-parent_id-flags; a later version may append fields after a dash.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_SAMPLED: Final = 0x01


def parse_traceparent(value: object) -> SpanContext | None:
    """The remote span context a W3C traceparent names; None for anything malformed."""
    if not isinstance(value, str) or len(value) > 512:
        return None
    match = _TRACEPARENT.fullmatch(value)
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    # Version ff is invalid; version 00 has exactly four fields; zero ids are invalid.
    if version == "ff" or (version == "00" and rest is not None):
        return None
    context = SpanContext(
        trace_id=int(trace_id, 16),
        span_id=int(span_id, 16),
        is_remote=True,
        trace_flags=TraceFlags(int(flags, 16) & _SAMPLED),
    )
    return context if context.is_valid else None


def format_traceparent(context: SpanContext) -> str:
    """The W3C traceparent (version 00) of a span context."""
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


def trace_headers(traceparents: Sequence[str]) -> dict[str, Any] | None:
    """The AMQP headers carrying the trace contexts of a message's requests (None: none)."""
    if not traceparents:
        return None
    if len(traceparents) == 1:
        return {TRACEPARENT_HEADER: traceparents[0]}
    return {TRACEPARENTS_HEADER: list(traceparents)}


def message_contexts(headers: Mapping[str, Any] | None) -> list[SpanContext]:
    """The valid trace contexts a message's headers carry (malformed ones are ignored)."""
    if not headers:
        return []
    found = [headers.get(TRACEPARENT_HEADER)]
    several = headers.get(TRACEPARENTS_HEADER)
    if isinstance(several, list | tuple):
        found.extend(several[:MAX_LINKS])
    return [context for value in found if (context := parse_traceparent(value)) is not None]


class Tracing:
    """A tracer provider of the process's own, exporting its spans in batches by OTLP/HTTP.

    Sampling follows the standard OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG (by
    default, parent-based, always on): a request whose traceparent says not sampled is
    not recorded.
    """

    def __init__(self, endpoint: str, service_name: str) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self._provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
        exporter = OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")
        self._provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer: Tracer = self._provider.get_tracer("score-ingest")

    def close(self) -> None:
        """Export what is left and stop the exporter (blocks: call it off the event loop)."""
        self._provider.shutdown()


def start_tracing(settings: Settings, default_service_name: str) -> Tracing | None:
    """Tracing for this process when OTEL_EXPORTER_OTLP_ENDPOINT is set, else None."""
    if settings.otel_exporter_otlp_endpoint is None:
        return None
    return Tracing(
        settings.otel_exporter_otlp_endpoint, settings.otel_service_name or default_service_name
    )
