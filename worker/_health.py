"""A small HTTP server on the worker: /healthz, /readyz and /metrics for orchestrators."""

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

_MAX_REQUEST_LINE = 8192


class HealthServer:
    """Answers GET /healthz (alive), /readyz (ready() is true) and /metrics; nothing else.

    /readyz's JSON body adds what details() gives (for people) to its status.
    """

    def __init__(
        self,
        host: str,
        port: int,
        ready: Callable[[], Awaitable[bool]],
        details: Callable[[], Mapping[str, object]],
    ) -> None:
        self._host = host
        self._requested_port = port
        self._ready = ready
        self._details = details
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The port listened on (useful when asked for port 0)."""
        assert self._server is not None, "start() first"
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        """Start listening."""
        self._server = await asyncio.start_server(self._serve, self._host, self._requested_port)

    async def close(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), timeout=5)
            while (await asyncio.wait_for(reader.readline(), timeout=5)) not in (
                b"\r\n",
                b"\n",
                b"",
            ):
                pass  # headers are not needed
            status, content_type, body = await self._answer(request_line[:_MAX_REQUEST_LINE])
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(self, request_line: bytes) -> tuple[str, str, bytes]:
        parts = request_line.decode("latin-1").split()
        path = parts[1].partition("?")[0] if len(parts) >= 2 and parts[0] == "GET" else None
        if path == "/healthz":
            return "200 OK", "application/json", b'{"status":"ok"}'
        if path == "/readyz":
            ready = await self._ready()
            body = {"status": "ready" if ready else "not ready", **self._details()}
            status = "200 OK" if ready else "503 Service Unavailable"
            return status, "application/json", json.dumps(body).encode()
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest()
        return "404 Not Found", "application/json", b'{"detail":"not found"}'
