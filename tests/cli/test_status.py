"""`score-ingest status` as an operator runs it: against a running api and worker, a backlog
nobody consumes, dead letters, and broker nodes and endpoints that are down."""

import asyncio
import json
import subprocess
from typing import Any

import aio_pika
import asyncpg
import httpx

from shared.broker import broker_nodes, node_address
from shared.contract import CONTENT_TYPE, MESSAGE_TYPE
from shared.settings import Settings
from shared.topology import DEAD_LETTER_QUEUE, QUEUE, persist_queues, shard_of, shard_queue
from tests.conftest import ENTITY, PROJECT, basic_auth, score_body
from tests.support.processes import (
    WORKER_READY_LINE,
    CliProcess,
    api_process,
    connect_broker,
    run_cli,
    worker_process,
)
from tests.support.services import free_port, with_nodes

SCORES_PATH = f"/v2/{ENTITY}/{PROJECT}/scores"
NEWEST_STORED_AGE = """
SELECT extract(epoch FROM clock_timestamp() - created_at)::float8
FROM scores ORDER BY score_id DESC LIMIT 1
"""


async def status(settings: Settings, *args: str) -> tuple[int, str]:
    """Run `score-ingest status args`; its exit code and stdout."""
    done: subprocess.CompletedProcess[str] = await asyncio.to_thread(
        run_cli, settings, "status", *args
    )
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, done.stdout


async def status_json(settings: Settings, *args: str) -> tuple[int, dict[str, Any]]:
    """`status --json`: its exit code and what it printed, parsed."""
    code, out = await status(settings, "--json", *args)
    found = json.loads(out)
    assert isinstance(found, dict)
    assert found["ok"] is (code == 0), found
    return code, found


def queue(found: dict[str, Any], name: str) -> dict[str, Any]:
    """One queue's entry of a status."""
    (entry,) = (q for q in found["queues"] if q["queue"] == name)
    assert isinstance(entry, dict)
    return entry


def health_url(worker: CliProcess) -> str:
    """Where a worker started on a free health port serves, from its ready line."""
    for line in worker.output.splitlines():
        if WORKER_READY_LINE in line:
            return f"http://127.0.0.1:{json.loads(line)['health_port']}"
    raise worker.failure("printed no ready line with its health port")


async def post_scores(base_url: str, key: str, count: int) -> None:
    """Post count scores through the api; each must be answered 200."""
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        for _ in range(count):
            response = await client.post(SCORES_PATH, json=score_body(), headers=basic_auth(key))
            assert response.status_code == 200, response.text


async def test_status_of_a_running_stack_then_a_dead_letter_then_a_backlog_without_workers(
    settings: Settings, api_key: str, db: asyncpg.Connection
) -> None:
    # Unsharded: the oldest unstored score's bound holds with one persist queue only.
    settings = settings.model_copy(update={"queue_shards": 0})
    async with connect_broker(settings) as broker, api_process(settings) as api:
        async with worker_process(settings) as worker:
            worker_url = health_url(worker)
            await post_scores(api.base_url, api_key, 3)
            await wait_until_stored(db, 3)
            endpoints = ("--api", api.base_url, "--worker", worker_url)

            code, found = await status_json(settings, *endpoints)
            assert code == 0, found
            assert found["problems"] == []
            assert [node["reachable"] for node in found["broker_nodes"]] == [True]
            assert found["database"]["reachable"] is True
            assert queue(found, QUEUE)["consumers"] >= 1
            assert queue(found, DEAD_LETTER_QUEUE)["ready"] == 0
            assert found["dead_letters"] == {"total": 0, "by_reason": {}, "note": None}
            assert found["oldest_unstored"]["age_seconds"] == 0.0
            assert [(e["role"], e["healthz"], e["readyz"]) for e in found["endpoints"]] == [
                ("api", 200, 200),
                ("worker", 200, 200),
            ]
            assert [e["readiness"] for e in found["endpoints"]] == ["ready", "ready"]

            # A message no worker can store: the worker dead-letters it.
            await broker.publish(
                [
                    aio_pika.Message(
                        b'{"score_id": "not one"}', content_type=CONTENT_TYPE, type=MESSAGE_TYPE
                    )
                ]
            )
            assert await broker.wait_for_ready_count(DEAD_LETTER_QUEUE, 1) == 1
            code, found = await status_json(settings, *endpoints)
            assert code == 1
            assert found["problems"] == [f"{DEAD_LETTER_QUEUE} holds 1 dead letter(s)"]
            assert found["dead_letters"]["by_reason"] == {"schema_violation": 1}
            assert await broker.ready_count(DEAD_LETTER_QUEUE) == 1, "status took no letter"
            # Over the bound, the letters are counted and not read.
            code, found = await status_json(settings, "--dead-letters", "0")
            assert found["dead_letters"]["total"] == 1
            assert found["dead_letters"]["by_reason"] is None
            assert "dlq list" in found["dead_letters"]["note"]

            assert len(await broker.take_dead_letters(1)) == 1
            code, table = await status(settings, *endpoints)
            assert code == 0, table
            assert "score-ingest status" in table
            assert f"worker {worker_url}" in table
            assert table.rstrip().endswith("OK")

        # The worker is gone: scores wait in scores.persist, and nobody consumes them.
        await post_scores(api.base_url, api_key, 2)
        assert await broker.wait_for_ready_count(QUEUE, 2) == 2
        await asyncio.sleep(1.0)  # the oldest waiting score ages
        at_least = await db.fetchval(NEWEST_STORED_AGE)
        code, found = await status_json(settings, "--api", api.base_url, "--max-age", "0.5")
        at_most = await db.fetchval(NEWEST_STORED_AGE)

    assert code == 1
    persist = queue(found, QUEUE)
    assert (persist["ready"], persist["consumers"]) == (2, 0)
    assert persist["ready_change_per_second"] == 0.0, "nothing published while it sampled"
    age = found["oldest_unstored"]["age_seconds"]
    assert at_least - 0.1 <= age <= at_most + 0.1
    assert found["oldest_unstored"]["too_old"] is True
    assert found["problems"] == [
        f"{QUEUE} has 2 ready message(s) and no consumer",
        f"the oldest unstored score is up to {age:g} s old (--max-age 0.5)",
    ]


