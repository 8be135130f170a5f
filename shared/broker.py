"""Connecting to RabbitMQ the same way on both sides."""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import aio_pika
from aio_pika.abc import AbstractRobustConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS

from shared import field_tables

log = logging.getLogger(__name__)

RECONNECT_INTERVAL_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 5.0

T = TypeVar("T")


async def retry_until_connected(
    connect: Callable[[], Awaitable[T]], errors: tuple[type[BaseException], ...]
) -> T:
    """Call connect until it returns, backing off from 0.1 s to MAX_BACKOFF_SECONDS while
    it raises one of errors (the broker is not reachable)."""
    delay = 0.1
    while True:
        try:
            return await connect()
        except errors as exc:
            log.warning("broker not reachable (%s); retrying in %.1fs", exc, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, MAX_BACKOFF_SECONDS)


async def connect_until_ready(
    url: str, connection_name: str, attempt_seconds: float
) -> AbstractRobustConnection:
    """A robust connection, retrying with backoff until the broker answers.

    Once made, the connection reconnects by itself and restores its channels, exchanges,
    queues and consumers. Whatever headers a delivered message carries, decoding them
    cannot fail the connection (shared/field_tables.py).
    """
    field_tables.install()
    return await retry_until_connected(
        lambda: aio_pika.connect_robust(
            url,
            timeout=attempt_seconds,
            reconnect_interval=RECONNECT_INTERVAL_SECONDS,
            client_properties={"connection_name": connection_name},
        ),
        CONNECTION_EXCEPTIONS,
    )
