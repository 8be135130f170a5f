"""Connecting to RabbitMQ the same way on both sides, to one of the nodes AMQP_URL lists.

AMQP_URL may name several nodes of a cluster, `amqp://user:pass@h1:5672,h2:5672/vhost`, all
with the same credentials, vhost and options. Clients (aiormq, aio-pika, the api's own) take
one host, so every connection is made to one node's URL (`broker_nodes`). The first goes to
the first node written; each later attempt, after a failure or a loss, to a node picked at
random among the others (`BrokerNodes`): a node that died is not tried again first, and the
processes that lost it spread over the rest instead of all moving to the same next node.
"""

import asyncio
import logging
import random
import ssl
from collections.abc import Awaitable, Callable, Collection
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit, urlunsplit

from aio_pika import RobustConnection
from aio_pika.abc import AbstractRobustConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from yarl import URL

from shared import field_tables
from shared.settings import Settings

log = logging.getLogger(__name__)

RECONNECT_INTERVAL_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 5.0
DEFAULT_PORTS: Final = {"amqp": 5672, "amqps": 5671}
_MAX_PORT: Final = 65535

T = TypeVar("T")


def broker_nodes(url: str) -> list[str]:
    """One single-host URL per node of an AMQP URL, in the order written, each with its port.

    Raises ValueError, saying what is wrong, for a scheme other than amqp:// or amqps://, a
    node without a host, or a port that is not a number from 1 to 65535.
    """
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # an unbalanced [ or ]
        raise ValueError(f"AMQP_URL cannot be read: {exc}") from None
    if parts.scheme not in DEFAULT_PORTS:
        raise ValueError(
            f"AMQP_URL must start with amqp:// or amqps://, not {parts.scheme or 'nothing'}://"
        )
    credentials, at, hosts = parts.netloc.rpartition("@")
    nodes = []
    for written in hosts.split(","):
        host, port = _host_and_port(written.strip(), DEFAULT_PORTS[parts.scheme])
        netloc = f"{credentials}{at}{host}:{port}"
        nodes.append(urlunsplit(parts._replace(netloc=netloc)))
    return nodes


def _host_and_port(written: str, default_port: int) -> tuple[str, int]:
    """A node as AMQP_URL lists it, `host`, `host:port`, `[v6]` or `[v6]:port`."""
    if written.startswith("["):
        address, bracket, rest = written[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"AMQP_URL lists a node it cannot read: {written!r}")
        host, port_text = f"[{address}]" if address else "", rest[1:]
    else:
        host, _, port_text = written.partition(":")
    if not host:
        raise ValueError(
            f"AMQP_URL lists a node with no host: {written!r} (nodes are host:port, "
            "separated by commas)"
        )
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) <= _MAX_PORT:
        raise ValueError(
            f"AMQP_URL has an invalid port for node {written!r}: a number from 1 to {_MAX_PORT}"
        )
    return host, int(port_text)


def node_address(node_url: str) -> str:
    """`host:port` of a single-host URL that broker_nodes gave."""
    return urlsplit(node_url).netloc.rpartition("@")[2]


class BrokerNodes:
    """The nodes of an AMQP URL and which to try next: the first written, then, after each
    attempt, one picked at random among the others."""

    def __init__(self, url: str, rng: random.Random | None = None) -> None:
        self.urls: Final = broker_nodes(url)
        self._rng = rng if rng is not None else random.Random()
        self._last: int | None = None
        self._address: str | None = None

    @property
    def address(self) -> str | None:
        """`host:port` of the node last taken (connected to, or being tried); None before."""
        return self._address

    def take(self, avoid: Collection[str] = ()) -> str:
        """The URL of the node to try next: the first node written if none was taken yet,
        else one at random among the others than the last taken (that one only if it is
        alone), passing over those whose `host:port` is in avoid (the node another connection
        of the process uses, or one already tried) while one is left."""
        everyone = range(len(self.urls))
        if self._last is None and node_address(self.urls[0]) not in avoid:
            chosen = 0
        else:
            others = [i for i in everyone if i != self._last] or list(everyone)
            wanted = [i for i in others if node_address(self.urls[i]) not in avoid]
            chosen = self._rng.choice(wanted or others)
        self._last = chosen
        self._address = node_address(self.urls[chosen])
        return self.urls[chosen]


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """How every broker connection does TLS: None for amqp://; for amqps://, the broker's
    certificate checked against AMQP_CA_FILE (else the system's CAs) and its host name, and
    AMQP_CERT_FILE (with AMQP_KEY_FILE) shown if the broker asks for a client certificate."""
    if not settings.amqp_url.startswith("amqps://"):
        return None
    try:
        context = ssl.create_default_context(cafile=settings.amqp_ca_file)
    except ssl.SSLError as exc:
        raise ValueError(f"AMQP_CA_FILE holds no usable CA certificate: {exc}") from exc
    if settings.amqp_cert_file is not None:
        try:
            context.load_cert_chain(settings.amqp_cert_file, settings.amqp_key_file)
        except ssl.SSLError as exc:
            raise ValueError(
                f"AMQP_CERT_FILE and AMQP_KEY_FILE hold no usable certificate and key: {exc}"
            ) from exc
    return context


