"""A Delivery is aio-pika's IncomingMessage built without its per-attribute lock check
(worker/consumer.py): it must hold exactly what an IncomingMessage of the same delivery
holds, whatever properties the publisher set."""

from datetime import UTC, datetime
from typing import Any, cast

import pytest
from aio_pika.message import IncomingMessage
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec
from pamqp.header import ContentHeader

from worker.consumer import Delivery, _Subscription


class _Queue:
    """What a Delivery reads of its subscription here: the queue's name."""

    queue = "scores.persist.0"


def _delivered(properties: spec.Basic.Properties, *, redelivered: bool = False) -> DeliveredMessage:
    deliver = spec.Basic.Deliver(
        consumer_tag="ctag",
        delivery_tag=7,
        redelivered=redelivered,
        exchange="scores.api",
        routing_key="shard.0",
    )
    body = b'{"scores":[]}'
    header = ContentHeader(body_size=len(body), properties=properties)
    return DeliveredMessage(delivery=deliver, header=header, body=body, channel=cast(Any, None))


PROPERTIES = [
    spec.Basic.Properties(),
    spec.Basic.Properties(
        content_type="application/json",
        content_encoding="utf-8",
        headers={"x-case": "all", "x-count": 3, "nested": {"a": [1, "b"]}},
        delivery_mode=2,
        priority=5,
        correlation_id="corr",
        reply_to="replies",
        expiration="60000",
        message_id="0190c2b1-0000-7000-8000-000000000001",
        timestamp=datetime(2026, 12, 4, 1, 2, 3, tzinfo=UTC),
        message_type="score.batch.v1",
        user_id="guest",
        app_id="score-ingest",
    ),
]


@pytest.mark.parametrize("properties", PROPERTIES, ids=["none", "every"])
@pytest.mark.parametrize("redelivered", [False, True])
def test_a_delivery_holds_what_an_incoming_message_holds(
    properties: spec.Basic.Properties, redelivered: bool
) -> None:
    delivered = _delivered(properties, redelivered=redelivered)
    expected = IncomingMessage(delivered)
    delivery = Delivery(delivered, cast(_Subscription, _Queue()), None)
    assert delivery.info() == expected.info()
    assert delivery.body == expected.body
    for name in ("consumer_tag", "message_count", "cluster_id", "locked", "processed"):
        assert getattr(delivery, name) == getattr(expected, name), name
    assert (delivery.queue, delivery.problem) == ("scores.persist.0", None)


def test_a_delivery_is_not_locked_and_can_still_be_locked() -> None:
    delivery = Delivery(_delivered(PROPERTIES[1]), cast(_Subscription, _Queue()), None)
    assert not delivery.locked
    delivery.lock()
    assert delivery.locked
