"""Tombstones across projects and their purge; the same per-score limits at every door; and
messages that stay below the broker's max_message_size however many scores the api groups.

Real RabbitMQ, PostgreSQL, api app and worker throughout; the message-size tests run on a
RabbitMQ node of their own, whose max_message_size they lower.
"""

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import asyncpg
import httpx
import pytest
from prometheus_client import REGISTRY
from pydantic_core import to_json

from shared.contract import (
    BATCH_MESSAGE_TYPE,
    CONTENT_TYPE,
    MAX_SCORE_MESSAGE_BYTES,
    MAX_VALUE_BYTES,
    MESSAGE_TYPE,
)
from shared.dead_letters import DETAIL_HEADER, REASON_HEADER, DeadLetterReason
from shared.ids import new_score_id
from shared.settings import Settings
from shared.topology import API_EXCHANGE, DEAD_LETTER_QUEUE, QUEUE
from tests.conftest import (
    ENTITY,
    OWN_NODE_MAX_MESSAGE_BYTES,
    PROJECT,
    basic_auth,
    client_for,
    running_app,
    score_body,
    wait_for_count,
)
from tests.support.processes import Broker, connect_broker, running_worker, score_message
from tests.support.rabbitmq_node import RabbitMQNode

OTHER_ENTITY = "globex"
OTHER_PROJECT = "elsewhere"
CASE_HEADER = "x-test-case"
STORED_IDS = "SELECT score_id FROM scores"
TOMBSTONES = "SELECT score_id, entity, project FROM score_tombstones"
_SCHEMA = DeadLetterReason.SCHEMA_VIOLATION


def fields(**changes: Any) -> dict[str, Any]:
    """A valid score's message fields as JSON values, with changes (which may break it)."""
    body: dict[str, Any] = json.loads(score_message().model_dump_json())
    body.update(changes)
    return body


def of_entity(entity: str, project: str = PROJECT, **changes: Any) -> dict[str, Any]:
    """Message fields of a score of entity/project, its scorer the entity's own."""
    scorer = f"weave:///{entity}/{project}/op/exact_match:abc123"
    return fields(entity=entity, project=project, scorer=scorer, **changes)


