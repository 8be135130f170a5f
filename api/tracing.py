"""The api's span per request, when tracing is on: a child of the client's `traceparent`.

Our own few lines rather than the ASGI instrumentation or FastAPI's telemetry option, which
cost more CPU per request (BENCHMARKS.md, "Tracing"). A malformed traceparent is ignored:
the request starts a new trace, and is answered as it would be without one.
"""

from contextvars import Token
from typing import Final

from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanKind,
    Status,
    StatusCode,
    set_span_in_context,
)
from starlette.types import Scope

from api.limits import header
from shared import logs
from shared.tracing import Tracing, current_traceparent, format_traceparent, parse_traceparent

_TRACEPARENT: Final = b"traceparent"
UNTRACED_PATHS: Final = frozenset({"/healthz", "/readyz", "/metrics"})
"""Probes and scrapes, every few seconds: spans of them would bury the requests'."""


class RequestSpan:
    """A request's server span, its trace in the log context and its traceparent in the
    publisher's while it runs."""

    __slots__ = ("_method", "_published", "_span", "_trace_id")

    def __init__(self, tracing: Tracing, scope: Scope, request_id: str) -> None:
        given = parse_traceparent((header(scope, _TRACEPARENT) or b"").decode("latin-1"))
        parent = None if given is None else set_span_in_context(NonRecordingSpan(given))
        method = self._method = scope["method"]
        span = self._span = tracing.tracer.start_span(
            method,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": method,
                "url.path": scope["path"],
                "score_ingest.request_id": request_id,
            },
        )
        context = span.get_span_context()
        self._trace_id = logs.trace_id.set(f"{context.trace_id:032x}")
        # Only a sampled span is worth carrying: the worker's links point at what was exported.
        traceparent = format_traceparent(context) if context.trace_flags.sampled else None
        self._published: Token[str | None] = current_traceparent.set(traceparent)

    def end(self, route: str, status: int) -> None:
        """Name the span after its route, record the status, end it, and leave the context."""
        span: Span = self._span
        if span.is_recording():
            span.update_name(f"{self._method} {route}")
            span.set_attributes({"http.route": route, "http.response.status_code": status})
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))
        span.end()
        current_traceparent.reset(self._published)
        logs.trace_id.reset(self._trace_id)
