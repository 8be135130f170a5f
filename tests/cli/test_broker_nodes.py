"""The CLI's broker commands with an AMQP_URL listing several nodes: the first that answers."""

import subprocess

from shared.broker import broker_nodes, node_address
from shared.settings import Settings
from tests.support.processes import run_cli
from tests.support.services import free_port, with_nodes


def cli(settings: Settings, amqp_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `score-ingest args` with this AMQP_URL."""
    return run_cli(settings.model_copy(update={"amqp_url": amqp_url}), *args)


def test_topology_and_dlq_use_the_first_node_that_answers(settings: Settings) -> None:
    real = node_address(broker_nodes(settings.amqp_url)[0])
    down = f"127.0.0.1:{free_port()}"
    several = with_nodes(settings.amqp_url, down, real)

    declared = cli(settings, several, "topology")
    assert declared.returncode == 0, declared.stderr
    assert "topology declared" in declared.stdout
    assert f"broker node {down} not reachable" in declared.stderr

    listed = cli(settings, several, "dlq", "list")
    assert listed.returncode == 0, listed.stderr


def test_a_command_fails_when_no_node_answers(settings: Settings) -> None:
    ports = [free_port(), free_port()]
    refused = cli(
        settings, with_nodes(settings.amqp_url, *(f"127.0.0.1:{p}" for p in ports)), "topology"
    )
    assert refused.returncode != 0
    assert f"broker node 127.0.0.1:{ports[0]} not reachable" in refused.stderr
    # The error shown is the last node's.
    assert f"Connect call failed ('127.0.0.1', {ports[1]})" in refused.stderr


def test_a_node_list_it_cannot_read_is_refused(settings: Settings) -> None:
    refused = cli(settings, with_nodes(settings.amqp_url, "127.0.0.1:5672", ""), "topology")
    assert refused.returncode != 0
    assert "AMQP_URL lists a node with no host" in refused.stderr
