"""Publishing scores with publisher confirms: a score is ours only once the broker said so."""

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import aio_pika
from aio_pika.abc import AbstractExchange, AbstractRobustChannel, AbstractRobustConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, DeliveryError, PublishError

from api.errors import BrokerUnavailable
from api.metrics import PUBLISH_CONFIRM_SECONDS, PUBLISH_FAILURES, SCORES_ACCEPTED
from shared.broker import connect_until_ready
from shared.contract import CONTENT_TYPE, MESSAGE_TYPE, ScoreMessage
from shared.settings import Settings
from shared.topology import ROUTING_KEY, declare_topology

log = logging.getLogger(__name__)

_BLOCK_CHECK_SECONDS = 0.05


def to_amqp_message(message: ScoreMessage) -> aio_pika.Message:
    """The AMQP form of a score, as the message contract in the README describes it."""
    return aio_pika.Message(
        body=message.model_dump_json().encode(),
        content_type=CONTENT_TYPE,
        type=MESSAGE_TYPE,
        message_id=str(message.score_id),
        timestamp=message.created_at,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        app_id="score-ingest",
    )


class ScorePublisher:
    """One robust connection and one confirming channel, shared by all in-flight requests.

    aio-pika matches confirms to publishes by delivery tag, so concurrent publishes on the
    channel wait for their own confirms without serialising on each other.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._watching: asyncio.Task[None] | None = None
        self._in_flight: set[asyncio.Future[None]] = set()

    def start(self) -> None:
        """Begin connecting in the background; until connected, publishes answer 503."""
        self._connecting = asyncio.create_task(self._connect_until_ready())
        self._connecting.add_done_callback(_log_failure)
        self._watching = asyncio.create_task(self._fail_in_flight_when_blocked())

    async def _fail_in_flight_when_blocked(self) -> None:
        # RabbitMQ blocks a connection on its first publish after a resource alarm, and the
        # confirms of publishes in flight wait for the alarm to clear. One watcher for all
        # of them turns that into a 503 within one check, not after the whole timeout.
        while True:
            await asyncio.sleep(_BLOCK_CHECK_SECONDS)
            if self._in_flight and self.blocked:
                for outcome in self._in_flight:
                    if not outcome.done():
                        outcome.set_exception(_Blocked())

    async def wait_ready(self) -> None:
        """Wait until the first connection is up."""
        assert self._connecting is not None, "start() first"
        await asyncio.shield(self._connecting)

    @property
    def ready(self) -> bool:
        """Whether a publish could be confirmed right now: connected, channel open, not blocked."""
        return (
            self._exchange is not None
            and self._channel is not None
            and not self._channel.is_closed
            and not self.blocked
        )

    @property
    def blocked(self) -> bool:
        """Whether the broker has blocked publishing (a memory or disk alarm)."""
        transport = self._connection.transport if self._connection is not None else None
        if transport is None:
            return False
        # aiormq tracks connection.blocked/unblocked in a private event and makes writers
        # wait on it, which would hang each request until its timeout; reading it lets us
        # answer 503 at once instead.
        unblocked = getattr(transport.connection, "_Connection__connection_unblocked", None)
        return isinstance(unblocked, asyncio.Event) and not unblocked.is_set()

    async def _connect_until_ready(self) -> None:
        connection = await connect_until_ready(
            self._settings.amqp_url, "score-ingest-api", self._settings.publish_timeout_seconds
        )
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        topology = await declare_topology(channel, self._settings)
        self._connection, self._channel = connection, channel
        self._exchange = topology.exchange
        log.info("publisher connected to broker")

    async def publish_confirmed(self, message: ScoreMessage) -> None:
        """Publish one score and wait for the broker's confirm; raises BrokerUnavailable."""
        exchange = self._exchange
        if self.blocked:
            raise _refused("blocked", "message broker is blocking publishers (resource alarm)")
        if exchange is None or not self.ready:
            raise _refused("unavailable", "message broker is not connected")
        started = time.perf_counter()
        publishing = asyncio.ensure_future(
            exchange.publish(
                to_amqp_message(message),
                ROUTING_KEY,
                mandatory=True,
                timeout=self._settings.publish_timeout_seconds,
            )
        )
        outcome: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        publishing.add_done_callback(partial(_pass_on, outcome))
        self._in_flight.add(outcome)
        try:
            await outcome
        except _Blocked as exc:
            raise _refused(
                "blocked", "message broker is blocking publishers (resource alarm)"
            ) from exc
        except PublishError as exc:  # returned as unroutable: no queue bound to the exchange
            raise _refused("unroutable", "message broker could not route the score") from exc
        except DeliveryError as exc:  # nacked, e.g. scores.persist is at its length limit
            raise _refused("refused", "message broker refused the score (queue full)") from exc
        except TimeoutError as exc:
            raise _refused("timeout", "message broker did not confirm the score in time") from exc
        except CONNECTION_EXCEPTIONS as exc:
            raise _refused("unavailable", "lost the connection to the message broker") from exc
        finally:
            self._in_flight.discard(outcome)
        PUBLISH_CONFIRM_SECONDS.observe(time.perf_counter() - started)
        SCORES_ACCEPTED.inc()

    async def publish_all_confirmed(self, messages: Sequence[ScoreMessage]) -> None:
        """Publish many scores at once; returns when all are confirmed, else raises the first error.

        Every publish is awaited to its end even when one fails, so no confirm is left
        pending when the caller answers.
        """
        outcomes = await asyncio.gather(
            *(self.publish_confirmed(message) for message in messages), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def close(self) -> None:
        """Stop connecting and close the connection."""
        for task in (self._connecting, self._watching):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._connection is not None:
            await self._connection.close()


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        # Typically PRECONDITION_FAILED: scores.persist exists with other arguments.
        log.error("publisher cannot set up the broker topology", exc_info=task.exception())


class _Blocked(Exception):
    """The broker blocked the connection while this publish waited for its confirm."""


def _pass_on(outcome: asyncio.Future[None], publishing: asyncio.Future[Any]) -> None:
    """Hand a finished publish's result to the request's outcome, unless it already gave up."""
    if publishing.cancelled():
        if not outcome.done():
            outcome.cancel()
        return
    error = publishing.exception()  # also marks it retrieved when nobody waits any more
    if outcome.done():
        return
    if error is None:
        outcome.set_result(None)
    else:
        outcome.set_exception(error)


def _refused(reason: str, detail: str) -> BrokerUnavailable:
    PUBLISH_FAILURES.labels(reason).inc()
    return BrokerUnavailable(detail)
