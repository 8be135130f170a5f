"""Connecting to RabbitMQ the same way on both sides."""

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import TypeVar

import aio_pika
from aio_pika.abc import AbstractRobustConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS

from shared import field_tables
from shared.settings import Settings

log = logging.getLogger(__name__)

RECONNECT_INTERVAL_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 5.0

T = TypeVar("T")


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """How every broker connection does TLS: None for amqp://; for amqps://, the broker's
    certificate checked against AMQP_CA_FILE (else the system's CAs) and its host name, and
    AMQP_CERT_FILE (with AMQP_KEY_FILE) shown if the broker asks for a client certificate."""
    if not settings.amqp_url.startswith("amqps://"):
        return None
    try:
        context = ssl.create_default_context(cafile=settings.amqp_ca_file)
    except ssl.SSLError as exc:
        raise ValueError(f"AMQP_CA_FILE holds no usable CA certificate: {exc}") from exc
    if settings.amqp_cert_file is not None:
        try:
            context.load_cert_chain(settings.amqp_cert_file, settings.amqp_key_file)
        except ssl.SSLError as exc:
            raise ValueError(
                f"AMQP_CERT_FILE and AMQP_KEY_FILE hold no usable certificate and key: {exc}"
            ) from exc
    return context


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
    url: str, connection_name: str, attempt_seconds: float, tls: ssl.SSLContext | None = None
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
            ssl_context=tls,
        ),
        CONNECTION_EXCEPTIONS,
    )
