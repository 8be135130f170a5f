"""A message that keeps crashing its consumer ends in scores.dead instead of looping."""

import asyncio

import aio_pika

from cli._dead_letters import describe
from shared.settings import Settings
from shared.topology import DEAD_LETTER_QUEUE, QUEUE, declare_topology
from tests.support.messages import to_amqp_message
from tests.support.processes import score_message

DELIVERY_LIMIT = 3


async def test_a_message_redelivered_past_the_limit_is_dead_lettered_by_the_broker(
    settings: Settings, bare_vhost: str
) -> None:
    limited = settings.model_copy(update={"queue_delivery_limit": DELIVERY_LIMIT})
    score = score_message()
    connection = await aio_pika.connect(limited.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        topology = await declare_topology(channel, limited)
        await topology.exchange.publish(to_amqp_message(score), "score.create")

        # Each round takes the message and dies without settling it, as a crashing worker does.
        for _ in range(DELIVERY_LIMIT + 1):
            doomed = await connection.channel()
            queue = await doomed.get_queue(QUEUE)
            assert await queue.get(no_ack=False, timeout=5) is not None
            await doomed.close()

        # The broker dead-letters at its own pace (at-least-once, through scores.dlx).
        dead_queue = await channel.get_queue(DEAD_LETTER_QUEUE)
        deadline = asyncio.get_running_loop().time() + 10
        while (dead := await dead_queue.get(no_ack=True, fail=False)) is None:
            assert asyncio.get_running_loop().time() < deadline, "nothing reached scores.dead"
            await asyncio.sleep(0.05)
        persist = await channel.declare_queue(QUEUE, passive=True)
        assert persist.declaration_result.message_count == 0
    letter = describe(dead)
    assert letter.reason == "delivery_limit"
    assert letter.source_queue == QUEUE
    assert letter.id == str(score.score_id)
