"""The worker's consuming channels: a connection of its own per queue, one byte budget for
all of them, care after a loss.

The worker consumes several queues (`scores.persist` and its shards, shared/topology.py):
`Consumers` runs one `Consumer` per queue, each with its connection, channel and prefetch
window, so that a backlog in one queue never holds back another's deliveries (a gate that
waits blocks only its own connection), and WORKER_PREFETCH_BYTES bounds what they all hold.

aio-pika's robust `queue.consume` is not used here, for three reasons:

- aio-pika builds an `IncomingMessage` from each delivery before any callback of ours runs,
  and a property it cannot convert (a `delivery_mode` of 3) raises there. The delivery
  would stay unacked and unseen until a later ack with `multiple=True` acked it silently.
  Here every delivery reaches the worker; one whose properties cannot be read arrives
  with `problem` set and is dead-lettered like any other poison.
- RabbitMQ's prefetch counts messages, not bytes, so a window fitted to small messages
  can be filled with large ones. Once the channel's reader has a delivery's content
  header (its body size), it reads the body only if the message fits in
  `WORKER_PREFETCH_BYTES` beside those held: aiormq's frame queues fill, the socket is no
  longer read and TCP holds the broker back. That blocks every channel of the
  connection, so nothing else (dead letters and their confirms, queue polls) uses it.
  The gate keeps the bound; the prefetch count, fitted to the size of recent messages
  (`fit_window`), keeps what the broker hands this worker small, so that it rarely has to
  be held back and the rest of a backlog stays in the queue for other workers.
- After an unexplained loss of the connection the worker must not take its full window
  again: if one message killed the connection, it would spend a delivery of every
  message delivered with it, each time. The consumer takes one message at a time until
  as many as the window held have passed, or a message not delivered before arrives.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any, Final

import aiormq
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from aio_pika.message import IncomingMessage
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec
from pamqp.header import ContentHeader

from shared import field_tables
from shared.broker import BrokerNodes, tls_context
from shared.settings import Settings
from shared.topology import QUEUE
from worker._metrics import (
    CAUTIOUS,
    CONNECTION_LOSSES,
    HELD_BYTES,
    HELD_MESSAGES,
    PREFETCH,
    REDELIVERED,
)

log = logging.getLogger(__name__)

# What a message held costs besides its body: the body's decoded rows (a value's JSON text
# is a second copy of its bytes), the driver's encoding of them while they are stored (a
# buffer that grows by doubling: up to two more), and the objects around them. Measured:
# one 15 MiB batch of 1 MiB values grows the worker by 58 MiB while it is stored, 3.9
# copies (with cli.main's fixed mmap threshold); fewer copies let the budget be overrun.
_COPIES_HELD: Final = 4
_OVERHEAD_BYTES: Final = 1024
# Until the first delivery shows how big messages are: a full WORKER_PREFETCH of batch
# messages could be hundreds of megabytes.
_FIRST_WINDOW: Final = 64
# A window is fitted so that a full one takes a quarter of the byte budget: with the
# hysteresis of fit_window at most half. The rest absorbs messages larger than the recent
# ones before the byte gate has to hold the broker back.
_WINDOW_SHARE_OF_BUDGET: Final = 4
# The broker's own Connection.Close on shutdown (and `rabbitmqctl close_connection`):
# the connection was taken away, no message of ours was to blame.
_CONNECTION_FORCED: Final = 320
# Isolating a culprit ends when nothing is delivered for this long while nothing is held.
_CAUTION_IDLE_SECONDS: Final = 1.0
_SETTLE_SECONDS: Final = 2.0
_FIRST_RECONNECT_DELAY: Final = 0.1
_MAX_RECONNECT_DELAY: Final = 5.0
_SAFE_PROPERTIES: Final = (
    "content_type",
    "content_encoding",
    "headers",
    "message_id",
    "message_type",
    "app_id",
    "correlation_id",
    "reply_to",
)


def _held_size(body_size: int) -> int:
    """The bytes a message with a body of body_size costs the worker while it holds it."""
    return _COPIES_HELD * body_size + _OVERHEAD_BYTES


class _Shared:
    """What the consumers of one worker share: the byte budget (WORKER_PREFETCH_BYTES) and
    the process's gauges, which add up all of them."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.held_bytes = 0
        self.held_messages = 0
        self.room = asyncio.Event()
        self.consumers: list[Consumer] = []

    def taken(self, subscription: "_Subscription") -> int:
        """Bytes held, and reserved by deliveries being read, over every consumer (and on
        subscription, whose consumer may not have taken it yet)."""
        current = {consumer._subscription for consumer in self.consumers} | {subscription}
        return self.held_bytes + sum(each.reserved for each in current if each is not None)

    def show_held(self) -> None:
        """Update the gauges of held bytes and messages (at every delivery and settle)."""
        HELD_BYTES.set(self.held_bytes)
        HELD_MESSAGES.set(self.held_messages)

    def show_windows(self) -> None:
        """Update the gauges of the prefetch windows and caution (when they change)."""
        PREFETCH.set(sum(consumer._prefetch for consumer in self.consumers))
        CAUTIOUS.set(int(any(consumer.cautious for consumer in self.consumers)))