async def test_status_lists_every_shard_and_knows_no_age_bound_while_shards_hold_scores(
    settings: Settings, api_key: str
) -> None:
    settings = settings.model_copy(update={"queue_shards": 3})
    shard = shard_queue(shard_of(ENTITY, PROJECT, 3))
    async with connect_broker(settings) as broker, api_process(settings) as api:
        await post_scores(api.base_url, api_key, 2)
        assert await broker.wait_for_ready_count(shard, 2) == 2
        code, found = await status_json(settings, "--api", api.base_url)
        # Nothing is left in the shard for a later test, which may run unsharded.
        assert len(await broker.take(shard, 2)) == 2

    assert code == 1
    names = [q["queue"] for q in found["queues"]]
    assert names == [QUEUE, *(shard_queue(i) for i in range(3)), DEAD_LETTER_QUEUE]
    assert (queue(found, shard)["ready"], queue(found, shard)["consumers"]) == (2, 0)
    assert found["oldest_unstored"]["age_seconds"] is None
    assert found["oldest_unstored"]["basis"].startswith("unknown: 2 message(s) wait in 4 queues")
    assert found["problems"] == [f"{shard} has 2 ready message(s) and no consumer"]


async def wait_until_stored(db: asyncpg.Connection, count: int) -> None:
    """Wait until the scores table holds count rows."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while await db.fetchval("SELECT count(*) FROM scores") != count:
        assert loop.time() < deadline, f"{count} scores not stored within 20 s"
        await asyncio.sleep(0.05)


async def test_status_with_the_broker_stopped_and_an_endpoint_down(settings: Settings) -> None:
    down = f"127.0.0.1:{free_port()}"
    stopped = settings.model_copy(update={"amqp_url": with_nodes(settings.amqp_url, down)})
    api_down = f"http://127.0.0.1:{free_port()}"

    code, found = await status_json(stopped, "--api", api_down, "--timeout", "2")

    assert code == 1
    (node,) = found["broker_nodes"]
    assert (node["node"], node["reachable"]) == (down, False)
    assert found["database"]["reachable"] is True, "the database is looked at all the same"
    queues = [*persist_queues(settings), DEAD_LETTER_QUEUE]
    assert [q["queue"] for q in found["queues"]] == queues
    assert [q["error"] for q in found["queues"]] == ["no broker node reachable"] * len(queues)
    assert found["oldest_unstored"]["age_seconds"] is None
    assert found["endpoints"][0]["error"] is not None
    assert found["problems"][0].startswith(f"broker node {down} unreachable: ")
    assert f"api {api_down} unreachable: " in found["problems"][-1]

    code, table = await status(stopped)
    assert code == 1
    assert "DOWN" in table
    assert table.rstrip().endswith("problem(s)")


async def test_status_reads_the_queues_through_a_node_that_answers(settings: Settings) -> None:
    real = node_address(broker_nodes(settings.amqp_url)[0])
    down = f"127.0.0.1:{free_port()}"
    several = settings.model_copy(update={"amqp_url": with_nodes(settings.amqp_url, down, real)})

    code, found = await status_json(several)

    assert code == 1
    assert [(n["node"], n["reachable"]) for n in found["broker_nodes"]] == [
        (down, False),
        (real, True),
    ]
    assert [q["ready"] for q in found["queues"]] == [0] * (len(persist_queues(settings)) + 1)
    assert len(found["problems"]) == 1, found["problems"]
    assert found["problems"][0].startswith(f"broker node {down} unreachable")


async def test_status_says_which_queue_is_not_declared(settings: Settings) -> None:
    bare = settings.model_copy(update={"database_url": settings.database_url + "_missing"})
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(DEAD_LETTER_QUEUE)
    try:
        code, found = await status_json(bare)
    finally:
        async with connect_broker(settings):  # declares the topology again
            pass

    assert code == 1
    assert queue(found, QUEUE)["error"] is None
    assert queue(found, DEAD_LETTER_QUEUE)["error"].startswith("not declared (NOT_FOUND")
    assert found["dead_letters"]["note"] == "scores.dead could not be read"
    assert found["database"]["reachable"] is False
    assert any(p.startswith("database: ") for p in found["problems"])
