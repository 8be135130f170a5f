"""An OTLP/HTTP trace receiver in this process: what an OpenTelemetry collector would see.

It accepts `POST /v1/traces` (protobuf, gzip or not), decodes each request with
opentelemetry-proto, and keeps the spans; `keep=False` makes it a sink that only counts
them (the bench's). It runs on a thread of its own, so the exporters' blocking HTTP posts
are answered whatever the event loop under test is doing.
"""

import asyncio
import gzip
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

_PROTOBUF = "application/x-protobuf"


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return None if kind is None else getattr(value, kind)


@dataclass(frozen=True)
class ReceivedSpan:
    """A span as exported: ids in hex, as traceparents write them."""

    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root span
    links: list[tuple[str, str]]  # (trace_id, span_id) of each link
    attributes: dict[str, Any] = field(default_factory=dict)
    status_code: int = 0


class OtlpReceiver:
    """The spans received so far, and where to send them (`endpoint`, for
    OTEL_EXPORTER_OTLP_ENDPOINT)."""

    def __init__(self, keep: bool = True) -> None:
        self.keep = keep
        self.spans: list[ReceivedSpan] = []
        self.span_count = 0
        self.requests = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="otlp-receiver", daemon=True
        )

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver._received(request)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", _PROTOBUF)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the exporter posts often; the test's output is not the place

        return Handler

    def _received(self, request: ExportTraceServiceRequest) -> None:
        spans: list[ReceivedSpan] = []
        count = 0
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                count += len(scope_spans.spans)
                if not self.keep:
                    continue
                spans.extend(
                    ReceivedSpan(
                        service=str(resource.get("service.name", "")),
                        name=span.name,
                        kind=span.kind,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        links=[(link.trace_id.hex(), link.span_id.hex()) for link in span.links],
                        attributes={a.key: _value(a.value) for a in span.attributes},
                        status_code=span.status.code,
                    )
                    for span in scope_spans.spans
                )
        with self._lock:
            self.requests += 1
            self.span_count += count
            self.spans.extend(spans)

    def received(self, where: Callable[[ReceivedSpan], bool]) -> list[ReceivedSpan]:
        """The spans received so far that where accepts."""
        with self._lock:
            return [span for span in self.spans if where(span)]

    async def wait_for(
        self, where: Callable[[ReceivedSpan], bool], count: int = 1, timeout: float = 20.0
    ) -> list[ReceivedSpan]:
        """The spans where accepts, once there are at least count (exporters send in batches,
        every few seconds); fails after timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(found := self.received(where)) < count:
            if loop.time() > deadline:
                raise AssertionError(f"{len(found)} of {count} spans received within {timeout}s")
            await asyncio.sleep(0.05)
        return found

    def start(self) -> None:
        """Serve on the thread of its own."""
        self._thread.start()

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


@contextmanager
def otlp_receiver(keep: bool = True) -> Iterator[OtlpReceiver]:
    """An OtlpReceiver serving for the length of the block."""
    receiver = OtlpReceiver(keep)
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.close()