class _Subscription:
    """One connection and its channel: what they delivered and was not settled yet."""

    def __init__(self, queue: str, connection: aiormq.Connection, channel: aiormq.Channel) -> None:
        self.queue = queue
        self.connection = connection
        self.channel = channel
        self.consumer_tags: list[str] = []
        self.window = 0
        # Bytes of deliveries whose body is being read, or read and not yet handed over.
        self.reserved = 0
        # delivery tag -> bytes held, in delivery order (tags only grow on a channel).
        self.unsettled: dict[int, int] = {}


class Delivery(IncomingMessage):
    """A delivered message, knowing its subscription and its size; `problem` says why its
    properties could not be read, when they could not."""

    # aio-pika's Message.__setattr__ only refuses to change a public attribute of a locked
    # message, and costs a Python call and a property read for each of the twenty that
    # IncomingMessage sets: a Delivery took 10.9 µs to build with it and 2.7 µs without,
    # about a tenth of the worker's CPU for a message of one score. A Delivery is never
    # locked (it is consumed with acks, and nothing here sets its public attributes), so
    # the check could never refuse anything. tests/worker/test_delivery.py checks that a
    # Delivery holds what aio-pika's IncomingMessage holds.
    __setattr__ = object.__setattr__  # type: ignore[assignment]

    def __init__(
        self, delivered: DeliveredMessage, subscription: _Subscription, problem: str | None
    ) -> None:
        super().__init__(delivered)
        self._subscription = subscription
        self._size = _held_size(len(delivered.body))
        self._problem = problem

    @property
    def queue(self) -> str:
        """The queue it was delivered from."""
        return self._subscription.queue

    @property
    def problem(self) -> str | None:
        """Why the publisher's properties could not be read (they were left out), or None."""
        return self._problem


def _readable(delivered: DeliveredMessage, subscription: _Subscription) -> Delivery:
    """The delivery as a message; properties aio-pika cannot convert are left out and
    named in its `problem`."""
    try:
        return Delivery(delivered, subscription, None)
    except Exception as exc:  # any property aio-pika cannot convert
        problem = f"properties that cannot be read: {type(exc).__name__}: {exc}"
    properties = delivered.header.properties
    safe = spec.Basic.Properties(**{name: getattr(properties, name) for name in _SAFE_PROPERTIES})
    for candidate in (safe, spec.Basic.Properties()):
        header = ContentHeader(body_size=len(delivered.body), properties=candidate)
        try:
            return Delivery(
                DeliveredMessage(delivered.delivery, header, delivered.body, delivered.channel),
                subscription,
                problem,
            )
        except Exception as exc:  # the next candidate keeps less
            log.debug("properties still unreadable: %r", exc)
    raise AssertionError("a message without properties is always readable")


