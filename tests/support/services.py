"""Finding PostgreSQL and RabbitMQ for the tests: environment first, then localhost, then Docker.

Tests never mock either service and never skip for want of one: without a service the
fixtures fail with a message that says how to provide it.
"""

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
import asyncpg

from shared.db import with_database
from shared.settings import Settings
from shared.topology import (
    API_EXCHANGE,
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    EXCHANGE,
    persist_queues,
)

LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
LOCAL_AMQP = "amqp://guest:guest@127.0.0.1:5672/"


def port_open(host: str, port: int) -> bool:
    """Whether something accepts TCP connections at host:port."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
        return True
    return False


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def docker_available() -> bool:
    """Whether a Docker engine answers (a contributor's laptop, not CI)."""
    if shutil.which("docker") is None:
        return False
    result = subprocess.run(["docker", "info"], capture_output=True, check=False, timeout=20)
    return result.returncode == 0


def _no_service(what: str, variable: str) -> RuntimeError:
    return RuntimeError(
        f"No {what} for the tests: set {variable}, run {what} on localhost, "
        "or install Docker so testcontainers can start one."
    )


async def delete_topology(amqp_url: str, settings: Settings) -> None:
    """Delete the queues and exchanges that `declare_topology` declares with these settings,
    at amqp_url (as a user who may configure them), whatever they hold."""
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        for queue in (*persist_queues(settings), DEAD_LETTER_QUEUE):
            await channel.queue_delete(queue)
        for exchange in (EXCHANGE, API_EXCHANGE, DEAD_LETTER_EXCHANGE):
            await channel.exchange_delete(exchange)


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A URL of a PostgreSQL server where the tests may create databases."""
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield url
    elif port_open("127.0.0.1", 5432):
        yield LOCAL_POSTGRES
    elif docker_available():
        from testcontainers.community.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as container:
            yield container.get_connection_url()
    else:
        raise _no_service("PostgreSQL", "TEST_DATABASE_URL")


@contextlib.contextmanager
def scratch_database(server_url: str) -> Iterator[str]:
    """A fresh, empty database on the server, dropped afterwards."""
    name = f"score_ingest_test_{uuid.uuid4().hex[:12]}"
    url = with_database(server_url, name)
    try:
        yield url
    finally:
        asyncio.run(_drop_database(server_url, name))


async def _drop_database(server_url: str, name: str) -> None:
    conn = await asyncpg.connect(with_database(server_url, "postgres"))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def with_nodes(url: str, *addresses: str) -> str:
    """url, with its host and port replaced by these `host:port` nodes, in this order (the
    multi-node AMQP_URL form, README "Several broker nodes"); credentials and the rest kept."""
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    nodes = ",".join(addresses)
    return urlunsplit(parts._replace(netloc=f"{credentials}@{nodes}" if credentials else nodes))


def _with_vhost(url: str, vhost: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + quote(vhost, safe="")))


class VhostFactory:
    """Makes throwaway RabbitMQ vhosts with rabbitmqctl, so each test run has its own."""

    def __init__(self, server_url: str) -> None:
        self.server_url = server_url
        self._made: list[str] = []

    def create(self) -> str:
        """A URL to a new, empty vhost."""
        vhost = f"score-ingest-test-{uuid.uuid4().hex[:12]}"
        user = urlsplit(self.server_url).username or "guest"
        _rabbitmqctl("add_vhost", vhost)
        _rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        self._made.append(vhost)
        return _with_vhost(self.server_url, vhost)

    def delete_all(self) -> None:
        """Remove every vhost this factory made."""
        for vhost in self._made:
            _rabbitmqctl("delete_vhost", vhost)
        self._made.clear()


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@contextlib.contextmanager
def rabbitmq_vhosts() -> Iterator[VhostFactory | str]:
    """A VhostFactory for a local broker, or a fixed URL (TEST_AMQP_URL, or a container's)."""
    url = os.environ.get("TEST_AMQP_URL")
    if url:
        yield url
    elif port_open("127.0.0.1", 5672):
        if shutil.which("rabbitmqctl") is None:
            raise RuntimeError(
                "RabbitMQ runs on localhost but rabbitmqctl is not on PATH, so the tests cannot "
                "make their own vhost; set TEST_AMQP_URL to a dedicated vhost instead."
            )
        factory = VhostFactory(LOCAL_AMQP)
        try:
            yield factory
        finally:
            factory.delete_all()
    elif docker_available():
        from testcontainers.community.rabbitmq import RabbitMqContainer

        with RabbitMqContainer("rabbitmq:3.13-alpine") as container:
            params = container.get_connection_params()
            yield (
                f"amqp://{params.credentials.username}:{params.credentials.password}"
                f"@{params.host}:{params.port}/"
            )
    else:
        raise _no_service("RabbitMQ", "TEST_AMQP_URL")
