"""Score messages in their AMQP form, as the README's contract asks of a direct publisher."""

import aio_pika

from shared.contract import CONTENT_TYPE, MESSAGE_TYPE, ScoreMessage


def to_amqp_message(message: ScoreMessage) -> aio_pika.Message:
    """A `score.create.v1` message for one score, with the properties the API sets."""
    return aio_pika.Message(
        body=message.model_dump_json().encode(),
        content_type=CONTENT_TYPE,
        type=MESSAGE_TYPE,
        message_id=str(message.score_id),
        timestamp=message.created_at,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        app_id="score-ingest",
    )