async def retry_until_connected(
    connect: Callable[[str], Awaitable[T]],
    errors: tuple[type[BaseException], ...],
    nodes: BrokerNodes,
    avoid: Callable[[], Collection[str]] = tuple,
) -> T:
    """Call connect with the next node's URL (BrokerNodes.take, avoiding what avoid() names)
    until it returns, backing off from 0.1 s to MAX_BACKOFF_SECONDS while it raises one of
    errors (that node is not reachable)."""
    delay = 0.1
    while True:
        url = nodes.take(avoid())
        try:
            return await connect(url)
        except errors as exc:
            log.warning(
                "broker node %s not reachable (%s); trying %s in %.1fs",
                nodes.address,
                exc,
                "again" if len(nodes.urls) == 1 else "the next node",
                delay,
            )
        await asyncio.sleep(delay)
        delay = min(delay * 2, MAX_BACKOFF_SECONDS)


async def connect_to_a_node(
    connect: Callable[[str], Awaitable[T]],
    errors: tuple[type[BaseException], ...],
    nodes: BrokerNodes,
) -> T:
    """Call connect with each node's URL once (the first written first) until one returns;
    if every node raised one of errors, raise the last node's error. For one-off commands,
    which do not wait."""
    tried: set[str] = set()
    for remaining in range(len(nodes.urls) - 1, -1, -1):
        url = nodes.take(tried)
        try:
            return await connect(url)
        except errors as exc:
            if not remaining:
                raise
            tried.add(node_address(url))
            log.warning("broker node %s not reachable (%s); trying the next", nodes.address, exc)
    raise AssertionError("broker_nodes always gives at least one node")


class _NodeRotatingConnection(RobustConnection):
    """aio-pika's robust connection, whose every reconnect attempt goes to another node.

    aio-pika reconnects to the URL it was made with. The one step each attempt runs,
    RobustConnection's private `__connect_transport`, is wrapped to point the connection at
    another node first: only the first attempt, which `connect_until_ready` made, keeps
    the node it was given.
    """

    def __init__(self, nodes: BrokerNodes, url: str, **kwargs: Any) -> None:
        attempt = getattr(RobustConnection, _CONNECT_TRANSPORT, None)
        if not asyncio.iscoroutinefunction(attempt):
            raise RuntimeError("aio-pika changed: RobustConnection.__connect_transport is gone")
        super().__init__(URL(url), **kwargs)
        self._attempt: Callable[[RobustConnection], Awaitable[None]] = attempt
        self._nodes = nodes
        self._attempts = 0

    async def _attempt_on_the_next_node(self) -> None:
        if self._attempts:
            self.url = URL(self._nodes.take())
            log.warning("broker connection reconnecting, to node %s", self._nodes.address)
        self._attempts += 1
        await self._attempt(self)

    _RobustConnection__connect_transport = _attempt_on_the_next_node


_CONNECT_TRANSPORT: Final = "_RobustConnection__connect_transport"


async def connect_until_ready(
    url: str, connection_name: str, attempt_seconds: float, tls: ssl.SSLContext | None = None
) -> AbstractRobustConnection:
    """A robust connection to one of url's nodes, retrying with backoff until one answers.

    Once made, the connection reconnects by itself, each attempt to another node, and
    restores its channels, exchanges, queues and consumers. Whatever headers a delivered
    message carries, decoding them cannot fail the connection (shared/field_tables.py).
    """
    field_tables.install()
    nodes = BrokerNodes(url)

    async def connect(node_url: str) -> AbstractRobustConnection:
        connection = _NodeRotatingConnection(
            nodes,
            node_url,
            reconnect_interval=RECONNECT_INTERVAL_SECONDS,
            client_properties={"connection_name": connection_name},
            ssl_context=tls,
        )
        await connection.connect(timeout=attempt_seconds)
        return connection

    return await retry_until_connected(connect, CONNECTION_EXCEPTIONS, nodes)