class Consumer:
    """Consumes one queue into `deliver`, reconnecting by itself; settle through it.

    Every delivery is handed to `deliver` in delivery order, synchronously, and must be
    settled (acked or rejected) through this object, which keeps the byte budget.
    """

    def __init__(
        self, settings: Settings, queue: str, deliver: Callable[[Delivery], None], shared: _Shared
    ) -> None:
        self._settings = settings
        self._queue = queue
        self._deliver = deliver
        # Each connection goes to the next of AMQP_URL's nodes: after a loss, not to the
        # node just lost (shared/broker.py).
        self._nodes = BrokerNodes(settings.amqp_url)
        self._shared = shared
        shared.consumers.append(self)
        # scores.persist's consumer keeps the name it had before shards; a shard's names it.
        self._connection_name = "score-ingest-worker" + ("" if queue == QUEUE else f" ({queue})")
        self._wanted = min(settings.worker_prefetch, _FIRST_WINDOW)
        self._fitted = False
        self._prefetch = 0  # the prefetch count of the channel's consumer, once it consumes
        self._subscription: _Subscription | None = None
        self._subscriptions: set[_Subscription] = set()
        self._changed = asyncio.Event()
        self._stopping = False
        self._connected = asyncio.Event()
        self._cautious_remaining = 0
        # The gauges are the process's: a consumer before this one (tests run several in one
        # process) may have left them set.
        shared.show_held()
        shared.show_windows()
        # Since when the worker holds messages without settling any (None: it holds none).
        self._waiting_since: float | None = None
        self._last_delivery = time.monotonic()
        self._closing: set[asyncio.Task[None]] = set()
        field_tables.install()

    @property
    def connected(self) -> bool:
        """Consuming: connected, subscribed, not reconnecting."""
        return self._connected.is_set()

    @property
    def broker(self) -> dict[str, str | bool | None]:
        """For /readyz: the node (`host:port`) consumed from, or being tried, and whether
        consuming."""
        return {"node": self._nodes.address, "connected": self.connected}

    @property
    def window(self) -> int:
        """The prefetch count asked of the broker (1 while isolating a culprit)."""
        return 1 if self._cautious_remaining else self._wanted

    @property
    def cautious(self) -> bool:
        """Taking one message at a time after an unexplained connection loss."""
        return self._cautious_remaining > 0

    @property
    def held_messages(self) -> int:
        """Delivered messages not yet settled, on every connection still referenced."""
        return sum(len(subscription.unsettled) for subscription in self._subscriptions)

    def stalled_for(self) -> float:
        """Seconds the worker has held messages without settling any; 0 if it holds none."""
        if self._waiting_since is None:
            return 0.0
        return time.monotonic() - self._waiting_since

    async def wait_connected(self) -> None:
        """Return once consuming."""
        await self._connected.wait()

    def fit_window(self, recent: Sequence[Delivery]) -> None:
        """Fit the prefetch count to the size of recent messages, between 2 and WORKER_PREFETCH.

        AMQP's prefetch counts messages, and a score.batch.v1 message can be a thousand times
        the size of a single score, so the count follows the size of recent messages, for a
        window of a quarter of WORKER_PREFETCH_BYTES. It changes only when it would halve or
        double (or reach WORKER_PREFETCH): each change costs a new consumer. The consumer's
        own task applies it.
        """
        if not recent:
            return
        mean_size = sum(message._size for message in recent) / len(recent)
        most = self._settings.worker_prefetch
        wanted = max(2, min(most, int(self._shared.budget // _WINDOW_SHARE_OF_BUDGET // mean_size)))
        current = self._wanted
        if wanted * 2 <= current or wanted >= current * 2 or (wanted == most != current):
            self._wanted = wanted
            self._changed.set()

    async def run(self) -> None:
        """Connect, consume and reconnect until `stop()`."""
        delay = _FIRST_RECONNECT_DELAY
        while not self._stopping:
            subscription: _Subscription | None = None
            failure: BaseException | None = None
            try:
                subscription = await self._connect()
                await self._subscribe(subscription)
                delay = _FIRST_RECONNECT_DELAY
                await self._serve(subscription)
            except Exception as exc:  # whatever went wrong, the worker reconnects
                failure = exc
            finally:
                self._connected.clear()
            if self._stopping:
                break
            self._after_loss(subscription, failure)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _MAX_RECONNECT_DELAY)

    async def stop(self, within: float) -> None:
        """Take no more deliveries: cancel the consumers (bounded) and stop reconnecting."""
        self._stopping = True
        self._changed.set()
        self._shared.room.set()
        subscription = self._subscription
        if subscription is None or subscription.channel.is_closed:
            return
        try:
            async with asyncio.timeout(within):
                for tag in subscription.consumer_tags:
                    await subscription.channel.basic_cancel(tag)
        except (TimeoutError, *CONNECTION_EXCEPTIONS) as exc:
            log.warning("could not cancel the consumer cleanly: %r", exc)

    async def close(self, within: float) -> None:
        """Close the connection, after a round trip that lets the last acks land."""
        self._stopping = True
        self._shared.room.set()
        subscription = self._subscription
        if subscription is None:
            return
        with contextlib.suppress(TimeoutError, *CONNECTION_EXCEPTIONS):
            async with asyncio.timeout(within):
                if not subscription.channel.is_closed:
                    await subscription.channel.basic_qos(prefetch_count=subscription.window)
        with contextlib.suppress(TimeoutError, *CONNECTION_EXCEPTIONS):
            await asyncio.wait_for(subscription.connection.close(), within)

    async def ack_through(self, messages: Iterable[Delivery]) -> None:
        """Ack with one frame per channel: multiple=True on its highest delivery tag.

        Sound because batches are taken and settled in delivery order: every earlier
        delivery on the channel is already acked or dead-lettered. Besides saving frames, a
        single ack is less exposed than hundreds to RabbitMQ dropping acks that race a
        channel close (rabbitmq/rabbitmq-server#10327).
        """
        highest: dict[_Subscription, Delivery] = {}
        for message in messages:
            known = highest.get(message._subscription)
            if known is None or (message.delivery_tag or 0) > (known.delivery_tag or 0):
                highest[message._subscription] = message
        for subscription, message in highest.items():
            tag = message.delivery_tag or 0
            await self._send(subscription, partial(_ack_multiple, subscription.channel, tag))
            self._settled(subscription, [t for t in subscription.unsettled if t <= tag])

    async def ack(self, message: Delivery) -> None:
        """Ack one message."""
        await self._settle_one(message, lambda channel, tag: channel.basic_ack(tag))

    async def reject(self, message: Delivery) -> None:
        """Reject one message without requeueing: the queue's dead-letter exchange takes it."""
        await self._settle_one(
            message, lambda channel, tag: channel.basic_reject(tag, requeue=False)
        )

    async def _settle_one(
        self, message: Delivery, action: Callable[[aiormq.Channel, int], Any]
    ) -> None:
        subscription, tag = message._subscription, message.delivery_tag or 0
        await self._send(subscription, lambda: action(subscription.channel, tag))
        self._settled(subscription, [tag])

    async def _send(self, subscription: _Subscription, frame: Callable[[], Any]) -> None:
        if subscription.channel.is_closed:
            return  # the broker took the message back when the channel closed
        try:
            # Bounded: on a connection that died under it, an ack's write may never complete,
            # and every later batch waits for this one's acks.
            async with asyncio.timeout(_SETTLE_SECONDS):
                await frame()
        except (TimeoutError, *CONNECTION_EXCEPTIONS) as exc:
            # The channel is gone, so the broker redelivers the message; storing it again is
            # a no-op.
            log.warning("could not settle a message (%r); it will be redelivered", exc)

    def _settled(self, subscription: _Subscription, tags: list[int]) -> None:
        sizes = [subscription.unsettled.pop(tag) for tag in tags if tag in subscription.unsettled]
        if not sizes:
            return
        self._shared.held_bytes -= sum(sizes)
        self._shared.held_messages -= len(sizes)
        if subscription.channel.is_closed and not subscription.unsettled:
            self._subscriptions.discard(subscription)
        held = self.held_messages
        self._waiting_since = time.monotonic() if held else None
        self._shared.room.set()
        self._shared.show_held()
        if self._cautious_remaining and subscription is self._subscription:
            self._cautious_remaining = max(0, self._cautious_remaining - len(sizes))
            if not self._cautious_remaining:
                self._end_caution("as many messages as it held have passed")

    def _end_caution(self, why: str) -> None:
        self._cautious_remaining = 0
        self._shared.show_windows()
        log.info("consuming %s with the full window again: %s", self._queue, why)
        self._changed.set()

    async def _connect(self) -> _Subscription:
        """A connection of its own and a channel on it, not consuming yet."""
        settings = self._settings
        connection = aiormq.Connection(
            self._nodes.take(),
            context=tls_context(settings),
            client_properties={"connection_name": self._connection_name},
        )
        try:
            # Bounded: a broker that accepts the connection and then says nothing must not
            # hold the worker's consuming up for ever.
            async with asyncio.timeout(settings.publish_timeout_seconds):
                await connection.connect()
                channel = await connection.channel(publisher_confirms=False)
        except BaseException:
            with contextlib.suppress(Exception):
                await connection.close()
            raise
        assert isinstance(channel, aiormq.Channel)
        return _Subscription(self._queue, connection, channel)

    async def _subscribe(self, subscription: _Subscription) -> None:
        """Start consuming on the subscription's channel, through the byte gate.

        A failure here may come after the broker delivered a window (the connection can die
        before the consume's answer is read), so the caller treats it as a loss of this
        subscription, with its window.
        """
        self._gate(subscription)
        async with asyncio.timeout(self._settings.publish_timeout_seconds):
            await self._consume(subscription, self.window)
        self._subscription = subscription
        self._subscriptions.add(subscription)
        self._connected.set()
        log.info(
            "consuming %s from broker node %s with a window of %d",
            self._queue,
            self._nodes.address,
            subscription.window,
        )

    async def _consume(self, subscription: _Subscription, window: int) -> None:
        """Start a consumer with this window (a prefetch count applies to consumers started
        after it), then cancel the ones before: what they delivered stays unacked on this
        channel and is settled like the rest; delivery tags stay in order."""
        channel = subscription.channel
        await channel.basic_qos(prefetch_count=window)
        replaced = subscription.consumer_tags
        # From here the broker may deliver up to this window, whatever happens next.
        subscription.window = max(subscription.window, window)

        async def on_delivery(delivered: DeliveredMessage) -> None:
            self._on_delivery(subscription, delivered)

        consume_ok = await channel.basic_consume(self._queue, on_delivery)
        assert consume_ok.consumer_tag is not None
        subscription.consumer_tags = [consume_ok.consumer_tag]
        for tag in replaced:
            await channel.basic_cancel(tag)
        subscription.window = self._prefetch = window
        self._shared.show_windows()

    async def _serve(self, subscription: _Subscription) -> None:
        """Apply window changes until the channel closes (raising why) or stop()."""
        closing = subscription.channel.closing
        connection_closing = subscription.connection.closing
        try:
            while not self._stopping:
                changed = asyncio.ensure_future(self._changed.wait())
                await asyncio.wait(
                    {closing, connection_closing, changed},
                    timeout=_CAUTION_IDLE_SECONDS if self._cautious_remaining else None,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                changed.cancel()
                if closing.done() or connection_closing.done():
                    break
                self._changed.clear()
                if (
                    self._cautious_remaining
                    and not subscription.unsettled
                    and time.monotonic() - self._last_delivery >= _CAUTION_IDLE_SECONDS
                ):
                    self._end_caution("the queue has nothing more to deliver")
                    self._changed.clear()
                window = self.window
                if window != subscription.window and not self._stopping:
                    # Bounded: an answer that never comes means the connection is gone.
                    async with asyncio.timeout(self._settings.publish_timeout_seconds):
                        await self._consume(subscription, window)
            done = closing if closing.done() else connection_closing
            failure = done.exception() if done.done() and not done.cancelled() else None
            if isinstance(failure, Exception):
                raise failure
            if failure is not None:  # aiormq closes with CancelledError by default
                raise ConnectionError(f"connection closed: {failure!r}")
        finally:
            if not closing.done():
                closing.cancel()

    def _after_loss(
        self, subscription: _Subscription | None, failure: BaseException | None
    ) -> None:
        explained = _broker_closed_it(failure)
        CONNECTION_LOSSES.labels("broker" if explained else "unexplained").inc()
        if subscription is None:
            log.warning("could not consume %s: %r", self._queue, failure)
            return
        closing = asyncio.create_task(_close_quietly(subscription.connection))
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)
        if not subscription.unsettled:
            self._subscriptions.discard(subscription)
        if not subscription.window:
            log.warning("could not consume %s: %r", self._queue, failure)
            return
        if explained:
            log.warning("the broker closed the consuming connection: %r", failure)
            return
        # The broker may have sent up to a window of messages; any of them may be the cause.
        self._cautious_remaining = max(self._cautious_remaining, subscription.window)
        self._shared.show_windows()
        log.warning(
            "lost the consuming connection (%r) with %d messages unsettled; taking one at a "
            "time until the %d it may have held have passed",
            failure,
            len(subscription.unsettled),
            self._cautious_remaining,
        )

    def _gate(self, subscription: _Subscription) -> None:
        """Make the channel's reader wait, once it has read a delivery's content header and
        before it reads the body, until the message fits in the byte budget beside those
        held (a message larger than the whole budget is read once nothing else is held).

        The header gives the body's size before any of it is read, so the budget is kept
        exactly: nothing beyond it is read off the socket, and TCP holds the broker back.
        aiormq starts the consumer callback as a task after reading a body, so the bytes are
        reserved here and handed to the delivery when the callback runs.
        """
        channel = subscription.channel
        read_content = channel._read_content
        if not asyncio.iscoroutinefunction(read_content):
            raise RuntimeError("aiormq changed: Channel._read_content is gone")

        async def gated(frame: Any, header: ContentHeader) -> DeliveredMessage:
            size = _held_size(header.body_size or 0)
            while not self._stopping:
                taken = self._shared.taken(subscription)
                if not taken or taken + size <= self._shared.budget:
                    break
                self._shared.room.clear()
                await self._shared.room.wait()
            subscription.reserved += size
            try:
                return await read_content(frame, header)
            except BaseException:
                subscription.reserved -= size
                raise

        channel._read_content = gated  # type: ignore[method-assign]

    def _on_delivery(self, subscription: _Subscription, delivered: DeliveredMessage) -> None:
        message = _readable(delivered, subscription)
        tag = message.delivery_tag or 0
        self._last_delivery = time.monotonic()
        subscription.unsettled[tag] = message._size
        subscription.reserved -= message._size
        self._shared.held_bytes += message._size
        self._shared.held_messages += 1
        if self._waiting_since is None:
            self._waiting_since = time.monotonic()
        self._shared.show_held()
        if message.redelivered:
            REDELIVERED.inc()
        elif self._cautious_remaining:
            # Past every message returned to the queue: none of them is left to isolate.
            self._end_caution("a message never delivered before arrived")
        if not self._fitted:
            # The first message shows how big messages are: fit the window now, not after
            # a first batch taken through the small starting window.
            self._fitted = True
            self.fit_window([message])
        self._deliver(message)


class Consumers:
    """Consumes every queue given into `deliver`, one Consumer each (its connection, channel
    and prefetch window of up to WORKER_PREFETCH), within one WORKER_PREFETCH_BYTES budget;
    settle through it."""

    def __init__(
        self, settings: Settings, queues: Sequence[str], deliver: Callable[[Delivery], None]
    ) -> None:
        shared = _Shared(settings.worker_prefetch_bytes)
        self._by_queue = {queue: Consumer(settings, queue, deliver, shared) for queue in queues}

    @property
    def queues(self) -> list[str]:
        """The queues consumed."""
        return list(self._by_queue)

    @property
    def connected(self) -> bool:
        """Consuming every queue: connected, subscribed, not reconnecting."""
        return all(consumer.connected for consumer in self._by_queue.values())

    @property
    def broker(self) -> dict[str, str | bool | None]:
        """For /readyz: the nodes (`host:port`) consumed from, or being tried, and whether
        consuming every queue."""
        nodes = dict.fromkeys(str(c.broker["node"]) for c in self._by_queue.values())
        return {"node": ", ".join(nodes), "connected": self.connected}

    @property
    def cautious(self) -> bool:
        """Taking one message at a time from some queue after an unexplained loss."""
        return any(consumer.cautious for consumer in self._by_queue.values())

    @property
    def held_messages(self) -> int:
        """Delivered messages not yet settled, from every queue."""
        return sum(consumer.held_messages for consumer in self._by_queue.values())

    def window(self, queue: str) -> int:
        """The prefetch count asked of the broker for a queue."""
        return self._by_queue[queue].window

    def stalled_for(self) -> float:
        """Seconds some queue's messages have been held without any of its being settled."""
        return max(consumer.stalled_for() for consumer in self._by_queue.values())

    async def wait_connected(self) -> None:
        """Return once consuming every queue."""
        for consumer in self._by_queue.values():
            await consumer.wait_connected()

    def fit_window(self, recent: Sequence[Delivery]) -> None:
        """Fit each queue's prefetch count to the size of its recent messages."""
        by_queue: dict[str, list[Delivery]] = {}
        for message in recent:
            by_queue.setdefault(message.queue, []).append(message)
        for queue, messages in by_queue.items():
            self._by_queue[queue].fit_window(messages)

    async def run(self) -> None:
        """Consume every queue, each reconnecting by itself, until `stop()`."""
        await asyncio.gather(*(consumer.run() for consumer in self._by_queue.values()))

    async def stop(self, within: float) -> None:
        """Take no more deliveries from any queue (bounded)."""
        await asyncio.gather(*(consumer.stop(within) for consumer in self._by_queue.values()))

    async def close(self, within: float) -> None:
        """Close every connection, after the last acks land (bounded)."""
        await asyncio.gather(*(consumer.close(within) for consumer in self._by_queue.values()))

    async def ack_through(self, messages: Iterable[Delivery]) -> None:
        """Ack with one frame per channel (see Consumer.ack_through)."""
        by_queue: dict[str, list[Delivery]] = {}
        for message in messages:
            by_queue.setdefault(message.queue, []).append(message)
        for queue, delivered in by_queue.items():
            await self._by_queue[queue].ack_through(delivered)

    async def ack(self, message: Delivery) -> None:
        """Ack one message."""
        await self._by_queue[message.queue].ack(message)

    async def reject(self, message: Delivery) -> None:
        """Reject one message without requeueing: its queue's dead-letter exchange takes it."""
        await self._by_queue[message.queue].reject(message)


def _broker_closed_it(failure: BaseException | None) -> bool:
    """Whether the broker closed the connection itself (shutting down, or an operator)."""
    return (
        isinstance(failure, aiormq.exceptions.ConnectionClosed)
        and bool(failure.args)
        and failure.args[0] == _CONNECTION_FORCED
    )


async def _ack_multiple(channel: aiormq.Channel, tag: int) -> None:
    await channel.basic_ack(tag, multiple=True)


async def _close_quietly(connection: aiormq.Connection) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(connection.close(), 2)
