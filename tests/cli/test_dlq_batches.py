"""`score-ingest dlq` over dead-lettered score.batch.v1 messages.

A batch carries its entity and project once per score, so `dlq` gives a batch the entity and
the project its scores share, and none (shown `?/?`) when they differ. Batches are
dead-lettered by the real worker (one invalid item refuses them whole), or published straight
to scores.dlx to stand for good batches an earlier worker version refused; the CLI runs as a
subprocess, as an operator runs it.
"""

import json
from types import SimpleNamespace
from typing import Any, cast

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractIncomingMessage

from cli._dead_letters import describe
from shared.contract import BATCH_MESSAGE_TYPE, MESSAGE_TYPE, ScoreMessage
from shared.dead_letters import DeadLetterReason
from shared.settings import Settings
from shared.topology import QUEUE
from tests.cli.test_dlq import (
    COUNT_SCORES,
    OTHER_ENTITY,
    OTHER_PROJECT,
    CliResult,
    assert_dead_count_settles_at,
    dead_letter,
    dlq_ok,
    peek_dead_letters,
    publish_dead_letters,
    refused_score,
    table_rows,
    wait_for_dead_count,
    wait_for_worker,
)
from tests.conftest import ENTITY, PROJECT
from tests.support.processes import connect_broker, running_worker, score_message
from tests.worker.test_batch_messages import (
    as_json,
    batch_body,
    batch_message,
    ids,
    stored_ids,
    transactions,
)
from worker.worker import ScoreWorker

SCHEMA_VIOLATION = DeadLetterReason.SCHEMA_VIOLATION.value
WRONG_CONTENT_TYPE = DeadLetterReason.UNSUPPORTED_CONTENT_TYPE.value
# A second project of OTHER_ENTITY, and a third entity no dead letter belongs to.
OTHER_ENTITY_SECOND_PROJECT = "staging"
UNRELATED_ENTITY = "umbrella"


def scores_in(entity: str, project: str, count: int, label: str) -> list[ScoreMessage]:
    """count valid scores of entity/project, each with its own prediction_id and value."""
    return [
        score_message(
            entity=entity,
            project=project,
            scorer=f"weave:///{entity}/{project}/op/exact_match:abc123",
            prediction_id=f"{label}-{i}",
            value={"i": i},
        )
        for i in range(count)
    ]


def poison_batch(items: list[ScoreMessage], bad_index: int, name: str) -> aio_pika.Message:
    """A batch message of items whose item bad_index has an unknown field, so the worker
    refuses the whole batch; its entity and project stay those of the valid item."""
    body: list[dict[str, Any]] = [as_json(score) for score in items]
    body[bad_index] = {**body[bad_index], "surprise": "!"}
    return batch_message(batch_body(body), name)


