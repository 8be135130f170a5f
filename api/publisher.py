"""Publishing scores with publisher confirms: a score is ours only once the broker said so.

The api publishes to exchange `scores.api`, which only its broker user may write to: the
worker stores what comes through it without validating it again (README, "Trust model").
Each project's scores go to one shard's queue (shared/topology.py, README "Sharded queues").
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from functools import partial
from typing import Any

from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from pydantic_core import to_json

from api.amqp import (
    ConfirmingPublisher,
    MessageProperties,
    PublishFailed,
    UnsupportedBrokerUrl,
    parse_amqp_url,
)
from api.errors import BrokerUnavailable
from api.metrics import PUBLISH_CONFIRM_SECONDS, PUBLISH_FAILURES, SCORES_ACCEPTED
from shared.broker import (
    MAX_BACKOFF_SECONDS,
    BrokerNodes,
    broker_nodes,
    retry_until_connected,
    tls_context,
)
from shared.contract import (
    BATCH_MESSAGE_TYPE,
    CONTENT_TYPE,
    MAX_BATCH_SCORES,
    MESSAGE_TYPE,
)
from shared.ids import new_score_id
from shared.settings import Settings
from shared.topology import (
    API_EXCHANGE,
    ROUTING_KEY,
    declare_topology_once,
    shard_of,
    shard_routing_key,
)
from shared.tracing import current_traceparent, trace_headers

log = logging.getLogger(__name__)

APP_ID = "score-ingest"
SCORE_PROPERTIES = MessageProperties(CONTENT_TYPE, MESSAGE_TYPE, APP_ID)
BATCH_PROPERTIES = MessageProperties(CONTENT_TYPE, BATCH_MESSAGE_TYPE, APP_ID)
# What a connect attempt raises while the broker is down or still starting.
_UNREACHABLE = (OSError, TimeoutError, PublishFailed, *CONNECTION_EXCEPTIONS)
# A connection whose publishes are nacked, and that has confirmed nothing for STUCK_SECONDS
# (since it opened, or since its last confirm), is replaced by one to another node. On
# RabbitMQ 3.10, while the node leading scores.persist is cut off from the others, a channel
# whose first publish comes before the others have noticed (net_ticktime: 15-25 s with 20 s,
# 45-75 s with the default 60 s) is never told of the next leader: its publishes go
# unconfirmed until then, and are nacked from then on until the partition heals, while a new
# channel is confirmed at once. STUCK_SECONDS keeps a full queue, which nacks every publish
# (x-overflow reject-publish), to one reconnect per that many seconds.
STUCK_SECONDS = 3.0
# With several nodes the publisher keeps two connections, to two nodes, and takes them in
# turn, so that both have published (a channel that has is told of a new leader as soon as
# the majority elects one, a new one only once the majority notices the cut: see above).
# A connection whose oldest unconfirmed publish has waited STALLED_SECONDS, or that has not
# confirmed its first one yet, is stalled: while the other is not, publishes go there only.
# One stalled for PUBLISH_TIMEOUT_SECONDS while the other confirms is replaced by one to a
# third node: its node may be cut off, and it is no standby there.
STALLED_SECONDS = 1.0
LINKS = 2

# The fields of a ScoreMessage, as the api builds them (see api.service.score_message).
MessageFields = dict[str, Any]
# A score as it travels: its id (a lone score's message_id) and its JSON.
_Encoded = tuple[str, bytes]


class _Gathered:
    """Single scores for one routing key, gathered in one turn of the event loop."""

    def __init__(self) -> None:
        self.scores: list[tuple[_Encoded, asyncio.Future[None]]] = []
        self.bytes = 0  # of their JSON, commas and batch framing not counted
        self.traces: list[str] = []  # their requests' traceparents, when traced


# A batch body is these around the scores' JSON, joined by commas: what to_json gives too.
_BATCH_OPENING, _BATCH_CLOSING = b'{"scores":[', b"]}"


class _Link:
    """One of the publisher's connections, to one node, and what is known of its confirms."""

    def __init__(self, url: str, name: str) -> None:
        self.name = name
        self.nodes = BrokerNodes(url)
        self.connection: ConfirmingPublisher | None = None
        # When the connection opened or last confirmed a publish (time.perf_counter).
        self.confirmed_at = 0.0
        # Whether it has confirmed a publish since it opened.
        self.proven = False
        # Resolved, with why, when the connection must be replaced.
        self.leave: asyncio.Future[str] | None = None
        self.keeping: asyncio.Task[None] | None = None

    @property
    def usable(self) -> bool:
        """Open and not blocked: a publish could be confirmed."""
        connection = self.connection
        return connection is not None and connection.is_open and not connection.blocked

    @property
    def flowing(self) -> bool:
        """Whether its publishes are being confirmed: none has waited STALLED_SECONDS, and
        the first it took since it opened, if any, is confirmed (its channel may be stuck)."""
        connection = self.connection
        if connection is None or not connection.unconfirmed:
            return True
        return self.proven and connection.waiting_seconds < STALLED_SECONDS

    @property
    def waiting_seconds(self) -> float:
        """How long its oldest unconfirmed publish has waited (0 if none)."""
        return 0.0 if self.connection is None else self.connection.waiting_seconds

    def replace(self, why: str) -> None:
        """Have the connection replaced, by one to another node."""
        if self.leave is not None and not self.leave.done():
            self.leave.set_result(why)


