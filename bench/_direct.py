"""Backlogs published straight to the broker, as a direct publisher would.

The api's own confirming publisher (`api/amqp.py`) does the publishing: aio-pika and aiormq
spend about 0.3 ms of CPU per message on the bench machine, as much as the broker itself,
so a million messages took longer to publish than to drain. Two kinds of message, as the
contract defines them:

- `single`: one score.create.v1 message per score, its message_id the score's UUIDv7;
- `batch`: score.batch.v1 messages of `batch_size` scores each (the last may hold fewer),
  as the api's batch endpoint publishes them: each score with its own UUIDv7, each message
  with a fresh one as message_id.

Bodies are joined from a template around each score's id. Every message is what the
contract asks of direct publishers (content type, type, message_id, persistent, mandatory,
confirmed); a nack or a returned (unroutable) message fails the run.
"""

import asyncio
from collections import deque
from datetime import UTC, datetime
from typing import Final, Literal

from uuid_utils import uuid7

from api.amqp import ConfirmingPublisher, MessageProperties, PublishFailed
from bench._services import BenchError
from shared.contract import BATCH_MESSAGE_TYPE, CONTENT_TYPE, MAX_BATCH_SCORES, MESSAGE_TYPE
from shared.topology import EXCHANGE, ROUTING_KEY

MessageKind = Literal["single", "batch"]
DEFAULT_BATCH_SCORES = 500  # scores per score.batch.v1 message, as in the bench's batch POSTs

_APP_ID: Final = "score-ingest-bench"
_PROPERTIES: Final = {
    "single": MessageProperties(CONTENT_TYPE, MESSAGE_TYPE, _APP_ID),
    "batch": MessageProperties(CONTENT_TYPE, BATCH_MESSAGE_TYPE, _APP_ID),
}
_PLACEHOLDER: Final = "00000000-0000-7000-8000-000000000000"  # as long as any UUID string
_WRITE_EVERY: Final = 500  # scores published between two writes (at least one message)
_UNCONFIRMED_WINDOW: Final = 20_000  # scores published but not yet confirmed (at least one message)
_CONFIRM_TIMEOUT_SECONDS: Final = 120.0


def message_body(score_id: str, project: str, created_at: str) -> bytes:
    """A valid score.create.v1 body."""
    return (
        f'{{"score_id":"{score_id}","entity":"bench","project":"{project}",'
        f'"prediction_id":"prediction-1","scorer":"weave:///bench/{project}/op/exact_match:'
        f'v1digest","value":{{"correct":true,"score":0.92,"tokens":[1,2,3]}},'
        f'"evaluation_run_id":"backlog","created_at":"{created_at}",'
        f'"created_by":"bench-publisher"}}'
    ).encode()


def messages_for(count: int, kind: MessageKind, batch_size: int = DEFAULT_BATCH_SCORES) -> int:
    """How many messages carry count scores."""
    return count if kind == "single" else -(-count // batch_size)


async def _confirmed(outcome: asyncio.Future[None]) -> None:
    try:
        await outcome
    except PublishFailed as exc:
        raise BenchError(
            f"the broker did not take a backlog message ({exc.reason}: {exc}); "
            "is scores.persist bound to exchange scores, and not full?"
        ) from exc


async def publish_direct(
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
    write_every = max(1, _WRITE_EVERY // per_message)
    window = max(1, _UNCONFIRMED_WINDOW // per_message)
    now = datetime.now(UTC)
    head, _, tail = message_body(_PLACEHOLDER, project, now.isoformat()).partition(
        _PLACEHOLDER.encode()
    )
    properties = _PROPERTIES[kind]
    publisher = await ConfirmingPublisher.connect(
        amqp_url,
        connection_name="score-ingest-bench-backlog",
        connect_timeout=10,
        publish_timeout=_CONFIRM_TIMEOUT_SECONDS,
    )
    in_flight: deque[asyncio.Future[None]] = deque()
    try:
        for index in range(messages):
            if kind == "single":
                message_id = str(uuid7())
                body = head + message_id.encode() + tail
            else:
                scores = min(batch_size, count - index * batch_size)
                ids = (str(uuid7()).encode() for _ in range(scores))
                body = b'{"scores":[' + b",".join(head + i + tail for i in ids) + b"]}"
                message_id = str(uuid7())
            in_flight.append(
                publisher.publish(
                    EXCHANGE, ROUTING_KEY, body, properties, message_id=message_id, timestamp=now
                )
            )
            while len(in_flight) >= window:
                await _confirmed(in_flight.popleft())
            if (index + 1) % write_every == 0:
                await asyncio.sleep(0)  # the publisher writes what was published
        while in_flight:
            await _confirmed(in_flight.popleft())
    finally:
        for outcome in in_flight:  # after a failure: the rest is not waited for
            outcome.cancel()
        await publisher.close()
    return messages
