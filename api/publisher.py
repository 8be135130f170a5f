"""Publishing scores with publisher confirms: a score is ours only once the broker said so.

The api publishes to exchange `scores.api`, which only its broker user may write to: the
worker stores what comes through it without validating it again (README, "Trust model").
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
from shared.broker import MAX_BACKOFF_SECONDS, BrokerNodes, retry_until_connected, tls_context
from shared.contract import (
    BATCH_MESSAGE_TYPE,
    CONTENT_TYPE,
    MAX_BATCH_SCORES,
    MESSAGE_TYPE,
)
from shared.ids import new_score_id
from shared.settings import Settings
from shared.topology import API_EXCHANGE, ROUTING_KEY, declare_topology_once

log = logging.getLogger(__name__)

APP_ID = "score-ingest"
SCORE_PROPERTIES = MessageProperties(CONTENT_TYPE, MESSAGE_TYPE, APP_ID)
BATCH_PROPERTIES = MessageProperties(CONTENT_TYPE, BATCH_MESSAGE_TYPE, APP_ID)
# What a connect attempt raises while the broker is down or still starting.
_UNREACHABLE = (OSError, TimeoutError, PublishFailed, *CONNECTION_EXCEPTIONS)
# A connection whose publishes are nacked, and that has confirmed nothing for STUCK_SECONDS
# (since it opened, or since its last confirm), is replaced by one to the next node. On
# RabbitMQ 3.10, while the node leading scores.persist is cut off from the others, a channel
# whose first publish comes before the others have noticed (net_ticktime: 15-25 s with 20 s,
# 45-75 s with the default 60 s) is never told of the next leader: its publishes go
# unconfirmed until then, and are nacked from then on until the partition heals, while a new
# channel is confirmed at once. (A connection to a node cut off from the others is left to
# itself: it closes when the node pauses, at about the same time.) STUCK_SECONDS keeps a full
# queue, which nacks every publish (x-overflow reject-publish), to one reconnect per that
# many seconds.
STUCK_SECONDS = 3.0

# The fields of a ScoreMessage, as the api builds them (see api.service.score_message).
MessageFields = dict[str, Any]
# A score as it travels: its id (a lone score's message_id) and its JSON.
_Encoded = tuple[str, bytes]

# A batch body is these around the scores' JSON, joined by commas: what to_json gives too.
_BATCH_OPENING, _BATCH_CLOSING = b'{"scores":[', b"]}"


class ScorePublisher:
    """Keeps one confirming connection to a broker node, reconnecting whenever it is lost.

    Many requests publish on it at once; each waits only for its own confirm. Until the
    connection is up, and while the broker blocks publishers, publishes fail at once (503).
    Each connection goes to the next of AMQP_URL's nodes (shared/broker.py): after a loss,
    not to the node just lost. A publish is made on one connection and fails with it, so
    none is sent again on the next. A connection whose publishes are nacked while it has
    confirmed nothing for STUCK_SECONDS is replaced too: after a partition it can be stuck.
    """

    def __init__(self, settings: Settings) -> None:
        # An AMQP_URL the publisher cannot follow, or TLS files it cannot use, stop the api
        # at start-up.
        try:
            self._nodes = BrokerNodes(settings.amqp_url)
        except ValueError as exc:
            raise UnsupportedBrokerUrl(str(exc)) from None
        for node_url in self._nodes.urls:
            parse_amqp_url(node_url)
        self._tls = tls_context(settings)
        self._settings = settings
        self._connection: ConfirmingPublisher | None = None
        self._connected = asyncio.Event()
        # When the connection opened or last confirmed a publish (time.perf_counter).
        self._confirmed_at = 0.0
        # Resolved, with why, when the connection is stuck: it is then replaced.
        self._stuck: asyncio.Future[str] | None = None
        self._keeping: asyncio.Task[None] | None = None
        self._gathered: list[tuple[_Encoded, asyncio.Future[None]]] = []
        self._gathered_bytes = 0  # of their JSON, commas and batch framing not counted

    def start(self) -> None:
        """Begin connecting in the background; until connected, publishes answer 503."""
        self._keeping = asyncio.create_task(self._keep_connected())

    async def wait_ready(self) -> None:
        """Wait until connected."""
        await self._connected.wait()

    @property
    def ready(self) -> bool:
        """Whether a publish could be confirmed right now: connected and not blocked."""
        connection = self._connection
        return connection is not None and connection.is_open and not connection.blocked

    @property
    def broker(self) -> dict[str, str | bool | None]:
        """For /readyz: the node (`host:port`) connected to, or being tried, and whether
        the connection is open."""
        connection = self._connection
        connected = connection is not None and connection.is_open
        return {"node": self._nodes.address, "connected": connected}

    async def _keep_connected(self) -> None:
        declare = True
        while True:
            try:
                connection = await retry_until_connected(
                    partial(self._connect, declare=declare), _UNREACHABLE, self._nodes
                )
            except Exception:
                # Typically PRECONDITION_FAILED: scores.persist exists with other arguments.
                log.exception("publisher cannot set up the broker topology")
                await asyncio.sleep(MAX_BACKOFF_SECONDS)
                continue
            self._connection, self._confirmed_at = connection, time.perf_counter()
            stuck = self._stuck = asyncio.get_running_loop().create_future()
            self._connected.set()
            node = self._nodes.address
            log.info("publisher connected to broker node %s", node)
            await asyncio.wait((connection.closed, stuck), return_when=asyncio.FIRST_COMPLETED)
            self._connected.clear()
            # A stuck connection's publishes reached the queue: the topology is there, and
            # declaring it again could wait as long as a partition lasts.
            declare = connection.closed.done()
            if declare:
                log.warning("publisher lost broker node %s; reconnecting", node)
            else:
                log.warning(
                    "publisher leaves broker node %s, stuck (%s); connecting to the next node",
                    node,
                    stuck.result(),
                )
                await connection.close()

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

    def _gather(self, score: MessageFields, outcome: asyncio.Future[None]) -> None:
        body = to_json(score)
        gathered = len(self._gathered)
        if gathered and (
            gathered >= MAX_BATCH_SCORES
            or _batch_bytes(self._gathered_bytes + len(body), gathered + 1)
            > self._settings.broker_max_message_bytes
        ):
            self._publish_gathered()  # full: this score starts the next message
        self._gathered.append(((str(score["score_id"]), body), outcome))
        self._gathered_bytes += len(body)
        if len(self._gathered) == 1:
            asyncio.get_running_loop().call_soon(self._publish_gathered)

    def _publish_gathered(self) -> None:
        gathered, self._gathered, self._gathered_bytes = self._gathered, [], 0
        if gathered:
            self._publish([score for score, _ in gathered], [outcome for _, outcome in gathered])

    def _publish_batch(self, scores: Sequence[MessageFields]) -> list[asyncio.Future[None]]:
        """Publish a batch request's scores; returns the outcome of each message they took."""
        loop = asyncio.get_running_loop()
        limit = self._settings.broker_max_message_bytes
        body = to_json({"scores": scores})
        if len(body) <= limit:
            outcome: asyncio.Future[None] = loop.create_future()
            self._send(body, BATCH_PROPERTIES, str(new_score_id()), [outcome])
            return [outcome]
        # Larger than the broker takes: the scores go in several messages, so a failure can
        # leave some stored (README: retry with an Idempotency-Key).
        encoded = [(str(score["score_id"]), to_json(score)) for score in scores]
        outcomes = []
        for part in _parts(encoded, limit):
            outcomes.append(loop.create_future())
            self._publish(part, outcomes[-1:])
        return outcomes

    def _publish(self, scores: list[_Encoded], outcomes: list[asyncio.Future[None]]) -> None:
        if len(scores) == 1:
            (message_id, body), properties = scores[0], SCORE_PROPERTIES
        else:
            body = _BATCH_OPENING + b",".join(body for _, body in scores) + _BATCH_CLOSING
            properties, message_id = BATCH_PROPERTIES, str(new_score_id())
        self._send(body, properties, message_id, outcomes)

    def _send(
        self,
        body: bytes,
        properties: MessageProperties,
        message_id: str,
        outcomes: list[asyncio.Future[None]],
    ) -> None:
        started = time.perf_counter()
        try:
            if self._connection is None:
                raise PublishFailed("unavailable", "not connected to the message broker")
            confirm = self._connection.publish(
                API_EXCHANGE,
                ROUTING_KEY,
                body,
                properties,
                message_id=message_id,
                timestamp=datetime.now(UTC),
            )
        except PublishFailed as exc:
            confirm = asyncio.get_running_loop().create_future()
            confirm.set_exception(exc)
        confirm.add_done_callback(partial(self._pass_on, outcomes, started))

    def _pass_on(
        self, outcomes: list[asyncio.Future[None]], started: float, confirm: asyncio.Future[None]
    ) -> None:
        """Hand a message's confirm (or its failure) to every request whose score it holds."""
        error = (
            PublishFailed("unavailable", "the publish was cancelled")
            if confirm.cancelled()
            else confirm.exception()
        )
        if error is None:
            self._confirmed_at = now = time.perf_counter()
            PUBLISH_CONFIRM_SECONDS.observe(now - started)
        else:
            reason = getattr(error, "reason", "unavailable")
            PUBLISH_FAILURES.labels(reason).inc()
            if reason == "refused":
                self._check_stuck()
        for outcome in outcomes:
            if outcome.done():  # its request is gone (the client disconnected)
                continue
            if error is None:
                outcome.set_result(None)
            else:
                outcome.set_exception(error)

    def _check_stuck(self) -> None:
        """After a nack: have _keep_connected replace the connection if it has confirmed
        nothing for STUCK_SECONDS."""
        stuck = self._stuck
        quiet = time.perf_counter() - self._confirmed_at
        if stuck is not None and not stuck.done() and quiet >= STUCK_SECONDS:
            stuck.set_result(f"publishes nacked, nothing confirmed for {quiet:.0f} s")

    async def close(self) -> None:
        """Stop reconnecting and close the connection."""
        if self._keeping is not None:
            self._keeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeping
        if self._connection is not None:
            await self._connection.close()


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
