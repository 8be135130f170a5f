"""A lean AMQP 0-9-1 publisher for big backlogs: frames built once, each score swaps in its id.

aio-pika and aiormq spend about 0.3 ms of CPU per published message on the bench machine,
as much as the broker itself, so a million messages took longer to publish than to drain.
Here no message object is ever built. Two kinds of message, as the contract defines them:

- `single`: one score.create.v1 message per score. The frames of a message (Basic.Publish,
  content header, body) are marshalled once with a placeholder id; every score copies them
  with its own UUIDv7 in place (message_id = score_id), and thousands go out per write.
- `batch`: score.batch.v1 messages of `batch_size` scores each (the last may hold fewer),
  as the api's batch endpoint publishes them. Each body is joined from per-score bodies,
  each score with its own UUIDv7, and the batch gets a fresh UUIDv7 as message_id; its
  frames are marshalled per message with pamqp, the body split into as many body frames as
  the frame_max negotiated in Connection.Tune requires.

Confirms are tracked by delivery tag as the protocol says (`multiple` acks included); a
nack or a returned (unroutable) message fails the run. The messages are exactly what the
contract asks of direct publishers: content type, type, message_id, persistent,
mandatory, confirmed.
"""

import asyncio
import contextlib
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Literal
from urllib.parse import unquote, urlsplit

from pamqp import commands, frame
from pamqp.base import Frame
from pamqp.body import ContentBody
from pamqp.header import ContentHeader, ProtocolHeader
from uuid_utils import uuid7

from bench._services import BenchError
from shared.contract import BATCH_MESSAGE_TYPE, CONTENT_TYPE, MAX_BATCH_SCORES, MESSAGE_TYPE
from shared.topology import EXCHANGE, ROUTING_KEY

MessageKind = Literal["single", "batch"]
DEFAULT_BATCH_SCORES = 500  # scores per score.batch.v1 message, as in the bench's batch POSTs

_PLACEHOLDER = b"00000000-0000-7000-8000-000000000000"  # as long as any UUID string
_CHANNEL = 1
_WRITE_CHUNK = 500  # scores per socket write (at least one message)
_UNCONFIRMED_WINDOW = 20_000  # scores published but not yet confirmed (at least one message)
_FRAME_HEADER = 7
_FRAME_OVERHEAD = _FRAME_HEADER + 1  # the header and the frame-end octet around a payload


def message_body(score_id: str, project: str, created_at: str) -> bytes:
    """A valid score.create.v1 body."""
    return (
        f'{{"score_id":"{score_id}","entity":"bench","project":"{project}",'
        f'"prediction_id":"prediction-1","scorer":"weave:///bench/{project}/op/exact_match:'
        f'v1digest","value":{{"correct":true,"score":0.92,"tokens":[1,2,3]}},'
        f'"evaluation_run_id":"backlog","created_at":"{created_at}",'
        f'"created_by":"bench-publisher"}}'
    ).encode()


def message_frames(body: bytes, message_type: str, message_id: str, frame_max: int) -> bytes:
    """One message on the wire: Basic.Publish, its content header, then its body in as many
    body frames as frame_max (from Connection.Tune; 0 is no limit) requires."""
    properties = commands.Basic.Properties(
        content_type=CONTENT_TYPE,
        message_type=message_type,
        message_id=message_id,
        delivery_mode=2,
    )
    frames = [
        frame.marshal(
            commands.Basic.Publish(exchange=EXCHANGE, routing_key=ROUTING_KEY, mandatory=True),
            _CHANNEL,
        ),
        frame.marshal(ContentHeader(body_size=len(body), properties=properties), _CHANNEL),
    ]
    step = frame_max - _FRAME_OVERHEAD if frame_max > 0 else max(len(body), 1)
    frames.extend(
        frame.marshal(ContentBody(body[offset : offset + step]), _CHANNEL)
        for offset in range(0, len(body), step)
    )
    return b"".join(frames)


# Wire bytes of messages [first, first + n) of the backlog.
_Encoder = Callable[[int, int], bytes]


def _single_encoder(project: str, created_at: str, frame_max: int) -> _Encoder:
    """score.create.v1 messages: one template, each copy with a fresh id in both places."""
    placeholder = _PLACEHOLDER.decode()
    template = message_frames(
        message_body(placeholder, project, created_at), MESSAGE_TYPE, placeholder, frame_max
    )
    # message_id and score_id; a body split across frames could cut a placeholder in two.
    if template.count(_PLACEHOLDER) != 2:
        raise BenchError(f"frame_max {frame_max} splits a single score's body: too small")

    def encode(_first: int, n: int) -> bytes:
        return b"".join(template.replace(_PLACEHOLDER, str(uuid7()).encode()) for _ in range(n))

    return encode


def _batch_encoder(
    project: str, created_at: str, frame_max: int, count: int, batch_size: int
) -> _Encoder:
    """score.batch.v1 messages of batch_size scores (the last takes what is left): each body
    joined from per-score bodies with fresh ids, each message with a fresh message_id."""
    prefix, _, suffix = message_body(_PLACEHOLDER.decode(), project, created_at).partition(
        _PLACEHOLDER
    )

    def encode(first: int, n: int) -> bytes:
        messages = []
        for index in range(first, first + n):
            scores = min(batch_size, count - index * batch_size)
            body = b"".join(
                (
                    b'{"scores":[',
                    b",".join(prefix + str(uuid7()).encode() + suffix for _ in range(scores)),
                    b"]}",
                )
            )
            messages.append(message_frames(body, BATCH_MESSAGE_TYPE, str(uuid7()), frame_max))
        return b"".join(messages)

    return encode


