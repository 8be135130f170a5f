"""The cluster harness's RabbitMQ (chaos/rabbit.py): three real nodes, the project's quorum
queue replicated on all of them, and the faults the chaos runner stages.

The cluster is the session's (tests/cluster/conftest.py), with the topology declared through
one node's URL, as any client of the cluster would. A kill -9 of the queue's leader must
leave the other two electing a leader and confirming publishes; the killed node comes back
on its data: the cluster is healthy again, with the queue's members all online. (A partition
of the leader, the cut-off node pausing and rejoining once healed, is staged with apis
posting through it: tests/cluster/test_publisher_partition.py.) How long each fault takes to
settle is printed (`pytest -s`), not asserted: the bounds below only keep a broken cluster
from hanging.
"""

import asyncio
import time

import aio_pika
import pytest

from chaos.rabbit import ClusterError, RabbitCluster
from shared.topology import DEAD_LETTER_QUEUE, EXCHANGE, QUEUE, ROUTING_KEY
from tests.support.services import port_open

# Boots a broker of its own: never a unit test, whatever fixtures it uses.
pytestmark = pytest.mark.fault

CONNECT_TIMEOUT_SECONDS = 10.0
# A publish waits for a new leader when the old one is gone: an election, then the commit.
CONFIRM_TIMEOUT_SECONDS = 60.0
ELECTION_TIMEOUT_SECONDS = 60.0
HEALTHY_TIMEOUT_SECONDS = 180.0
POLL_SECONDS = 0.2


async def publish_confirmed(url: str, body: bytes) -> int:
    """Publish one persistent message to scores.persist through url until the broker confirms
    it; returns the number of nacks before the confirm.

    After a nack the message goes again on a new channel: RabbitMQ 3.10 nacks every publish
    of a channel whose first one reached the queue while its leader was cut off, until the
    partition heals, long after the others elected a new leader (measured here); a new
    channel on the same connection is confirmed.
    """
    deadline = time.monotonic() + CONFIRM_TIMEOUT_SECONDS
    connection = await aio_pika.connect(url, timeout=CONNECT_TIMEOUT_SECONDS)
    async with connection:
        message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        nacks = 0
        while True:
            async with connection.channel(publisher_confirms=True) as channel:
                exchange = await channel.get_exchange(EXCHANGE)
                try:
                    await exchange.publish(
                        message, routing_key=ROUTING_KEY, timeout=CONFIRM_TIMEOUT_SECONDS
                    )
                except aio_pika.exceptions.DeliveryError:
                    nacks += 1
                    assert time.monotonic() < deadline, f"{url}: {nacks} nacks, no confirm"
                    await asyncio.sleep(POLL_SECONDS)
                    continue
                return nacks


async def drain(url: str) -> list[bytes]:
    """Take every message off scores.persist through url."""
    connection = await aio_pika.connect(url, timeout=CONNECT_TIMEOUT_SECONDS)
    async with connection:
        queue = await (await connection.channel()).get_queue(QUEUE)
        bodies = []
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            bodies.append(message.body)
        return bodies


def leader_other_than(cluster: RabbitCluster, gone: int) -> int:
    """The queue's leader once it is no longer node gone (an election takes a few seconds)."""
    deadline = time.monotonic() + ELECTION_TIMEOUT_SECONDS
    while True:
        try:
            if (leader := cluster.leader(QUEUE)) != gone:
                return leader
        except ClusterError:
            pass  # between leaders: no node is named as leading
        if time.monotonic() > deadline:
            raise AssertionError(
                f"node {gone} still leads {QUEUE} after {ELECTION_TIMEOUT_SECONDS}s"
            )
        time.sleep(POLL_SECONDS)


def amqp_port_open(cluster: RabbitCluster, i: int) -> bool:
    host, port = cluster.node_address(i).rsplit(":", 1)
    return port_open(host, int(port))


async def test_the_persist_queue_is_a_quorum_queue_on_every_node(cluster: RabbitCluster) -> None:
    # Healthy means: every node runs clustered, and each named queue is a quorum queue
    # whose online members are all three nodes.
    cluster.wait_healthy([QUEUE, DEAD_LETTER_QUEUE], timeout=HEALTHY_TIMEOUT_SECONDS)
    assert cluster.leader(QUEUE) in range(3)

    await publish_confirmed(cluster.node_url(0), b"through node 0")

    assert await drain(cluster.node_url(2)) == [b"through node 0"]


async def test_killing_the_leader_elects_another_which_confirms_publishes(
    cluster: RabbitCluster,
) -> None:
    cluster.wait_healthy([QUEUE], timeout=HEALTHY_TIMEOUT_SECONDS)
    killed = cluster.leader(QUEUE)

    started = time.monotonic()
    cluster.kill(killed)
    leader = leader_other_than(cluster, killed)
    elected = time.monotonic() - started
    nacks = await publish_confirmed(cluster.node_url(leader), b"after the kill")
    confirmed = time.monotonic() - started
    survivor = next(i for i in range(3) if i not in (killed, leader))
    nacks += await publish_confirmed(cluster.node_url(survivor), b"through a follower")

    assert not amqp_port_open(cluster, killed)
    restarted = time.monotonic()
    cluster.start_node(killed)
    cluster.wait_healthy([QUEUE], timeout=HEALTHY_TIMEOUT_SECONDS)
    print(
        f"\nkill -9 of leader {killed}: node {leader} leads after {elected:.1f} s, "
        f"a publish confirmed after {confirmed:.1f} s ({nacks} nacks); "
        f"restarted and healthy in {time.monotonic() - restarted:.1f} s"
    )

    # A nacked publish may yet have been stored: a retry can leave a second copy.
    assert set(await drain(cluster.node_url(killed))) == {b"after the kill", b"through a follower"}
