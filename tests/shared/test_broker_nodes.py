"""AMQP_URL's nodes: how they are read, refused, and which is taken next (no broker needed)."""

import itertools
import random
from collections import Counter

import pytest

from api.amqp import UnsupportedBrokerUrl, parse_amqp_url
from shared.broker import (
    BrokerNodes,
    broker_nodes,
    connect_to_a_node,
    node_address,
    retry_until_connected,
)

CLUSTER = "amqp://api:p%40ss@10.1.0.1:5672,10.1.0.2:5673,10.1.0.3/score-ingest?heartbeat=30"


@pytest.mark.parametrize(
    ("url", "nodes"),
    [
        ("amqp://guest:guest@127.0.0.1:5672/", ["amqp://guest:guest@127.0.0.1:5672/"]),
        ("amqp://rabbit", ["amqp://rabbit:5672"]),
        ("amqps://u:p@rabbit/%2F", ["amqps://u:p@rabbit:5671/%2F"]),
        (
            CLUSTER,
            [
                "amqp://api:p%40ss@10.1.0.1:5672/score-ingest?heartbeat=30",
                "amqp://api:p%40ss@10.1.0.2:5673/score-ingest?heartbeat=30",
                "amqp://api:p%40ss@10.1.0.3:5672/score-ingest?heartbeat=30",
            ],
        ),
        (
            "amqps://u:p@[::1]:5671, [fd00::2]/v",
            ["amqps://u:p@[::1]:5671/v", "amqps://u:p@[fd00::2]:5671/v"],
        ),
    ],
    ids=["one", "defaults", "amqps-default-port", "cluster", "ipv6-and-spaces"],
)
def test_each_node_gets_a_url_of_its_own_in_the_order_written(url: str, nodes: list[str]) -> None:
    assert broker_nodes(url) == nodes


@pytest.mark.parametrize(
    ("url", "refusal"),
    [
        ("amqp://u:p@h1:5672,,h2:5672/", "AMQP_URL lists a node with no host: ''"),
        ("amqp://u:p@h1:5672,/", "AMQP_URL lists a node with no host: ''"),
        ("amqp://u:p@:5672/", "AMQP_URL lists a node with no host: ':5672'"),
        ("amqp:///", "AMQP_URL lists a node with no host"),
        ("amqp://h1:5672,h2:port/", "AMQP_URL has an invalid port for node 'h2:port'"),
        ("amqp://h1:0/", "AMQP_URL has an invalid port for node 'h1:0': a number from 1 to"),
        ("amqp://h1:65536/", "AMQP_URL has an invalid port for node 'h1:65536'"),
        ("amqp://h1:-1/", "AMQP_URL has an invalid port for node 'h1:-1'"),
        ("amqp://h1:1:2/", "AMQP_URL has an invalid port for node 'h1:1:2'"),
        ("amqp://[::1]x/", "AMQP_URL lists a node it cannot read: '[::1]x'"),
        ("amqp://[::1/", "AMQP_URL cannot be read"),
        ("http://h1,h2/", "AMQP_URL must start with amqp:// or amqps://, not http://"),
    ],
)
def test_a_node_list_that_cannot_be_followed_is_refused_saying_why(url: str, refusal: str) -> None:
    with pytest.raises(ValueError, match="AMQP_URL") as refused:
        broker_nodes(url)
    assert refusal in str(refused.value)
    assert "p@ss" not in str(refused.value)


def test_the_api_client_reads_one_node_and_refuses_a_list() -> None:
    first = broker_nodes(CLUSTER)[0]
    address = parse_amqp_url(first)
    assert (address.host, address.port, address.user, address.password) == (
        "10.1.0.1",
        5672,
        "api",
        "p@ss",
    )
    assert (address.vhost, address.heartbeat) == ("score-ingest", 30)
    with pytest.raises(UnsupportedBrokerUrl, match="one node at a time"):
        parse_amqp_url(CLUSTER)
    with pytest.raises(UnsupportedBrokerUrl, match="no host"):
        parse_amqp_url("amqp://u:p@h1,,h2/")


def test_the_first_node_written_is_taken_first_then_never_the_same_twice_in_a_row() -> None:
    nodes = BrokerNodes(CLUSTER, random.Random(1))
    assert nodes.address is None
    taken = [nodes.take() for _ in range(60)]
    assert taken[0] == broker_nodes(CLUSTER)[0]
    assert nodes.address == node_address(taken[-1])
    assert all(each != after for each, after in itertools.pairwise(taken)), taken
    assert set(taken) == set(broker_nodes(CLUSTER))


