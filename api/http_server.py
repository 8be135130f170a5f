"""uvicorn's httptools protocol, with the connection limits uvicorn does not have.

uvicorn (with httptools) waits for a request's headers and body for ever and lets a header
grow without bound, so a client that sends slowly (slowloris) or never ends a header line
holds a connection, and memory, as long as it likes. This protocol gives every connection
a deadline for each phase and a size for its headers:

- headers: from the connection's opening, or from the end of the previous response, a
  request's headers must arrive within `HTTP_HEADER_TIMEOUT_SECONDS`; else 408 (or, when
  nothing of a request came, a silent close) and the connection is closed;
- header size: at most `HTTP_MAX_HEADER_BYTES` (request line and headers), counted as the
  bytes arrive; past it 431 and the connection is closed, so an unfinished header line
  costs at most about that much memory;
- body: from the end of its headers, a request's whole body must arrive within
  `HTTP_BODY_TIMEOUT_SECONDS`; else 408 and the connection is closed.

At most `HTTP_MAX_CONNECTIONS` connections are open. A new one beyond that closes the
connection that has awaited a request's headers longest (an idle keep-alive connection or
a slow sender), so idle connections cannot lock clients out; only when every connection
has a request in progress is the new one answered 503.

A response that starts before its request's body has arrived (a 401 before the body, a
404) says `connection: close`: the rest of the body is not read. Closing a connection
while its client may still be sending lingers, as web servers do: the answer is followed
by a FIN, and what still arrives is discarded for up to `_LINGER_SECONDS` or
`_LINGER_BYTES`, so that the client reads the answer instead of a reset (a close with
unread data in the socket sends a TCP RST, and the client's kernel drops the answer).
"""

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from http import HTTPStatus
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from shared.settings import Settings

# What a header line costs on the wire besides its name and value.
_HEADER_LINE_OVERHEAD = len(b": \r\n")
_LINGER_SECONDS = 1.0
_LINGER_BYTES = 256 * 1024


@dataclass(frozen=True)
class ConnectionLimits:
    """The limits every connection of one server is held to."""

    header_timeout_seconds: float
    max_header_bytes: int
    body_timeout_seconds: float
    max_connections: int
    retry_after_seconds: int

    @classmethod
    def from_settings(cls, settings: Settings) -> "ConnectionLimits":
        """The limits the HTTP_* settings set."""
        return cls(
            header_timeout_seconds=settings.http_header_timeout_seconds,
            max_header_bytes=settings.http_max_header_bytes,
            body_timeout_seconds=settings.http_body_timeout_seconds,
            max_connections=settings.http_max_connections,
            retry_after_seconds=settings.retry_after_seconds,
        )


class _Phase(Enum):
    """Where a connection's current request is, as far as deadlines go."""

    AWAITING_HEADERS = "awaiting headers"  # nothing yet, or part of the headers
    RECEIVING_BODY = "receiving body"
    ANSWERING = "answering"  # the whole request is in: the app's time, not the client's


class _Refused(Exception):
    """Raised in a parser callback to stop parsing a request already answered."""