def message(case: str, body: Any, *, batch: bool = False) -> aio_pika.Message:
    """A message as a direct publisher sends it (and as the api does)."""
    return aio_pika.Message(
        body=to_json(body),
        content_type=CONTENT_TYPE,
        type=BATCH_MESSAGE_TYPE if batch else MESSAGE_TYPE,
        message_id=str(uuid.uuid4()),
        headers={CASE_HEADER: case},
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


async def stored_ids(db: asyncpg.Connection) -> set[str]:
    return {str(row["score_id"]) for row in await db.fetch(STORED_IDS)}


async def tombstones(db: asyncpg.Connection) -> dict[str, tuple[str, str]]:
    return {
        str(row["score_id"]): (row["entity"], row["project"]) for row in await db.fetch(TOMBSTONES)
    }


async def delete(client: httpx.AsyncClient, key: str, project: str, ids: list[str]) -> int:
    response = await client.delete(
        f"/v2/{ENTITY}/{project}/scores", params={"score_ids": ids}, headers=basic_auth(key)
    )
    assert response.status_code == 200, response.text
    deleted: int = response.json()["num_deleted"]
    return deleted


async def drain(settings: Settings, broker: Broker, db: asyncpg.Connection, rows: int) -> None:
    """Run a worker until it stored rows scores and took every message (acked: the queue
    stays empty once it stopped and returned whatever it held unacked)."""
    async with running_worker(settings):
        assert await wait_for_count(db, "SELECT count(*) FROM scores", rows) == rows
        assert await broker.wait_for_ready_count(QUEUE, 0) == 0
    await broker.assert_stays_empty(QUEUE)


# Tombstones ------------------------------------------------------------------------------------


async def test_an_id_deleted_while_queued_stays_out_of_every_project_of_its_entity_only(
    client: httpx.AsyncClient, api_key: str, db: asyncpg.Connection, settings: Settings
) -> None:
    republished, others, control = (str(new_score_id()) for _ in range(3))
    assert await delete(client, api_key, PROJECT, [republished, others]) == 0
    assert await tombstones(db) == {
        republished: (ENTITY, PROJECT),
        others: (ENTITY, PROJECT),
    }

    async with connect_broker(settings) as broker:
        await broker.publish(
            [
                # Deleted in acme/evals, published again under another project of acme.
                message("republished", of_entity(ENTITY, OTHER_PROJECT, score_id=republished)),
                # Another entity's score with that id: acme's delete cannot keep it out.
                message("others", of_entity(OTHER_ENTITY, score_id=others)),
                message("control", of_entity(ENTITY, OTHER_PROJECT, score_id=control)),
            ]
        )
        await drain(settings, broker, db, 2)
        assert await broker.ready_count(DEAD_LETTER_QUEUE) == 0
    assert await stored_ids(db) == {others, control}


async def test_a_delete_leaves_no_tombstone_for_an_id_stored_elsewhere_or_not_a_uuid7(
    client: httpx.AsyncClient, api_key: str, db: asyncpg.Connection, settings: Settings
) -> None:
    stored_elsewhere, queued = str(new_score_id()), str(new_score_id())
    async with connect_broker(settings) as broker:
        await broker.publish(
            [message("theirs", of_entity(ENTITY, OTHER_PROJECT, score_id=stored_elsewhere))]
        )
        await drain(settings, broker, db, 1)

    not_uuid7 = str(uuid.uuid4())
    assert await delete(client, api_key, PROJECT, [stored_elsewhere, not_uuid7, queued]) == 0
    assert await tombstones(db) == {queued: (ENTITY, PROJECT)}
    assert await stored_ids(db) == {stored_elsewhere}


async def test_the_worker_purges_tombstones_older_than_their_ttl(
    db: asyncpg.Connection, settings: Settings
) -> None:
    expired, recent = str(new_score_id()), str(new_score_id())
    now = datetime.now(UTC)
    await db.executemany(
        "INSERT INTO score_tombstones (score_id, entity, project, deleted_at) "
        "VALUES ($1, $2, $3, $4)",
        [(expired, ENTITY, PROJECT, now - timedelta(hours=2)), (recent, ENTITY, PROJECT, now)],
    )
    hour = settings.model_copy(update={"tombstone_ttl_seconds": 3600})

    async with connect_broker(hour) as broker:
        async with running_worker(hour):
            # The worker's periodic chore runs once as it starts.
            gone = "SELECT count(*) FROM score_tombstones WHERE score_id = $1"
            assert await wait_for_count(db, gone, 0, expired) == 0
        assert set(await tombstones(db)) == {recent}

        # A forgotten delete no longer keeps its id out; a remembered one does.
        await broker.publish(
            [
                message("expired", of_entity(ENTITY, score_id=expired)),
                message("recent", of_entity(ENTITY, score_id=recent)),
            ]
        )
        await drain(hour, broker, db, 1)
    assert await stored_ids(db) == {expired}


# The same per-score limits at every door ------------------------------------------------------


async def test_direct_publishers_meet_the_apis_limits_and_unknown_fields_are_refused(
    db: asyncpg.Connection, settings: Settings
) -> None:
    # The smallest message limit there can be: one score at its largest.
    settings = settings.model_copy(update={"broker_max_message_bytes": MAX_SCORE_MESSAGE_BYTES})
    at_limit = of_entity(ENTITY, value="v" * (MAX_VALUE_BYTES - 2))  # quotes make the limit
    too_big = "v" * (MAX_VALUE_BYTES - 1)
    sent = {
        "value-too-big": (message("value-too-big", fields(value=too_big)), "value: takes"),
        "batch-item-too-big": (
            message(
                "batch-item-too-big", {"scores": [fields(), fields(value=too_big)]}, batch=True
            ),
            "scores.1.value: takes",
        ),
        # Bodies larger than any valid message of their type are refused before parsing.
        "body-larger-than-a-score": (
            message("body-larger-than-a-score", fields(value="v" * (2 * MAX_VALUE_BYTES))),
            f"more than a score.create.v1 message may ({MAX_SCORE_MESSAGE_BYTES})",
        ),
        "batch-larger-than-the-message-limit": (
            message(
                "batch-larger-than-the-message-limit",
                {"scores": [fields(value="v" * (MAX_VALUE_BYTES // 2))] * 3},
                batch=True,
            ),
            f"more than a score.batch.v1 message may ({MAX_SCORE_MESSAGE_BYTES})",
        ),
        "unknown-field": (message("unknown-field", fields(extra=1)), "extra: Extra inputs"),
        "scorer-of-another-entity": (
            message("scorer-of-another-entity", fields(scorer="weave:///globex/p/op/f:1")),
            "scorer: must name an object or op of entity 'acme', not of 'globex'",
        ),
        "bidi-override-in-entity": (
            message("bidi-override-in-entity", of_entity("ac\u202eme")),
            "entity: must not contain",
        ),
        "dot-dot-project": (message("dot-dot-project", of_entity(ENTITY, "..")), "project:"),
    }
    # Through the api's exchange, a body with a field of no contract's is not in the api's
    # shape: it is validated in full, and refused, like anyone else's.
    through_api = {
        "api-exchange-unknown-field": (
            message("api-exchange-unknown-field", fields(extra=1)),
            "extra: Extra inputs",
        ),
        "api-exchange-batch-unknown-field": (
            message(
                "api-exchange-batch-unknown-field", {"scores": [fields()], "more": 1}, batch=True
            ),
            "more: Extra inputs",
        ),
    }
    async with connect_broker(settings) as broker:
        await broker.publish([message("at-limit", at_limit), *(sent[case][0] for case in sent)])
        await broker.publish((each for each, _ in through_api.values()), API_EXCHANGE)
        sent.update(through_api)
        await drain(settings, broker, db, 1)
        dead = await broker.take_dead_letters(len(sent))
        assert await broker.take_dead_letters(1, timeout=0.2) == []

    assert await stored_ids(db) == {at_limit["score_id"]}
    by_case = {str(letter.headers[CASE_HEADER]): letter.headers for letter in dead}
    assert sorted(by_case) == sorted(sent)
    for case, (_, needle) in sent.items():
        assert by_case[case][REASON_HEADER] == _SCHEMA, (case, by_case[case])
        assert needle in str(by_case[case][DETAIL_HEADER]), (case, by_case[case])


async def test_the_api_refuses_the_same_with_a_422_that_points_at_it(
    client: httpx.AsyncClient, api_key: str, db: asyncpg.Connection, settings: Settings
) -> None:
    url = f"/v2/{ENTITY}/{PROJECT}/scores"
    foreign = "weave:///globex/p/op/f:1"
    batch_url = f"{url}/batch"
    big = score_body(value="v" * (MAX_VALUE_BYTES - 1))
    cases: list[tuple[str, dict[str, Any], dict[str, str], list[str | int], str]] = [
        # The fast path and the routes (an Idempotency-Key takes the routes) answer alike.
        (url, score_body(scorer=foreign), {}, ["body", "scorer"], "scorer_entity"),
        (url, score_body(scorer=foreign), {"Idempotency-Key": "k1"}, ["body", "scorer"], ""),
        (
            batch_url,
            {"scores": [score_body(), score_body(), score_body(scorer=foreign)]},
            {},
            ["body", "scores", 2, "scorer"],
            "scorer_entity",
        ),
        (batch_url, {"scores": [score_body(), big]}, {}, ["body", "scores", 1, "value"], ""),
        ("/v2/ac%E2%80%AEme/evals/scores", score_body(), {}, ["path", "entity"], "name_chars"),
        (f"/v2/{ENTITY}/%20evals/scores", score_body(), {}, ["path", "project"], ""),
        (f"/v2/{ENTITY}/%2E%2E/scores", score_body(), {}, ["path", "project"], "name_dots"),
    ]
    for target, body, extra, loc, kind in cases:
        response = await client.post(
            target,
            content=to_json(body),
            headers={**basic_auth(api_key), "Content-Type": "application/json", **extra},
        )
        assert response.status_code == 422, (target, response.text)
        errors = response.json()["detail"]
        assert [error["loc"] for error in errors] == [loc], (target, errors)
        assert not kind or errors[0]["type"] == kind, (target, errors)
    async with connect_broker(settings) as broker:
        assert await broker.ready_count(QUEUE) == 0


# Messages below the broker's max_message_size --------------------------------------------------


NEAR_MIB = 1_000_000  # a value that leaves a single score's body just under MAX_BODY_BYTES


@pytest.fixture
def small_broker(settings: Settings, own_node: RabbitMQNode) -> Settings:
    """Settings on the tests' own node, whose max_message_size is lowered (which no test may
    do to the machine's node), the api told the broker's limit."""
    return settings.model_copy(
        update={
            "amqp_url": own_node.amqp_url,
            "broker_max_message_bytes": OWN_NODE_MAX_MESSAGE_BYTES,
        }
    )


def messages_confirmed() -> float:
    return REGISTRY.get_sample_value("score_ingest_publish_confirm_seconds_count") or 0.0


async def test_near_mib_posts_at_once_and_a_big_batch_are_all_accepted_and_stored(
    small_broker: Settings, api_key: str, db: asyncpg.Connection
) -> None:
    singles, batched = 24, 12  # 24 MB and 12 MB of scores, for a broker taking 4 MiB at most
    before = messages_confirmed()
    async with running_app(small_broker) as application, client_for(application) as client:
        answers = await asyncio.gather(
            *(
                client.post(
                    f"/v2/{ENTITY}/{PROJECT}/scores",
                    json=score_body(value="s" * NEAR_MIB, prediction_id=f"single-{n}"),
                    headers=basic_auth(api_key),
                )
                for n in range(singles)
            )
        )
        assert [answer.status_code for answer in answers] == [200] * singles, [
            answer.text for answer in answers if answer.status_code != 200
        ]
        grouped = messages_confirmed() - before
        batch = await client.post(
            f"/v2/{ENTITY}/{PROJECT}/scores/batch",
            json={"scores": [score_body(value="b" * NEAR_MIB) for _ in range(batched)]},
            headers=basic_auth(api_key),
        )
        assert batch.status_code == 200, batch.text
        split = messages_confirmed() - before - grouped

    # Grouped, yet never more than fit: 4 scores of ~1 MB make the most a 4 MiB message holds.
    assert singles / 4 <= grouped < singles, grouped
    assert split == batched / 4, split
    accepted = {answer.json()["score_id"] for answer in answers} | set(batch.json()["score_ids"])
    async with connect_broker(small_broker) as broker:
        await drain(small_broker, broker, db, singles + batched)
        assert await broker.ready_count(DEAD_LETTER_QUEUE) == 0
    assert await stored_ids(db) == accepted