def test_processes_that_lose_the_same_node_spread_over_the_others() -> None:
    # Each api or worker process has nodes of its own: after losing the first node, they do
    # not all move to the same next one (and then on together, losing it together).
    processes = [BrokerNodes(CLUSTER, random.Random(seed)) for seed in range(20)]
    first = {nodes.take() for nodes in processes}
    after_the_loss = Counter(nodes.take() for nodes in processes)
    assert first == {broker_nodes(CLUSTER)[0]}
    assert set(after_the_loss) == set(broker_nodes(CLUSTER)[1:]), after_the_loss
    assert min(after_the_loss.values()) >= 5, after_the_loss


def test_a_node_to_avoid_is_passed_over_unless_it_is_the_only_other_one() -> None:
    urls = broker_nodes(CLUSTER)
    nodes = BrokerNodes(CLUSTER, random.Random(2))
    # The first node written, unless it is to be avoided: then one of the others.
    assert nodes.take(avoid={node_address(urls[0])}) in urls[1:]
    nodes = BrokerNodes(CLUSTER, random.Random(2))
    assert nodes.take() == urls[0]
    avoid = {node_address(urls[1])}
    assert [nodes.take(avoid) for _ in range(6)] == [urls[2], urls[0]] * 3

    two = "amqp://a:5672,b:5672/"
    nodes = BrokerNodes(two, random.Random(3))
    assert nodes.take() == "amqp://a:5672/"
    # The other node is to be avoided, but the one just taken (and lost) is worse.
    assert nodes.take(avoid={"b:5672"}) == "amqp://b:5672/"


class Attempts:
    """A connect function whose nodes refuse until one of them is named the good one."""

    def __init__(self, good: set[str]) -> None:
        self.good = good
        self.tried: list[str] = []

    async def __call__(self, url: str) -> str:
        self.tried.append(url)
        if url not in self.good:
            raise ConnectionRefusedError(f"{url} refused")
        return url


async def test_retrying_goes_to_another_node_after_each_failure() -> None:
    nodes = BrokerNodes(CLUSTER, random.Random(4))
    urls = nodes.urls
    attempts = Attempts({urls[2]})
    assert await retry_until_connected(attempts, (OSError,), nodes) == urls[2]
    assert attempts.tried[0] == urls[0]
    assert attempts.tried[-1] == urls[2]
    assert all(each != after for each, after in itertools.pairwise(attempts.tried))
    assert nodes.address == "10.1.0.3:5672"

    # After that node is lost, the next attempt goes to another one.
    attempts = Attempts({urls[0], urls[1]})
    assert await retry_until_connected(attempts, (OSError,), nodes) in urls[:2]
    assert len(attempts.tried) == 1

    # A node the caller avoids (another connection's) is not tried while another is left.
    attempts = Attempts({urls[0], urls[1]})
    avoid = {node_address(urls[0])}
    assert await retry_until_connected(attempts, (OSError,), nodes, lambda: avoid) == urls[1]


async def test_retrying_lets_other_errors_through() -> None:
    nodes = BrokerNodes(CLUSTER)

    async def refuse(url: str) -> str:
        raise PermissionError(url)

    with pytest.raises(PermissionError):
        await retry_until_connected(refuse, (ConnectionError,), nodes)
    assert nodes.address == "10.1.0.1:5672"


async def test_a_one_off_connection_tries_each_node_once() -> None:
    nodes = BrokerNodes(CLUSTER, random.Random(5))
    attempts = Attempts({nodes.urls[1]})
    assert await connect_to_a_node(attempts, (OSError,), nodes) == nodes.urls[1]
    assert attempts.tried[0] == nodes.urls[0]
    assert attempts.tried[-1] == nodes.urls[1]

    for seed in range(5):
        nodes = BrokerNodes(CLUSTER, random.Random(seed))
        nobody = Attempts(set())
        with pytest.raises(ConnectionRefusedError) as refused:
            await connect_to_a_node(nobody, (OSError,), nodes)
        assert nobody.tried[0] == nodes.urls[0]
        assert sorted(nobody.tried) == sorted(nodes.urls)
        # The error raised is the last node's.
        assert node_address(nobody.tried[-1]) in str(refused.value)