class ScorePublisher:
    """Keeps confirming connections to broker nodes, reconnecting whenever one is lost.

    Many requests publish at once; each waits only for its own confirm. Until a connection is
    up, and while the broker blocks publishers, publishes fail at once (503). With one node,
    one connection; with several, two, to two nodes, taken in turn (LINKS, STALLED_SECONDS):
    when one stalls (its node cut off, say) the other takes every publish. Each connection
    goes to the first node written (the second to another), and after a loss to a node at
    random among the others, not the other connection's (shared/broker.py). A publish is made
    on one connection and fails with it, so none is sent again on another. A connection whose
    publishes are nacked while it has confirmed nothing for STUCK_SECONDS is replaced too:
    after a partition it can be stuck.
    """

    def __init__(self, settings: Settings) -> None:
        # An AMQP_URL the publisher cannot follow, or TLS files it cannot use, stop the api
        # at start-up.
        try:
            nodes = broker_nodes(settings.amqp_url)
        except ValueError as exc:
            raise UnsupportedBrokerUrl(str(exc)) from None
        for node_url in nodes:
            parse_amqp_url(node_url)
        self._tls = tls_context(settings)
        self._settings = settings
        self._links = [
            _Link(settings.amqp_url, name) for name in ("", " (standby)")[: min(LINKS, len(nodes))]
        ]
        self._turn = 0
        self._connected = asyncio.Event()
        # By routing key: a message goes to one shard, so gathering is per shard.
        self._gathered: dict[str, _Gathered] = {}

    def start(self) -> None:
        """Begin connecting in the background; until connected, publishes answer 503."""
        for link in self._links:
            link.keeping = asyncio.create_task(self._keep_connected(link))

    async def wait_ready(self) -> None:
        """Wait until connected."""
        await self._connected.wait()

    @property
    def ready(self) -> bool:
        """Whether a publish could be confirmed right now: connected and not blocked."""
        return any(link.usable for link in self._links)

    @property
    def broker(self) -> dict[str, str | bool | None]:
        """For /readyz: the node (`host:port`) connected to (the first connection's, else the
        standby's), or being tried, and whether the connection is open."""
        links = self._links
        link = next((each for each in links if _is_open(each.connection)), links[0])
        return {"node": link.nodes.address, "connected": _is_open(link.connection)}

    async def _keep_connected(self, link: _Link) -> None:
        declare = True
        while True:
            try:
                connection = await retry_until_connected(
                    partial(self._connect, declare=declare),
                    _UNREACHABLE,
                    link.nodes,
                    partial(self._other_nodes, link),
                )
            except Exception:
                # Typically PRECONDITION_FAILED: scores.persist exists with other arguments.
                log.exception("publisher cannot set up the broker topology")
                await asyncio.sleep(MAX_BACKOFF_SECONDS)
                continue
            link.connection, link.confirmed_at, link.proven = connection, time.perf_counter(), False
            leave = link.leave = asyncio.get_running_loop().create_future()
            self._connected.set()
            node = link.nodes.address
            log.info("publisher connected to broker node %s%s", node, link.name)
            await asyncio.wait((connection.closed, leave), return_when=asyncio.FIRST_COMPLETED)
            if not self.ready:
                self._connected.clear()
            # A stuck connection's publishes reached the queue: the topology is there, and
            # declaring it again could wait as long as a partition lasts.
            declare = connection.closed.done()
            if declare:
                log.warning("publisher lost broker node %s%s; reconnecting", node, link.name)
            else:
                log.warning(
                    "publisher leaves broker node %s%s, stuck (%s); connecting to another node",
                    node,
                    link.name,
                    leave.result(),
                )
                await connection.close()

    def _other_nodes(self, link: _Link) -> list[str]:
        """The nodes the publisher's other connections use, for link to avoid."""
        return [
            other.nodes.address
            for other in self._links
            if other is not link and other.nodes.address is not None
        ]

    async def _connect(self, node_url: str, *, declare: bool) -> ConfirmingPublisher:
        settings = self._settings
        # Connected first, so that a broker that cannot be reached, trusted or logged in to
        # is reported by our client, which says why.
        connection = await ConfirmingPublisher.connect(
            node_url,
            connection_name="score-ingest-api",
            connect_timeout=settings.publish_timeout_seconds,
            publish_timeout=settings.publish_timeout_seconds,
            tls=self._tls,
        )
        # The topology is declared on each (re)connect but a stuck connection's replacement,
        # through a short aio-pika connection to the same node: declaring is rare, and it
        # keeps one definition of the topology for every process.
        if not declare:
            return connection
        try:
            await declare_topology_once(settings, settings.publish_timeout_seconds, node_url)
        except BaseException:
            connection.abort()
            raise
        return connection

    async def publish_scores(self, messages: Sequence[MessageFields]) -> None:
        """Publish scores and wait for the broker's confirm; raises BrokerUnavailable.

        A batch request's scores go as one `score.batch.v1` message, so the broker accepts
        or refuses them as a whole, unless that message would be larger than
        BROKER_MAX_MESSAGE_BYTES: then they go as several, and the request succeeds once
        every one is confirmed. Single scores published in the same turn of the event loop
        (requests that arrived together) also travel as one message, like a group commit,
        as many as fit under the same limit: each request still answers only after the
        confirm of the message holding its score, and no request waits for others to arrive.
        A message holds one project's scores or, gathered, those of projects of one shard.
        """
        try:
            if len(messages) == 1:
                outcome: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._gather(messages[0], outcome)
                await outcome
            else:
                await _all_confirmed(self._publish_batch(messages))
        except PublishFailed as exc:
            raise BrokerUnavailable(str(exc)) from exc
        SCORES_ACCEPTED.inc(len(messages))

    def _routing_key(self, score: MessageFields) -> str:
        """Where a score goes on `scores.api`: its shard's key, or `score.create` unsharded."""
        shards = self._settings.queue_shards
        if not shards:
            return ROUTING_KEY
        return shard_routing_key(shard_of(score["entity"], score["project"], shards))

    def _gather(self, score: MessageFields, outcome: asyncio.Future[None]) -> None:
        body = to_json(score)
        routing_key = self._routing_key(score)
        gathered = self._gathered.get(routing_key)
        if gathered is not None and (
            len(gathered.scores) >= MAX_BATCH_SCORES
            or _batch_bytes(gathered.bytes + len(body), len(gathered.scores) + 1)
            > self._settings.broker_max_message_bytes
        ):
            self._publish_gathered(routing_key, gathered)  # full: this score starts the next
            gathered = None
        if gathered is None:
            gathered = self._gathered[routing_key] = _Gathered()
            asyncio.get_running_loop().call_soon(self._publish_gathered, routing_key, gathered)
        gathered.scores.append(((str(score["score_id"]), body), outcome))
        gathered.bytes += len(body)
        if (traceparent := current_traceparent.get()) is not None:
            gathered.traces.append(traceparent)

    def _publish_gathered(self, routing_key: str, gathered: _Gathered) -> None:
        """Publish what was gathered for routing_key, unless published already (full)."""
        if self._gathered.get(routing_key) is not gathered:
            return
        del self._gathered[routing_key]
        scores = [score for score, _ in gathered.scores]
        outcomes = [outcome for _, outcome in gathered.scores]
        self._publish(scores, outcomes, gathered.traces, routing_key)

    def _publish_batch(self, scores: Sequence[MessageFields]) -> list[asyncio.Future[None]]:
        """Publish a batch request's scores; returns the outcome of each message they took."""
        loop = asyncio.get_running_loop()
        limit = self._settings.broker_max_message_bytes
        # A batch request's scores share their entity and project, so their shard.
        routing_key = self._routing_key(scores[0])
        body = to_json({"scores": scores})
        traceparent = current_traceparent.get()
        traces = [] if traceparent is None else [traceparent]
        if len(body) <= limit:
            outcome: asyncio.Future[None] = loop.create_future()
            self._send(body, BATCH_PROPERTIES, str(new_score_id()), [outcome], traces, routing_key)
            return [outcome]
        # Larger than the broker takes: the scores go in several messages, so a failure can
        # leave some stored (README: retry with an Idempotency-Key).
        encoded = [(str(score["score_id"]), to_json(score)) for score in scores]
        outcomes = []
        for part in _parts(encoded, limit):
            outcomes.append(loop.create_future())
            self._publish(part, outcomes[-1:], traces, routing_key)
        return outcomes

    def _publish(
        self,
        scores: list[_Encoded],
        outcomes: list[asyncio.Future[None]],
        traces: list[str],
        routing_key: str,
    ) -> None:
        if len(scores) == 1:
            (message_id, body), properties = scores[0], SCORE_PROPERTIES
        else:
            body = _BATCH_OPENING + b",".join(body for _, body in scores) + _BATCH_CLOSING
            properties, message_id = BATCH_PROPERTIES, str(new_score_id())
        self._send(body, properties, message_id, outcomes, traces, routing_key)

    def _send(
        self,
        body: bytes,
        properties: MessageProperties,
        message_id: str,
        outcomes: list[asyncio.Future[None]],
        traces: list[str],
        routing_key: str,
    ) -> None:
        started = time.perf_counter()
        link = self._link_to_publish_on()
        try:
            if link is None or link.connection is None:
                raise PublishFailed("unavailable", "not connected to the message broker")
            confirm = link.connection.publish(
                API_EXCHANGE,
                routing_key,
                body,
                properties,
                message_id=message_id,
                timestamp=datetime.now(UTC),
                headers=trace_headers(traces),
            )
        except PublishFailed as exc:
            confirm = asyncio.get_running_loop().create_future()
            confirm.set_exception(exc)
        confirm.add_done_callback(partial(self._pass_on, link, outcomes, started))

    def _link_to_publish_on(self) -> _Link | None:
        """The next usable connection in turn, passing stalled ones over while another is
        not; a connection stalled for PUBLISH_TIMEOUT_SECONDS while another is not is left."""
        usable = [link for link in self._links if link.usable]
        flowing = [link for link in usable if link.flowing]
        if flowing:
            timeout = self._settings.publish_timeout_seconds
            for link in usable:
                if (waited := link.waiting_seconds) >= timeout:
                    link.replace(
                        f"publishes unconfirmed for {waited:.0f} s while "
                        f"{flowing[0].nodes.address} confirms"
                    )
        candidates = flowing or usable
        if not candidates:
            return None
        self._turn += 1
        return candidates[self._turn % len(candidates)]

    def _pass_on(
        self,
        link: _Link | None,
        outcomes: list[asyncio.Future[None]],
        started: float,
        confirm: asyncio.Future[None],
    ) -> None:
        """Hand a message's confirm (or its failure) to every request whose score it holds."""
        error = (
            PublishFailed("unavailable", "the publish was cancelled")
            if confirm.cancelled()
            else confirm.exception()
        )
        if error is None:
            now = time.perf_counter()
            if link is not None:
                link.confirmed_at, link.proven = now, True
            PUBLISH_CONFIRM_SECONDS.observe(now - started)
        else:
            reason = getattr(error, "reason", "unavailable")
            PUBLISH_FAILURES.labels(reason).inc()
            if reason == "refused" and link is not None:
                _check_stuck(link)
        for outcome in outcomes:
            if outcome.done():  # its request is gone (the client disconnected)
                continue
            if error is None:
                outcome.set_result(None)
            else:
                outcome.set_exception(error)

    async def close(self) -> None:
        """Stop reconnecting and close the connections."""
        for link in self._links:
            if link.keeping is not None:
                link.keeping.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await link.keeping
        for link in self._links:
            if link.connection is not None:
                await link.connection.close()


