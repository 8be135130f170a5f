"""Fixtures the API tests share."""

from collections.abc import AsyncIterator

import aio_pika
import pytest
from aio_pika.abc import AbstractQueue

from shared.settings import Settings
from shared.topology import QUEUE
from tests.conftest import basic_auth


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The session's settings, unsharded: these tests read what the api publishes in
    scores.persist (tests/api/test_shard_routing.py reads the shards)."""
    return settings.model_copy(update={"queue_shards": 0})


@pytest.fixture
async def persist_queue(settings: Settings) -> AsyncIterator[AbstractQueue]:
    """scores.persist, read directly: with no worker running, published scores wait here."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        yield await channel.get_queue(QUEUE)


@pytest.fixture
def headers(api_key: str) -> dict[str, str]:
    """A valid key, and a JSON content type for bodies sent as raw bytes."""
    return {**basic_auth(api_key), "Content-Type": "application/json"}