def poison_single(score: ScoreMessage, name: str) -> aio_pika.Message:
    """A valid single score sent as text/plain: dead-lettered, its entity still in the body."""
    return aio_pika.Message(
        body=score.model_dump_json().encode(),
        content_type="text/plain",
        type=MESSAGE_TYPE,
        message_id=name,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


def refused_batch(scores: list[ScoreMessage], name: str) -> aio_pika.Message:
    """A valid batch that an earlier worker version dead-lettered (refused_score, for a batch)."""
    message = dead_letter(batch_body(scores), message_id=f"batch-{name}")
    message.type = BATCH_MESSAGE_TYPE
    return message


async def dead_letter_through_worker(settings: Settings, messages: list[aio_pika.Message]) -> None:
    """Publish messages to `scores` while a real worker runs; wait until all are dead letters."""
    async with connect_broker(settings) as broker:
        async with running_worker(settings):
            await broker.publish(messages)
            assert await wait_for_dead_count(broker, len(messages)) == len(messages)
        await broker.assert_stays_empty(QUEUE)
    await assert_dead_count_settles_at(settings, len(messages))


async def listed(settings: Settings, *options: str) -> dict[str, list[str]]:
    """The rows of `dlq list <options>` by id (a wide terminal, so no cell is cut)."""
    result: CliResult = await dlq_ok(settings, "list", *options, columns=250)
    rows = table_rows(result.stdout)
    assert f"{len(rows)} dead letter(s)" in result.stderr, str(result)
    return rows


async def test_a_refused_batch_of_one_project_is_listed_under_that_entity_and_project(
    settings: Settings, db: asyncpg.Connection
) -> None:
    batch = scores_in(OTHER_ENTITY, OTHER_PROJECT, 6, "one-project")
    acme = score_message()
    await dead_letter_through_worker(
        settings, [poison_batch(batch, 4, "one-project"), poison_single(acme, "acme-single")]
    )
    assert await db.fetchval(COUNT_SCORES) == 0, "no score of the refused batch is stored"

    everything = await listed(settings)
    assert set(everything) == {"batch-one-project", "acme-single"}
    (_, reason, _, where, _, detail) = everything["batch-one-project"]
    assert (reason, where) == (SCHEMA_VIOLATION, f"{OTHER_ENTITY}/{OTHER_PROJECT}")
    assert "scores.4.surprise" in detail
    assert everything["acme-single"][3] == f"{ENTITY}/{PROJECT}"

    for options in (
        ["--entity", OTHER_ENTITY, "--project", OTHER_PROJECT],
        ["--entity", OTHER_ENTITY],
        ["--project", OTHER_PROJECT],
    ):
        rows = await listed(settings, *options)
        assert set(rows) == {"batch-one-project"}, options
        assert rows["batch-one-project"][3] == f"{OTHER_ENTITY}/{OTHER_PROJECT}", options

    # Another entity (one with a dead letter of its own, and one with none), or another
    # project of the batch's entity, does not list the batch.
    assert set(await listed(settings, "--entity", ENTITY)) == {"acme-single"}
    assert await listed(settings, "--entity", UNRELATED_ENTITY) == {}
    assert await listed(settings, "--entity", OTHER_ENTITY, "--project", PROJECT) == {}
    await assert_dead_count_settles_at(settings, 2)


async def test_a_refused_batch_mixing_projects_is_listed_as_unknown_and_matched_only_by_reason(
    settings: Settings, db: asyncpg.Connection
) -> None:
    acme = score_message(prediction_id="acme-mixed")
    (other,) = scores_in(OTHER_ENTITY, OTHER_PROJECT, 1, "other-mixed")
    mixed = [acme, other, score_message(prediction_id="acme-mixed-2")]
    # Singles of both the batch's entity/project pairs, dead-lettered for another reason, so
    # every filter below has something to list and a batch it wrongly matched would show.
    singles = {
        "acme-single": score_message(prediction_id="acme-single"),
        "other-single": scores_in(OTHER_ENTITY, OTHER_PROJECT, 1, "other-single")[0],
    }
    await dead_letter_through_worker(
        settings,
        [
            poison_batch(mixed, 2, "mixed"),
            *(poison_single(score, name) for name, score in singles.items()),
        ],
    )
    assert await db.fetchval(COUNT_SCORES) == 0

    everything = await listed(settings)
    assert set(everything) == {"batch-mixed", *singles}
    (_, reason, _, where, _, detail) = everything["batch-mixed"]
    assert (reason, where) == (SCHEMA_VIOLATION, "?/?")
    assert "scores.2.surprise" in detail
    assert everything["acme-single"][3] == f"{ENTITY}/{PROJECT}"
    assert everything["other-single"][3] == f"{OTHER_ENTITY}/{OTHER_PROJECT}"

    for options, names in [
        (["--entity", ENTITY], {"acme-single"}),
        (["--project", PROJECT], {"acme-single"}),
        (["--entity", ENTITY, "--project", PROJECT], {"acme-single"}),
        (["--entity", OTHER_ENTITY], {"other-single"}),
        (["--project", OTHER_PROJECT], {"other-single"}),
        (["--entity", OTHER_ENTITY, "--project", OTHER_PROJECT], {"other-single"}),
        (["--entity", UNRELATED_ENTITY], set()),
    ]:
        assert set(await listed(settings, *options)) == names, options

    by_reason = await listed(settings, "--reason", SCHEMA_VIOLATION)
    assert set(by_reason) == {"batch-mixed"}
    assert by_reason["batch-mixed"][3] == "?/?"
    assert set(await listed(settings, "--reason", WRONG_CONTENT_TYPE)) == set(singles)
    await assert_dead_count_settles_at(settings, 3)


async def test_replaying_a_refused_batch_by_entity_and_project_stores_each_score_once(
    settings: Settings, db: asyncpg.Connection, worker: ScoreWorker
) -> None:
    batch = scores_in(OTHER_ENTITY, OTHER_PROJECT, 25, "replayed")
    # The same entity in another project, and another entity's single: neither is replayed.
    second_project = scores_in(OTHER_ENTITY, OTHER_ENTITY_SECOND_PROJECT, 3, "second-project")
    acme = score_message(prediction_id="acme-kept")
    await publish_dead_letters(
        settings,
        [
            refused_batch(batch, "replayed"),
            refused_batch(second_project, "second-project"),
            refused_score(acme),
        ],
    )
    await assert_dead_count_settles_at(settings, 3)
    listed_before = await listed(settings, "--entity", OTHER_ENTITY, "--project", OTHER_PROJECT)
    assert set(listed_before) == {"batch-replayed"}

    result = await dlq_ok(settings, "replay", "--entity", OTHER_ENTITY, "--project", OTHER_PROJECT)
    assert "replayed 1 dead letter(s)" in result.stderr, str(result)
    await wait_for_worker(worker, persisted=len(batch))
    await assert_dead_count_settles_at(settings, 2)
    assert {letter.message_id for letter in await peek_dead_letters(settings)} == {
        "batch-second-project",
        str(acme.score_id),
    }
    async with connect_broker(settings) as broker:
        await broker.assert_stays_empty(QUEUE, seconds=0.5)
    assert worker.persisted == len(batch), "nothing but the batch was stored"
    assert worker.duplicates == 0, "the batch was delivered once"
    assert await stored_ids(db) == ids(batch)
    assert await db.fetchval(COUNT_SCORES) == len(batch), "each score is one row"
    assert await transactions(db, batch) == 1, "the batch was stored as one message"
    rows = await db.fetch("SELECT entity, project FROM scores")
    assert {(row["entity"], row["project"]) for row in rows} == {(OTHER_ENTITY, OTHER_PROJECT)}

    # The rest, by their own filters, empties scores.dead; the batch is still stored once.
    await dlq_ok(settings, "replay", "--entity", OTHER_ENTITY)
    await dlq_ok(settings, "replay", "--entity", ENTITY, "--project", PROJECT)
    total = len(batch) + len(second_project) + 1
    await wait_for_worker(worker, persisted=total)
    await assert_dead_count_settles_at(settings, 0)
    async with connect_broker(settings) as broker:
        await broker.assert_stays_empty(QUEUE, seconds=0.5)
    assert worker.duplicates == 0
    assert await stored_ids(db) == ids([*batch, *second_project, acme])
    assert await db.fetchval(COUNT_SCORES) == total
    assert await listed(settings) == {}


@pytest.mark.parametrize(
    ("body", "entity", "project"),
    [
        ({"entity": "acme", "project": "evals"}, "acme", "evals"),
        ({"entity": {"name": "acme"}, "project": "evals"}, None, "evals"),
        ({"scores": [{"entity": "e", "project": ["p"]}]}, "e", None),
        ({"scores": [{"entity": "e", "project": "p"}, {"entity": "e", "project": "q"}]}, "e", None),
        (
            {"scores": [{"entity": "e", "project": "p"}, {"entity": {"x": 1}, "project": "p"}]},
            None,
            "p",
        ),
        ({"scores": []}, None, None),
        ({"scores": "nope"}, None, None),
    ],
)
def test_entity_and_project_of_any_json_body_never_break_describe(
    body: dict[str, object], entity: str | None, project: str | None
) -> None:
    # Whatever a direct publisher sent, dlq must still list it (and let an operator purge it).
    message = SimpleNamespace(
        headers={}, body=json.dumps(body).encode(), message_id="x", content_type=None, type=None
    )
    letter = describe(cast(AbstractIncomingMessage, message))
    assert (letter.entity, letter.project) == (entity, project)