def _is_open(connection: ConfirmingPublisher | None) -> bool:
    return connection is not None and connection.is_open


def _check_stuck(link: _Link) -> None:
    """After a nack: have the link's connection replaced if it has confirmed nothing for
    STUCK_SECONDS."""
    quiet = time.perf_counter() - link.confirmed_at
    if quiet >= STUCK_SECONDS:
        link.replace(f"publishes nacked, nothing confirmed for {quiet:.0f} s")


def _batch_bytes(scores_bytes: int, count: int) -> int:
    """The size of a message holding count scores of scores_bytes of JSON in all."""
    if count == 1:
        return scores_bytes  # a lone score travels as a score.create.v1 message
    return len(_BATCH_OPENING) + scores_bytes + count - 1 + len(_BATCH_CLOSING)


def _parts(encoded: list[_Encoded], limit: int) -> Iterator[list[_Encoded]]:
    """The scores in order, cut into runs whose message stays within limit bytes.

    A lone score always fits: settings require the limit to hold the largest one.
    """
    part: list[_Encoded] = []
    size = 0
    for score in encoded:
        if part and _batch_bytes(size + len(score[1]), len(part) + 1) > limit:
            yield part
            part, size = [], 0
        part.append(score)
        size += len(score[1])
    if part:
        yield part


async def _all_confirmed(outcomes: list[asyncio.Future[None]]) -> None:
    """Wait for every message of a request; the first failure, if any, is the request's."""
    results = await asyncio.gather(*outcomes, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
