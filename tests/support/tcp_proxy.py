"""A TCP proxy the tests control, to cut the service off from PostgreSQL or RabbitMQ.

Cutting it closes every open connection and refuses new ones, which is what the service
sees when a server dies or the network drops, while the machine's shared servers keep
running for everyone else.
"""

import asyncio
import contextlib
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit

from tests.support.services import with_nodes


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target; `cut()` and `restore()` toggle it.

    `latency` delays every chunk the target sends back by that many seconds, as a slow
    link would: chunks still arrive in order, each `latency` after it was sent.

    `fatal`, when set, drops any connection on which the target sends those bytes, before
    they reach the client: a stand-in for a message that makes its consumer fail.
    """

    def __init__(self, target_host: str, target_port: int, latency: float = 0.0) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.latency = latency
        self.fatal: bytes | None = None
        self.dropped = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @classmethod
    def for_url(cls, url: str, latency: float = 0.0) -> "TcpProxy":
        """A proxy to the host and port of a service URL."""
        parts = urlsplit(url)
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"no host and port in {url!r}")
        return cls(parts.hostname, parts.port, latency)

    @property
    def address(self) -> str:
        """Where the proxy listens, as `host:port` (a node of a multi-node AMQP_URL, say)."""
        return f"127.0.0.1:{self.port}"

    def url_through(self, url: str) -> str:
        """The same URL, pointed at this proxy."""
        return with_nodes(url, self.address)

    async def start(self) -> None:
        """Listen (on the same port as before, after a cut)."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Stop listening and drop every proxied connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self.drop_connections()
        for pipe in list(self._pipes):
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    def drop_connections(self) -> None:
        """Drop every proxied connection, still taking new ones: a server that lost its
        clients (a restart, a partition it came back from) and answers again."""
        for writer in list(self._writers):
            writer.transport.abort()

    async def restore(self) -> None:
        """Accept connections again on the same port."""
        await self.start()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.cut()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        pipes = (
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer, self.latency, downstream=True)),
        )
        self._pipes.update(pipes)
        try:
            await asyncio.gather(*pipes, return_exceptions=True)
        finally:
            self._pipes.difference_update(pipes)
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        latency: float = 0.0,
        downstream: bool = False,
    ) -> None:
        loop = asyncio.get_running_loop()
        # (due time, chunk); an empty chunk marks the end of the stream.
        in_flight: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            with contextlib.suppress(OSError):
                while (item := await in_flight.get())[1]:
                    await asyncio.sleep(max(0.0, item[0] - loop.time()))
                    writer.write(item[1])
                    await writer.drain()

        delivering = asyncio.create_task(deliver())
        # The end of the previous chunk, so that fatal bytes split across chunks are found.
        tail = b""
        try:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await reader.read(65536):
                    fatal = self.fatal if downstream else None
                    if fatal is not None:
                        if fatal in tail + data:
                            # Dropped at once, with whatever was still on its way: the finally
                            # below aborts the client's side, _accept the target's.
                            self.dropped += 1
                            return
                        tail = (tail + data)[-len(fatal) :]
                    in_flight.put_nowait((loop.time() + latency, data))
            in_flight.put_nowait((loop.time(), b""))
            await delivering
        finally:
            delivering.cancel()
            # One direction ended: end the other too, as a real peer would.
            writer.transport.abort()
