"""What the cluster tests share: one RabbitMQ cluster for the session, a PostgreSQL pair each.

Booting three RabbitMQ nodes takes 20-40 s on two cores, so the tests share one cluster,
booted by the first test that asks for it. Each test gets it as it started: partitions
healed, every node running, clustered and reporting no partition, the quorum queues'
members all online, the queues empty. A test may kill, stop or cut off nodes; the next
one's `cluster` fixture repairs that first.
"""

import asyncio
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import pytest

from chaos.postgres import PostgresPair
from chaos.rabbit import RabbitCluster
from shared.settings import Settings
from shared.topology import DEAD_LETTER_QUEUE, declare_topology, persist_queues

# scores.persist and every shard the default QUEUE_SHARDS declares, and the dead letters.
QUEUES = (*persist_queues(Settings()), DEAD_LETTER_QUEUE)
HEALTHY_TIMEOUT_SECONDS = 180.0
CONNECT_TIMEOUT_SECONDS = 10.0


@pytest.fixture(scope="session")
def rabbit_cluster() -> Iterator[RabbitCluster]:
    """Three RabbitMQ nodes with the project's topology, for the whole session; removed at
    its end. Tests take it through `cluster`."""
    workdir = Path(tempfile.mkdtemp(prefix="score-ingest-cluster-"))
    try:
        started = time.monotonic()
        with RabbitCluster(workdir) as running:
            print(f"\ncluster of 3 running in {time.monotonic() - started:.1f} s")
            asyncio.run(_declare_topology(running.node_url(0)))
            running.wait_healthy(QUEUES, timeout=HEALTHY_TIMEOUT_SECONDS)
            yield running
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def cluster(rabbit_cluster: RabbitCluster) -> RabbitCluster:
    """The session's cluster as it started: healed, every node up, healthy, queues empty."""
    rabbit_cluster.restore(QUEUES, timeout=HEALTHY_TIMEOUT_SECONDS)
    asyncio.run(_purge(rabbit_cluster.node_url(0)))
    return rabbit_cluster


async def _declare_topology(url: str) -> None:
    connection = await aio_pika.connect(url, timeout=CONNECT_TIMEOUT_SECONDS)
    async with connection:
        await declare_topology(await connection.channel(), Settings(amqp_url=url))


async def _purge(url: str) -> None:
    connection = await aio_pika.connect(url, timeout=CONNECT_TIMEOUT_SECONDS)
    async with connection:
        channel = await connection.channel()
        for name in QUEUES:
            await (await channel.get_queue(name)).purge()


@pytest.fixture
def pair() -> Iterator[PostgresPair]:
    """A primary and a streaming standby with TLS, in a directory user postgres can reach
    (pytest's tmp_path is not): a new pair for each test, which may fail it over."""
    workdir = Path(tempfile.mkdtemp(prefix="score-ingest-pg-"))
    try:
        started = time.monotonic()
        with PostgresPair(workdir) as running:
            print(f"PostgreSQL pair started in {time.monotonic() - started:.2f}s")
            yield running
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
