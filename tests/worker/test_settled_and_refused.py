"""The worker announces settled scores (NOTIFY in their transaction), records why it refused
scores, forgets old refusals, and measures accept-to-stored time per entity."""

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import asyncpg
import httpx
import pytest
from prometheus_client import REGISTRY

from shared.contract import BATCH_MESSAGE_TYPE, CONTENT_TYPE, MESSAGE_TYPE
from shared.ids import new_score_id
from shared.settings import Settings
from shared.stored_events import CHANNEL, settled_ids
from shared.topology import API_EXCHANGE
from tests.conftest import ENTITY, PROJECT, wait_for_count
from tests.support.processes import connect_broker, running_worker, score_message, wait_until
from worker import _metrics
from worker.store import FailedScore, ScoreStore

NOTIFY_LIMIT_BYTES = 8000
# The table is not emptied between tests: each asks about its own ids.
FAILURES_OF = """
SELECT score_id::text, entity, project, reason, detail FROM score_failures
WHERE score_id = ANY($1::uuid[])
"""
COUNT_FAILURES = "SELECT count(*) FROM score_failures WHERE score_id = ANY($1::uuid[])"


@pytest.fixture
async def announcements(settings: Settings) -> AsyncIterator[asyncio.Queue[str]]:
    """The payloads of every announcement, as an api's listener hears them."""
    conn = await asyncpg.connect(settings.database_url)
    heard: asyncio.Queue[str] = asyncio.Queue()
    await conn.add_listener(CHANNEL, lambda *args: heard.put_nowait(args[3]))
    try:
        yield heard
    finally:
        await conn.close()


async def _heard_ids(heard: asyncio.Queue[str], expected: int) -> list[str]:
    ids: list[str] = []
    while len(ids) < expected:
        payload = await asyncio.wait_for(heard.get(), 10)
        assert len(payload.encode()) < NOTIFY_LIMIT_BYTES
        ids += settled_ids(payload)
    return ids


def _message(
    body: dict[str, Any], message_type: str = MESSAGE_TYPE, **props: Any
) -> aio_pika.Message:
    return aio_pika.Message(
        body=json.dumps(body).encode(),
        content_type=CONTENT_TYPE,
        type=message_type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        **props,
    )


