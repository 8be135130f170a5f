"""Publishing scores with publisher confirms: a score is ours only once the broker said so."""

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import partial
from typing import Any

from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from pydantic_core import to_json

from api.errors import BrokerUnavailable
from api.metrics import PUBLISH_CONFIRM_SECONDS, PUBLISH_FAILURES, SCORES_ACCEPTED
from shared.amqp import ConfirmingPublisher, MessageProperties, PublishFailed
from shared.broker import MAX_BACKOFF_SECONDS, retry_until_connected
from shared.contract import (
    BATCH_MESSAGE_TYPE,
    CONTENT_TYPE,
    MAX_BATCH_SCORES,
    MESSAGE_TYPE,
)
from shared.ids import new_score_id
from shared.settings import Settings
from shared.signing import SIGNATURE_HEADER, KeyRing
from shared.topology import EXCHANGE, ROUTING_KEY, declare_topology_once

log = logging.getLogger(__name__)

APP_ID = "score-ingest"
SCORE_PROPERTIES = MessageProperties(CONTENT_TYPE, MESSAGE_TYPE, APP_ID)
BATCH_PROPERTIES = MessageProperties(CONTENT_TYPE, BATCH_MESSAGE_TYPE, APP_ID)
# What a connect attempt raises while the broker is down or still starting.
_UNREACHABLE = (OSError, TimeoutError, PublishFailed, *CONNECTION_EXCEPTIONS)

# The fields of a ScoreMessage, as the api builds them (see api.service.score_message).
MessageFields = dict[str, Any]


class ScorePublisher:
    """Keeps one confirming connection to the broker, reconnecting whenever it is lost.

    Many requests publish on it at once; each waits only for its own confirm. Until the
    connection is up, and while the broker blocks publishers, publishes fail at once (503).
    """

    def __init__(self, settings: Settings, signing: KeyRing) -> None:
        self._settings = settings
        self._signing = signing
        self._connection: ConfirmingPublisher | None = None
        self._connected = asyncio.Event()
        self._keeping: asyncio.Task[None] | None = None
        self._gathered: list[tuple[MessageFields, asyncio.Future[None]]] = []

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

    async def _keep_connected(self) -> None:
        while True:
            try:
                connection = await retry_until_connected(self._connect, _UNREACHABLE)
            except Exception:
                # Typically PRECONDITION_FAILED: scores.persist exists with other arguments.
                log.exception("publisher cannot set up the broker topology")
                await asyncio.sleep(MAX_BACKOFF_SECONDS)
                continue
            self._connection = connection
            self._connected.set()
            log.info("publisher connected to broker")
            await asyncio.shield(connection.closed)
            self._connected.clear()
            log.warning("publisher lost the broker; reconnecting")

    async def _connect(self) -> ConfirmingPublisher:
        settings = self._settings
        # The topology is declared on each (re)connect, through a short aio-pika connection:
        # declaring is rare, and it keeps one definition of the topology for every process.
        await declare_topology_once(settings, settings.publish_timeout_seconds)
        return await ConfirmingPublisher.connect(
            settings.amqp_url,
            connection_name="score-ingest-api",
            connect_timeout=settings.publish_timeout_seconds,
            publish_timeout=settings.publish_timeout_seconds,
        )

    async def publish_scores(self, messages: Sequence[MessageFields]) -> None:
        """Publish scores and wait for the broker's confirm; raises BrokerUnavailable.

        A batch request's scores go as one `score.batch.v1` message, so the broker accepts
        or refuses them as a whole. Single scores published in the same turn of the event
        loop (requests that arrived together) also travel as one message, like a group
        commit: each request still answers only after the confirm of the message holding
        its score, and no request waits for others to arrive.
        """
        outcome: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if len(messages) == 1:
            self._gathered.append((messages[0], outcome))
            if len(self._gathered) == 1:
                asyncio.get_running_loop().call_soon(self._publish_gathered)
            elif len(self._gathered) >= MAX_BATCH_SCORES:
                self._publish_gathered()
        else:
            self._publish(list(messages), [outcome])
        try:
            await outcome
        except PublishFailed as exc:
            raise BrokerUnavailable(str(exc)) from exc
        SCORES_ACCEPTED.inc(len(messages))

    def _publish_gathered(self) -> None:
        gathered, self._gathered = self._gathered, []
        if gathered:
            self._publish([score for score, _ in gathered], [outcome for _, outcome in gathered])

    def _publish(self, scores: list[MessageFields], outcomes: list[asyncio.Future[None]]) -> None:
        if len(scores) == 1:
            body = to_json(scores[0])
            properties, message_id = SCORE_PROPERTIES, str(scores[0]["score_id"])
        else:
            body = to_json({"scores": scores})
            properties, message_id = BATCH_PROPERTIES, str(new_score_id())
        # Signed, the worker stores it without validating it again (shared/signing.py).
        key = self._signing.newest
        headers = {SIGNATURE_HEADER: key.sign(properties.message_type, body)} if key else None
        started = time.perf_counter()
        try:
            if self._connection is None:
                raise PublishFailed("unavailable", "not connected to the message broker")
            confirm = self._connection.publish(
                EXCHANGE,
                ROUTING_KEY,
                body,
                properties,
                message_id=message_id,
                timestamp=datetime.now(UTC),
                headers=headers,
            )
        except PublishFailed as exc:
            confirm = asyncio.get_running_loop().create_future()
            confirm.set_exception(exc)
        confirm.add_done_callback(partial(_pass_on, outcomes, started))

    async def close(self) -> None:
        """Stop reconnecting and close the connection."""
        if self._keeping is not None:
            self._keeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeping
        if self._connection is not None:
            await self._connection.close()


def _pass_on(
    outcomes: list[asyncio.Future[None]], started: float, confirm: asyncio.Future[None]
) -> None:
    """Hand a message's confirm (or its failure) to every request whose score it holds."""
    error = (
        PublishFailed("unavailable", "the publish was cancelled")
        if confirm.cancelled()
        else confirm.exception()
    )
    if error is None:
        PUBLISH_CONFIRM_SECONDS.observe(time.perf_counter() - started)
    else:
        PUBLISH_FAILURES.labels(getattr(error, "reason", "unavailable")).inc()
    for outcome in outcomes:
        if outcome.done():  # its request is gone (the client disconnected)
            continue
        if error is None:
            outcome.set_result(None)
        else:
            outcome.set_exception(error)