class _ClosedThroughProtocol(asyncio.Transport):
    """The transport as uvicorn's code sees it: its close() goes through the protocol,
    which lingers while the client may still be sending; and its writes go out in pairs.

    uvicorn writes a response's status line and headers, then its body, as two writes,
    each a send(2) of its own: the first is held until the second, made in the same turn
    of the event loop, so that both go in one. What nothing follows goes at the end of
    the turn. (A send is about a twelfth of the api's CPU for a single-score POST.)
    """

    def __init__(self, transport: asyncio.Transport, protocol: "LimitedHttpProtocol") -> None:
        super().__init__()
        self._transport = transport
        self._protocol = protocol
        self._held: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Hold data until the next write or the end of this turn of the event loop."""
        held = self._held
        if held is None:
            self._held = bytes(data)
            self._protocol.loop.call_soon(self.flush)
        else:
            self._held = None
            self._transport.write(held + data)

    def flush(self) -> None:
        """Write what is held, unless the connection is closed."""
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def is_closing(self) -> bool:
        """Whether the connection is closed or being closed, lingering included."""
        return self._protocol.closing or self._transport.is_closing()

    def close(self) -> None:
        """Close, lingering if a request is partly received."""
        self._protocol.close_connection()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """As the real transport answers."""
        return self._transport.get_extra_info(name, default)


class LimitedHttpProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with header and body deadlines, a header size limit and a bound
    on open connections (see the module's docstring). Use `http_protocol` to get one."""

    limits: ClassVar[ConnectionLimits]
    # Connections awaiting a request's headers, longest-waiting first: the ones to close
    # when a new connection needs room. One per server: each server gets its own class.
    awaiting: ClassVar[dict["LimitedHttpProtocol", None]]

    closing = False
    _socket: asyncio.Transport
    _out: _ClosedThroughProtocol
    _phase: _Phase | None = None
    _deadline: asyncio.TimerHandle | None = None
    _parsing_body = False
    _message_begun = False
    _header_bytes = 0
    _keep_alive = True  # what the request whose body is awaited asked for
    _shutting_down = False
    _lingered_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Make room for the connection (or refuse it), then start its header deadline."""
        super().connection_made(transport)
        self._socket = transport
        self.transport = self._out = _ClosedThroughProtocol(transport, self)
        if len(self.connections) > self.limits.max_connections and not self._make_room():
            retry_after = str(self.limits.retry_after_seconds).encode()
            self._answer_and_close(
                503, "too many connections, retry later", [(b"retry-after", retry_after)]
            )
            return
        self._enter(_Phase.AWAITING_HEADERS)

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection and its deadline."""
        self.closing = True
        self._cancel_deadline()
        self.awaiting.pop(self, None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Feed the parser, counting header bytes as they come; then set the deadline of
        the phase the request is in."""
        if self.closing:
            self._linger_over(data)
            return
        self._unset_keepalive_if_required()
        counting = not self._parsing_body
        if counting:
            self._header_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError:
            if self.closing:  # a callback of ours answered, then stopped the parser
                return
            message = "Invalid HTTP request received."
            self.logger.warning(message)
            self.send_400_response(message)
            return
        # Still in the headers: what was fed since they began is header bytes (give or take
        # the end of a pipelined previous body, which only errs towards the limit).
        in_headers = counting and not self._parsing_body
        if in_headers and self._header_bytes > self.limits.max_header_bytes:
            self._refuse_headers()
            return
        self._update_phase()

    def on_message_begin(self) -> None:
        """A request starts."""
        super().on_message_begin()
        self._message_begun = True

    def on_headers_complete(self) -> None:
        """Check the header block's size, then hand the request on as uvicorn does."""
        size = len(self.url) + sum(
            len(name) + len(value) + _HEADER_LINE_OVERHEAD for name, value in self.headers
        )
        if size > self.limits.max_header_bytes:
            self._refuse_headers()
            raise _Refused
        self._parsing_body = True
        previous = self.cycle
        super().on_headers_complete()
        if self.cycle is not previous:
            # Until the body is in, a response says `connection: close`, and the connection
            # is closed after it: reading the rest of the body would only be to drop it.
            self._keep_alive = self.cycle.keep_alive
            self.cycle.keep_alive = False

    def on_message_complete(self) -> None:
        """The whole request is in; the next one's header bytes count from zero."""
        super().on_message_complete()
        self._parsing_body = False
        self._message_begun = False
        self._header_bytes = 0
        if self.cycle is not None and not self.cycle.response_started:
            self.cycle.keep_alive = self._keep_alive and not self._shutting_down

    def on_response_complete(self) -> None:
        """Wait for the next request's headers."""
        super().on_response_complete()
        self._update_phase()

    def shutdown(self) -> None:
        """Close when idle, or after the response in progress (as uvicorn does)."""
        self._shutting_down = True
        super().shutdown()

    def close_connection(self) -> None:
        """Close the connection; while a request is partly received, linger first."""
        self._close(linger=self._message_begun)

    def _update_phase(self) -> None:
        if self.closing:
            return
        if self._parsing_body:
            self._enter(_Phase.RECEIVING_BODY)
        elif self.cycle is not None and not self.cycle.response_complete:
            self._enter(_Phase.ANSWERING)
        else:
            self._enter(_Phase.AWAITING_HEADERS)

    def _enter(self, phase: _Phase) -> None:
        if phase is self._phase:
            return
        self._phase = phase
        self._cancel_deadline()
        if phase is _Phase.AWAITING_HEADERS:
            self.awaiting[self] = None
            self._arm(self.limits.header_timeout_seconds, self._headers_too_late)
            return
        self.awaiting.pop(self, None)
        if phase is _Phase.RECEIVING_BODY:
            self._arm(self.limits.body_timeout_seconds, self._body_too_late)

    def _arm(self, seconds: float, callback: Callable[[], None]) -> None:
        self._deadline = self.loop.call_later(seconds, callback)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _make_room(self) -> bool:
        """Close the connection that has awaited a request's headers longest; False when
        every other connection has a request in progress."""
        oldest = next(iter(self.awaiting), None)
        if oldest is None:
            return False
        oldest.close_connection()
        return True

    def _headers_too_late(self) -> None:
        self._deadline = None
        if self._message_begun:
            self._answer_and_close(408, "request headers not received in time")
        else:
            self._close(linger=False)

    def _body_too_late(self) -> None:
        self._deadline = None
        if self.cycle is not None and not self.cycle.response_started:
            self._answer_and_close(408, "request body not received in time")
        else:
            self.close_connection()

    def _refuse_headers(self) -> None:
        limit = self.limits.max_header_bytes
        self._answer_and_close(431, f"request headers are larger than the limit of {limit} bytes")

    def _answer_and_close(
        self, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        """Write a JSON error straight to the socket and close: an app that has the request
        finds the client gone, and whatever it sends goes nowhere."""
        body = json.dumps({"detail": detail}).encode()
        lines = [
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n".encode(),
            *(name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers),
            *(name + b": " + value + b"\r\n" for name, value in headers or []),
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n",
            b"connection: close\r\n\r\n",
            body,
        ]
        self._out.write(b"".join(lines))
        self._close(linger=True)

    def _close(self, *, linger: bool) -> None:
        self._out.flush()
        self.closing = True
        self._cancel_deadline()
        self.awaiting.pop(self, None)
        if self.cycle is not None and not self.cycle.response_complete:
            # What connection_lost will do, done now so nothing the app sends is written.
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        if self._socket.is_closing():
            return
        if not linger or not self._socket.can_write_eof():
            self._socket.close()
            return
        self._socket.write_eof()
        self.flow.resume_reading()
        self._deadline = self.loop.call_later(_LINGER_SECONDS, self._socket.close)

    def _linger_over(self, data: bytes) -> None:
        """Drop what arrives after the answer; close once it is more than a little."""
        self._lingered_bytes += len(data)
        if self._lingered_bytes > _LINGER_BYTES:
            self._cancel_deadline()
            self._socket.close()


def http_protocol(limits: ConnectionLimits) -> type[LimitedHttpProtocol]:
    """The protocol class for one server (uvicorn's `http=`), held to limits."""
    return type("LimitedHttpProtocol", (LimitedHttpProtocol,), {"limits": limits, "awaiting": {}})
