"""The faults, each under load and bounded in time; which node and when, a seeded Random's choice.

A scenario waits until the cluster is healthy, starts the load, lets it run, strikes at a
moment its Random picks (a fifth to two fifths into the load), holds the fault for a while,
heals it, and keeps the load going until the duration has passed and the service has had
RECOVERY_SECONDS since the heal. Then the load stops and the report counts.

Each scenario's Random is seeded with the run's seed and the scenario's name, so a scenario
makes the same choices whichever others run with it. The nodes they act on (the queue's
leader, a publisher's node) are the cluster's state at the time, read when the fault strikes.
"""

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import httpx

from chaos.load import ChaosLoad
from chaos.postgres import PostgresPair
from chaos.rabbit import RabbitCluster
from chaos.report import (
    GAP_TARGET_BROKER_SECONDS,
    GAP_TARGET_DATABASE_SECONDS,
    ScenarioResult,
    measure,
)
from shared.topology import DEAD_LETTER_QUEUE, QUEUE
from tests.support.processes import ApiProcess, CliProcess

RECOVERY_SECONDS = 5.0


@dataclass(frozen=True)
class Holds:
    """How long a fault lasts (a Random's pick between the bounds): a node down, a node cut
    off, the database without a primary before the standby is promoted (a failover manager's
    delay). A partition outlasts the 10 s target, so that a gap as long as the cut shows."""

    node_down: tuple[float, float] = (2.0, 5.0)
    partition: tuple[float, float] = (12.0, 20.0)
    promotion: tuple[float, float] = (1.0, 3.0)


# A fault longer than this (a node that will not boot) ends the scenario as failed.
FAULT_TIMEOUT_SECONDS = 240.0
HEALTHY_TIMEOUT_SECONDS = 120.0


@dataclass
class Harness:
    """What the scenarios act on: the nodes, the processes, and the key the clients use."""

    cluster: RabbitCluster
    pair: PostgresPair
    apis: Sequence[ApiProcess]
    workers: list[CliProcess]
    # Starts a worker in place of worker i (after it was killed), returning once it consumes.
    start_worker: Callable[[int], Awaitable[CliProcess]]
    api_key: str
    seed: int
    database_url: str
    log: Callable[[str], None] = field(default=print)
    holds: Holds = field(default_factory=Holds)
    # The queue the load's scores go through (its project's shard): the one whose leader a
    # broker fault aims at.
    load_queue: str = QUEUE

    @property
    def queues(self) -> tuple[str, ...]:
        """The queues that must be healthy again after a fault."""
        return tuple(dict.fromkeys((QUEUE, self.load_queue, DEAD_LETTER_QUEUE)))

    def broker_urls(self) -> list[str]:
        """One URL per broker node, for the report's own look at the dead letters."""
        return [self.cluster.node_url(i) for i in range(self.cluster.size)]


Fault = Callable[[Harness, random.Random], Awaitable[str]]


@dataclass(frozen=True)
class Scenario:
    """A fault that breaks and heals (returning what it did), its gap target, and what
    restores redundancy afterwards (before the next scenario needs it)."""

    name: str
    fault: Fault
    gap_target: float
    restore: Callable[[Harness], Awaitable[None]] | None = None


async def _hold(rng: random.Random, bounds: tuple[float, float]) -> float:
    seconds = round(rng.uniform(*bounds), 1)
    await asyncio.sleep(seconds)
    return seconds


async def leader_kill(harness: Harness, rng: random.Random) -> str:
    """kill -9 the node leading the load's queue; boot it again later."""
    cluster = harness.cluster
    leader = await asyncio.to_thread(cluster.leader, harness.load_queue)
    await asyncio.to_thread(cluster.kill, leader)
    held = await _hold(rng, harness.holds.node_down)
    await asyncio.to_thread(cluster.start_node, leader)
    return f"kill -9 node {leader} (leader of {harness.load_queue}), booted again after {held} s"


async def leader_partition(harness: Harness, rng: random.Random) -> str:
    """Cut the node leading the load's queue off from the others; heal it later."""
    cluster = harness.cluster
    leader = await asyncio.to_thread(cluster.leader, harness.load_queue)
    await asyncio.to_thread(cluster.partition, leader)
    held = await _hold(rng, harness.holds.partition)
    await asyncio.to_thread(cluster.heal, leader)
    return f"partitioned node {leader} (leader of {harness.load_queue}) for {held} s"


async def publisher_node_stop(harness: Harness, rng: random.Random) -> str:
    """Stop the node an api's publisher is connected to (its /readyz says which)."""
    cluster = harness.cluster
    api = rng.randrange(len(harness.apis))
    address = await _publisher_node(harness.apis[api])
    node = next(i for i in range(cluster.size) if cluster.node_address(i) == address)
    await asyncio.to_thread(cluster.stop, node)
    held = await _hold(rng, harness.holds.node_down)
    await asyncio.to_thread(cluster.start_node, node)
    return f"stopped node {node} (api {api}'s publisher's), started again after {held} s"