class _Connection:
    """One connection, one confirming channel, and a reader that counts confirms."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._buffer = bytearray()
        self._position = 0
        self.confirmed = 0
        self.progress = asyncio.Event()
        self.failure: BenchError | None = None

    def send(self, channel: int, value: Frame) -> None:
        self._writer.write(frame.marshal(value, channel))

    async def read_frame(self) -> Frame | ContentHeader | ContentBody:
        while True:
            start = self._position
            if len(self._buffer) - start >= _FRAME_HEADER:
                # type (1 byte), channel (2), payload size (4), payload, frame end (1)
                end = (
                    start + _FRAME_HEADER + int.from_bytes(self._buffer[start + 3 : start + 7]) + 1
                )
                if len(self._buffer) >= end:
                    self._position = end
                    _, _, value = frame.unmarshal(bytes(self._buffer[start:end]))
                    if isinstance(value, Frame | ContentHeader | ContentBody):
                        return value
                    continue  # a heartbeat
            del self._buffer[: self._position]
            self._position = 0
            data = await self._reader.read(65536)
            if not data:
                raise BenchError("the broker closed the connection")
            self._buffer += data

    async def expect(self, kind: type[Frame]) -> Frame:
        value = await self.read_frame()
        if not isinstance(value, kind):
            raise BenchError(f"expected {kind.__name__} from the broker, got {value!r}")
        return value

    async def count_confirms(self) -> None:
        """Read acks until the connection closes; record the first failure."""
        try:
            while True:
                value = await self.read_frame()
                if isinstance(value, commands.Basic.Ack):
                    self.confirmed = max(self.confirmed, value.delivery_tag)
                elif isinstance(value, commands.Basic.Nack):
                    raise BenchError("the broker refused a backlog message (queue full?)")
                elif isinstance(value, commands.Basic.Return):
                    raise BenchError("a backlog message was unroutable: is scores.persist bound?")
                elif isinstance(value, commands.Connection.CloseOk):
                    return
                elif isinstance(value, commands.Channel.Close | commands.Connection.Close):
                    raise BenchError(f"the broker closed the channel: {value.reply_text}")
                self.progress.set()
        except BenchError as exc:
            self.failure = exc
            self.progress.set()


def messages_for(count: int, kind: MessageKind, batch_size: int = DEFAULT_BATCH_SCORES) -> int:
    """How many messages carry count scores."""
    return count if kind == "single" else -(-count // batch_size)


async def publish_frames(
    amqp_url: str,
    count: int,
    project: str,
    kind: MessageKind = "single",
    batch_size: int = DEFAULT_BATCH_SCORES,
) -> int:
    """Publish count valid scores to exchange `scores`, as `kind` messages (batch: of
    batch_size scores each); returns how many messages, once all are confirmed."""
    if kind == "batch" and not 1 <= batch_size <= MAX_BATCH_SCORES:
        raise BenchError(f"a batch message holds 1 to {MAX_BATCH_SCORES} scores, not {batch_size}")
    per_message = 1 if kind == "single" else batch_size
    messages = messages_for(count, kind, batch_size)
    write_chunk = max(1, _WRITE_CHUNK // per_message)
    window = max(1, _UNCONFIRMED_WINDOW // per_message)
    url = urlsplit(amqp_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port or 5672)
    connection = _Connection(reader, writer)
    try:
        writer.write(ProtocolHeader().marshal())
        await connection.expect(commands.Connection.Start)
        login = f"\0{unquote(url.username or 'guest')}\0{unquote(url.password or 'guest')}"
        connection.send(
            0,
            commands.Connection.StartOk(
                client_properties={"connection_name": "score-ingest-bench-backlog"},
                response=login,
            ),
        )
        tune = await connection.expect(commands.Connection.Tune)
        assert isinstance(tune, commands.Connection.Tune)
        connection.send(
            0, commands.Connection.TuneOk(tune.channel_max, tune.frame_max, heartbeat=0)
        )
        connection.send(0, commands.Connection.Open(virtual_host=unquote(url.path[1:]) or "/"))
        await connection.expect(commands.Connection.OpenOk)
        connection.send(_CHANNEL, commands.Channel.Open())
        await connection.expect(commands.Channel.OpenOk)
        connection.send(_CHANNEL, commands.Confirm.Select())
        await connection.expect(commands.Confirm.SelectOk)

        confirms = asyncio.create_task(connection.count_confirms())
        created_at = datetime.now(UTC).isoformat()
        encode = (
            _single_encoder(project, created_at, tune.frame_max)
            if kind == "single"
            else _batch_encoder(project, created_at, tune.frame_max, count, batch_size)
        )
        published = 0
        while connection.confirmed < messages:
            if connection.failure is not None:
                raise connection.failure
            if published < messages and published - connection.confirmed < window:
                n = min(write_chunk, messages - published)
                writer.write(encode(published, n))
                published += n
                await writer.drain()
                await asyncio.sleep(0)  # let the confirms in
            else:
                connection.progress.clear()
                await connection.progress.wait()
        connection.send(
            0, commands.Connection.Close(reply_code=200, reply_text="done", class_id=0, method_id=0)
        )
        await asyncio.wait_for(confirms, 10)
        if connection.failure is not None:
            raise connection.failure
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return messages