def _fields(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = json.loads(score_message().model_dump_json())
    fields.update(changes)
    return fields


async def test_a_stored_batch_of_500_is_announced_in_notifications_that_fit(
    settings: Settings, db: asyncpg.Connection, announcements: asyncio.Queue[str]
) -> None:
    scores = [score_message() for _ in range(500)]
    batch = {"scores": [json.loads(score.model_dump_json()) for score in scores]}
    async with connect_broker(settings) as broker, running_worker(settings):
        await broker.publish([_message(batch, BATCH_MESSAGE_TYPE, message_id="batch-500")])
        heard = await _heard_ids(announcements, 500)
        # Announced at commit: the rows are there for whoever hears of them.
        stored = await db.fetchval("SELECT count(*) FROM scores")
    assert sorted(heard) == sorted(str(score.score_id) for score in scores)
    assert stored == 500


async def test_ids_in_other_forms_are_announced_in_the_form_the_apis_wait_for(
    settings: Settings, announcements: asyncio.Queue[str]
) -> None:
    # PostgreSQL takes these forms too; the apis wait for the canonical one (lower case).
    scores = [score_message() for _ in range(3)]
    upper, braced, plain = (json.loads(score.model_dump_json()) for score in scores)
    upper["score_id"] = upper["score_id"].upper()
    braced["score_id"] = "{" + braced["score_id"] + "}"
    async with connect_broker(settings) as broker, running_worker(settings):
        # Through the api's exchange, as through the public one, they are validated in full.
        await broker.publish(
            [_message({"scores": [upper, plain]}, BATCH_MESSAGE_TYPE)], API_EXCHANGE
        )
        await broker.publish([_message(braced)])
        heard = await _heard_ids(announcements, 3)
    assert sorted(heard) == sorted(str(score.score_id) for score in scores)


async def test_a_refused_score_is_recorded_and_announced(
    settings: Settings, db: asyncpg.Connection, announcements: asyncio.Queue[str]
) -> None:
    score_id = new_score_id()
    body = _fields(score_id=str(score_id), value="fine", extra_field=1)
    async with connect_broker(settings) as broker, running_worker(settings):
        await broker.publish([_message(body, message_id=str(score_id))])
        assert await _heard_ids(announcements, 1) == [str(score_id)]
        rows = await db.fetch(FAILURES_OF, [score_id])
    assert len(rows) == 1
    _, entity, project, reason, detail = rows[0]
    assert (entity, project, reason) == (ENTITY, PROJECT, "schema_violation")
    assert "extra_field" in detail


async def test_a_refused_batch_records_each_score_it_names_validly(
    settings: Settings, db: asyncpg.Connection
) -> None:
    good, other_project, unnamed = new_score_id(), new_score_id(), new_score_id()
    items = [
        _fields(score_id=str(good)),
        _fields(score_id=str(other_project), project="elsewhere"),
        _fields(score_id=str(unnamed), entity="bad/entity", value=float("inf")),
        _fields(score_id="not-a-uuid"),
    ]
    async with connect_broker(settings) as broker, running_worker(settings):
        await broker.publish([_message({"scores": items}, BATCH_MESSAGE_TYPE, message_id="b")])
        assert await wait_for_count(db, COUNT_FAILURES, 2, [good, other_project]) == 2
    rows = {row[0]: row for row in await db.fetch(FAILURES_OF, [good, other_project, unnamed])}
    assert set(rows) == {str(good), str(other_project)}
    assert rows[str(other_project)][2] == "elsewhere"
    assert {row[3] for row in rows.values()} == {"schema_violation"}
    assert await db.fetchval(COUNT_FAILURES, [unnamed]) == 0


async def test_a_message_naming_no_project_is_dead_lettered_unrecorded(
    settings: Settings, db: asyncpg.Connection
) -> None:
    score_id = new_score_id()
    async with connect_broker(settings) as broker, running_worker(settings):
        await broker.publish(
            [
                aio_pika.Message(b"{not json", content_type=CONTENT_TYPE, message_id=str(score_id)),
                _message(_fields(score_id=str(score_id), entity=None), message_id=str(score_id)),
            ]
        )
        assert len(await broker.take_dead_letters(2)) == 2
    assert await db.fetchval(COUNT_FAILURES, [score_id]) == 0


async def test_a_single_score_without_an_id_is_recorded_under_its_message_id(
    settings: Settings, db: asyncpg.Connection
) -> None:
    score_id = new_score_id()
    body = _fields()
    del body["score_id"]
    async with connect_broker(settings) as broker, running_worker(settings):
        await broker.publish([_message(body, message_id=str(score_id))])
        assert await wait_for_count(db, COUNT_FAILURES, 1, [score_id]) == 1


async def test_old_refusals_are_purged(settings: Settings, db: asyncpg.Connection) -> None:
    pool = await asyncpg.create_pool(settings.database_url, min_size=0, max_size=1)
    try:
        store = ScoreStore(pool)
        old, recent = new_score_id(), new_score_id()
        await store.record_failures(
            [FailedScore(str(old), ENTITY, PROJECT), FailedScore(str(recent), ENTITY, PROJECT)],
            "schema_violation",
            "detail",
        )
        await db.execute(
            "UPDATE score_failures SET failed_at = $2 WHERE score_id = $1",
            old,
            datetime.now(UTC) - timedelta(days=8),
        )
        assert await store.purge_failures(7 * 24 * 3600, chunk=1) == 1
    finally:
        await pool.close()
    remaining = [row[0] for row in await db.fetch(FAILURES_OF, [old, recent])]
    assert remaining == [str(recent)]


def _accepted_to_stored_count(entity: str) -> float:
    value = REGISTRY.get_sample_value(
        "score_ingest_accept_to_stored_seconds_count", {"entity": entity}
    )
    return value or 0.0


async def test_accept_to_stored_is_measured_per_entity(
    settings: Settings, db: asyncpg.Connection
) -> None:
    before = _accepted_to_stored_count(ENTITY)
    scores = [score_message() for _ in range(7)]
    async with connect_broker(settings) as broker, running_worker(settings) as worker:
        await broker.publish_scores(scores)
        assert await wait_for_count(db, "SELECT count(*) FROM scores", 7) == 7
        # A copy already stored is not stored again, nor measured.
        await broker.publish_scores(scores[:2])
        await wait_until(lambda: worker.duplicates == 2, "both copies seen as duplicates")
        async with httpx.AsyncClient() as client:
            scraped = await client.get(f"http://127.0.0.1:{worker.health_port}/metrics")
    assert _accepted_to_stored_count(ENTITY) - before == 7
    assert f'score_ingest_accept_to_stored_seconds_bucket{{entity="{ENTITY}"' in scraped.text


def test_past_the_first_entities_the_rest_share_one_label(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_metrics, "_named_entities", set())
    now = datetime.now(UTC)
    entities = [f"entity-{i}" for i in range(_metrics.ENTITY_LABELS + 5)]
    before = _accepted_to_stored_count(_metrics.OTHER_ENTITIES)
    _metrics.observe_accept_to_stored([(entity, now, 1) for entity in entities * 2], now)
    assert _accepted_to_stored_count(_metrics.OTHER_ENTITIES) - before == 10
    assert _accepted_to_stored_count(entities[0]) >= 2
    assert _accepted_to_stored_count(entities[-1]) == 0
    assert set(_metrics._named_entities) == set(entities[: _metrics.ENTITY_LABELS])


def test_a_group_of_equal_latencies_counts_as_that_many_scores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_metrics, "_named_entities", set())
    now = datetime.now(UTC)
    entity = "grouped-latencies"

    def bucket(le: str) -> float:
        labels = {"entity": entity, "le": le}
        value = REGISTRY.get_sample_value("score_ingest_accept_to_stored_seconds_bucket", labels)
        return value or 0.0

    before = {le: bucket(le) for le in ("0.005", "0.01", "+Inf")}
    sum_before = REGISTRY.get_sample_value(
        "score_ingest_accept_to_stored_seconds_sum", {"entity": entity}
    )
    # A bound is inclusive (Prometheus's `le`): 5 ms goes into the 0.005 bucket.
    _metrics.observe_accept_to_stored(
        [(entity, now - timedelta(milliseconds=5), 500), (entity, now - timedelta(seconds=2), 3)],
        now,
    )
    assert bucket("0.005") - before["0.005"] == 500
    assert bucket("0.01") - before["0.01"] == 500
    assert bucket("+Inf") - before["+Inf"] == 503
    assert _accepted_to_stored_count(entity) - before["+Inf"] == 503
    sum_after = REGISTRY.get_sample_value(
        "score_ingest_accept_to_stored_seconds_sum", {"entity": entity}
    )
    assert sum_after is not None
    assert sum_after - (sum_before or 0.0) == pytest.approx(500 * 0.005 + 3 * 2)