async def _publisher_node(api: ApiProcess) -> str:
    async with httpx.AsyncClient(base_url=api.base_url, timeout=5) as client:
        body = (await client.get("/readyz")).json()
    broker = body.get("broker") or {}
    if not broker.get("connected") or not broker.get("node"):
        raise RuntimeError(f"api at {api.base_url} names no connected broker node: {body}")
    return str(broker["node"])


async def rolling_restart(harness: Harness, rng: random.Random) -> str:
    """Stop and start each node in turn, waiting until the cluster is healthy in between."""
    cluster = harness.cluster
    order = list(range(cluster.size))
    rng.shuffle(order)
    for node in order:
        await asyncio.to_thread(cluster.stop, node)
        await asyncio.to_thread(cluster.start_node, node)
        await asyncio.to_thread(cluster.wait_healthy, harness.queues, "/", HEALTHY_TIMEOUT_SECONDS)
    return f"restarted nodes {order} one at a time"


async def db_failover(harness: Harness, rng: random.Random) -> str:
    """Stop the PostgreSQL primary as a crash; promote the standby a moment later."""
    pair = harness.pair
    old = pair.primary
    await asyncio.to_thread(pair.stop_primary)
    held = await _hold(rng, harness.holds.promotion)
    await asyncio.to_thread(pair.promote_standby)
    return f"crashed primary {old}, promoted standby {pair.primary} after {held} s"


async def _rebuild_standby(harness: Harness) -> None:
    await asyncio.to_thread(harness.pair.rebuild_standby)


async def worker_kill_with_broker_fault(harness: Harness, rng: random.Random) -> str:
    """SIGKILL a worker at the moment a broker node is killed; then a new worker, the node back."""
    cluster = harness.cluster
    victim = rng.randrange(len(harness.workers))
    node = rng.randrange(cluster.size)
    await asyncio.gather(harness.workers[victim].kill(), asyncio.to_thread(cluster.kill, node))
    held = await _hold(rng, harness.holds.node_down)
    _, harness.workers[victim] = await asyncio.gather(
        asyncio.to_thread(cluster.start_node, node), harness.start_worker(victim)
    )
    return f"SIGKILL worker {victim} and kill -9 node {node}; both back after {held} s"


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("leader-kill", leader_kill, GAP_TARGET_BROKER_SECONDS),
    Scenario("leader-partition", leader_partition, GAP_TARGET_BROKER_SECONDS),
    Scenario("publisher-node-stop", publisher_node_stop, GAP_TARGET_BROKER_SECONDS),
    Scenario("rolling-restart", rolling_restart, GAP_TARGET_BROKER_SECONDS),
    Scenario("db-failover", db_failover, GAP_TARGET_DATABASE_SECONDS, _rebuild_standby),
    Scenario(
        "worker-kill-with-broker-fault", worker_kill_with_broker_fault, GAP_TARGET_BROKER_SECONDS
    ),
)
BY_NAME = {scenario.name: scenario for scenario in SCENARIOS}


async def run_scenario(harness: Harness, scenario: Scenario, duration: float) -> ScenarioResult:
    """Wait until the cluster is healthy and both apis ready, then the fault under load; its
    result once the scores are counted."""
    rng = random.Random(f"{harness.seed}-{scenario.name}")
    await asyncio.to_thread(
        harness.cluster.wait_healthy, harness.queues, "/", HEALTHY_TIMEOUT_SECONDS
    )
    for api in harness.apis:
        await api.wait_until_ready(HEALTHY_TIMEOUT_SECONDS)
    run_id = f"chaos-{harness.seed}-{scenario.name}-{uuid.uuid4().hex[:8]}"
    strike = round(rng.uniform(0.2, 0.4) * duration, 1)
    harness.log(f"{scenario.name}: load for {duration} s, fault at {strike} s")
    loop = asyncio.get_running_loop()
    load = ChaosLoad([api.base_url for api in harness.apis], harness.api_key, run_id)
    async with load:
        await asyncio.sleep(strike)
        fault_failed: str | None = None
        try:
            what = await asyncio.wait_for(scenario.fault(harness, rng), FAULT_TIMEOUT_SECONDS)
        except Exception as exc:  # the report says so; the scores still get counted
            fault_failed = what = f"the fault failed: {exc!r}"
        what = f"at {strike} s: {what}"
        healed = loop.time()
        until = max(load.record.started + duration, healed + RECOVERY_SECONDS)
        await asyncio.sleep(max(0.0, until - loop.time()))
    harness.log(f"{scenario.name}: {what}; counting")
    result = await measure(
        scenario.name,
        what,
        run_id,
        load.record,
        database_url=harness.database_url,
        broker_urls=harness.broker_urls(),
        gap_target=scenario.gap_target,
        fault_failed=fault_failed,
    )
    if scenario.restore is not None:
        await scenario.restore(harness)
    return result
