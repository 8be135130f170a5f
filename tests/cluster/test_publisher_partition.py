"""An api posting alone through a partition of the queue's leader answers 200 again before the
partition heals.

On RabbitMQ 3.10, while the node leading scores.persist is cut off from the other two, a
channel whose first publish to the queue comes before they have noticed the cut (net_ticktime:
15-25 s here) is never told of the new leader: its publishes go unconfirmed, then nacked, until
the partition heals. A new channel is confirmed at once. Here the api's publisher is connected
to a node of the majority before the cut and publishes first after it, so its channel is
stuck: without the publisher replacing a connection whose publishes are nacked (api/publisher.py,
STUCK_SECONDS), it answers 503 for the whole partition while its /readyz says ready. A client
that retries on another api hides it, so the api is posted to alone. Every score answered 200
is then stored exactly once, by a worker started after the heal.
"""

import asyncio
import itertools
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import pytest

from api.publisher import STUCK_SECONDS
from chaos.rabbit import RabbitCluster
from shared.settings import Settings
from shared.topology import DEAD_LETTER_QUEUE, QUEUE, declare_topology_once
from tests.conftest import ENTITY, PROJECT, basic_auth, score_body
from tests.support.load import assert_stored_exactly_once
from tests.support.processes import api_process, worker_process

# Boots a broker of its own: never a unit test, whatever fixtures it uses.
pytestmark = pytest.mark.fault

SCORES_PATH = f"/v2/{ENTITY}/{PROJECT}/scores"
CLIENTS = 4
# The longest the cut lasts; it is healed as soon as the api has recovered.
PARTITION_SECONDS = 60.0
# The majority notices the cut within 1.25 net ticktimes (25 s, chaos/rabbit.py); then the
# stuck connection's publishes are nacked, and it is replaced within STUCK_SECONDS.
RECOVERY_BOUND_SECONDS = 25.0 + STUCK_SECONDS + 7.0
# 200s in a row that count as recovered.
RECOVERED_AFTER_OKS = 20
RETRY_PAUSE_SECONDS = 0.1


@dataclass
class Answers:
    """Every answer the clients got after the cut: (event loop time, status or error)."""

    since: float
    seen: list[tuple[float, int | str]] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)

    def timeline(self) -> str:
        """The answers per second since the cut, for a failure message."""
        seconds: dict[int, set[int | str]] = {}
        for at, status in self.seen:
            seconds.setdefault(int(at - self.since), set()).add(status)
        return " ".join(f"{s}:{sorted(map(str, v))}" for s, v in sorted(seconds.items()))

    def recovered_at(self) -> float | None:
        """When the first of RECOVERED_AFTER_OKS 200s in a row (after a failure) was answered."""
        run: list[float] = []
        failed = False
        for at, status in self.seen:
            if status != 200:
                failed, run = True, []
                continue
            run.append(at)
            if failed and len(run) == RECOVERED_AFTER_OKS:
                return run[0]
        return None


async def _post_until_stopped(
    http: httpx.AsyncClient, key: str, answers: Answers, client: int, stop: asyncio.Event
) -> None:
    loop = asyncio.get_running_loop()
    for n in itertools.count():
        if stop.is_set():
            return
        body = score_body(prediction_id=f"partition-{client}-{n}")
        try:
            response = await http.post(SCORES_PATH, json=body, headers=basic_auth(key))
        except httpx.TransportError as exc:
            answers.seen.append((loop.time(), type(exc).__name__))
        else:
            answers.seen.append((loop.time(), response.status_code))
            if response.status_code == 200:
                answers.accepted.append(response.json()["score_id"])
                continue
            assert response.status_code == 503, (response.status_code, response.text)
        await asyncio.sleep(RETRY_PAUSE_SECONDS)


@pytest.fixture
def cluster() -> Iterator[RabbitCluster]:
    """Three nodes, in a directory the rabbitmq user can reach; removed afterwards."""
    workdir = Path(tempfile.mkdtemp(prefix="score-ingest-partition-"))
    try:
        with RabbitCluster(workdir) as running:
            yield running
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _url_from(cluster: RabbitCluster, first: int) -> str:
    """The cluster's nodes, listed from node `first` on."""
    order = [(first + k) % cluster.size for k in range(cluster.size)]
    return f"amqp://guest:guest@{','.join(cluster.node_address(i) for i in order)}/"


async def test_an_api_stuck_by_a_partition_of_the_leader_answers_200_before_the_heal(
    cluster: RabbitCluster, settings: Settings, db: asyncpg.Connection, api_key: str
) -> None:
    on_cluster = settings.model_copy(update={"amqp_url": cluster.amqp_url})
    await declare_topology_once(on_cluster, 10)
    await asyncio.to_thread(cluster.wait_healthy, [QUEUE, DEAD_LETTER_QUEUE], "/", 60)
    leader = await asyncio.to_thread(cluster.leader, QUEUE)
    first, second = (i for i in range(cluster.size) if i != leader)
    api_settings = on_cluster.model_copy(update={"amqp_url": _url_from(cluster, first)})
    loop = asyncio.get_running_loop()

    async with (
        api_process(api_settings) as api,
        httpx.AsyncClient(base_url=api.base_url, timeout=30) as http,
    ):
        await api.wait_until_ready()
        await asyncio.to_thread(cluster.partition, leader)
        answers = Answers(since=loop.time())
        stop = asyncio.Event()
        clients = [
            asyncio.create_task(_post_until_stopped(http, api_key, answers, n, stop))
            for n in range(CLIENTS)
        ]
        try:
            deadline = answers.since + PARTITION_SECONDS
            while answers.recovered_at() is None and loop.time() < deadline:
                await asyncio.sleep(0.2)
        finally:
            healed_after = loop.time() - answers.since
            await asyncio.to_thread(cluster.heal, leader)
            stop.set()
            await asyncio.gather(*clients)

    recovered = answers.recovered_at()
    failures = sum(1 for _, status in answers.seen if status != 200)
    print(
        f"\npartition of leader {leader}; api on node {first} (stuck channel): "
        f"recovered after {None if recovered is None else round(recovered - answers.since, 1)} s, "
        f"healed after {healed_after:.1f} s; {failures} answers other than 200, "
        f"{len(answers.accepted)} scores accepted"
    )
    assert failures, "the cut never showed: the test no longer stages a stuck publisher"
    assert recovered is not None, f"503 until the heal: {answers.timeline()}"
    assert recovered - answers.since < RECOVERY_BOUND_SECONDS, answers.timeline()

    worker_settings = on_cluster.model_copy(update={"amqp_url": _url_from(cluster, second)})
    async with worker_process(worker_settings):
        # A publish answered 503 (a timeout or a nack) may have been stored all the same.
        await assert_stored_exactly_once(db, answers.accepted, unanswered_allowed=failures)
