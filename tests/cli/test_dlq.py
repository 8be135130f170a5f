"""`score-ingest dlq` as an operator runs it, against the session's own vhost and database.

Dead letters are made the real way: poison published to `scores` while a worker runs, a
message RabbitMQ itself dead-letters after a consumer rejects it, and (to stand for letters
an earlier worker version refused) messages published straight to `scores.dlx` with the
headers the worker writes.
"""

import asyncio
import json
import signal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import aio_pika
import asyncpg
import httpx
import pytest

from shared.contract import CONTENT_TYPE, MESSAGE_TYPE, ScoreMessage
from shared.dead_letters import DETAIL_HEADER, QUEUE_HEADER, REASON_HEADER, TIME_HEADER
from shared.settings import Settings
from shared.topology import DEAD_LETTER_EXCHANGE, DEAD_LETTER_QUEUE, QUEUE, ROUTING_KEY
from tests.conftest import ENTITY, PROJECT, basic_auth
from tests.support.messages import to_amqp_message
from tests.support.processes import (
    Broker,
    CliProcess,
    cli_run,
    connect_broker,
    running_worker,
    score_message,
    settings_env,
)
from worker.worker import ScoreWorker

COUNT_SCORES = "SELECT count(*) FROM scores"
OTHER_ENTITY = "globex"
OTHER_PROJECT = "bench"
OLD_ENTITY = "initech"
OLD_PROJECT = "archive"
EARLIER_REASON = "schema_violation"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The session's settings, with the worker's health server on a free port."""
    return settings.model_copy(update={"worker_health_port": 0})


@dataclass(frozen=True)
class CliResult:
    """What one `score-ingest dlq …` run did."""

    args: tuple[str, ...]
    code: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return (
            f"dlq {' '.join(self.args)} exited {self.code}\n"
            f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"
        )


async def dlq(
    settings: Settings, *args: str, stdin: str | None = None, columns: int | None = None
) -> CliResult:
    """Run `python -m cli dlq <args>` as an operator would, with the settings as environment.

    Output goes to a pipe, as in `dlq list | less`; columns sets a terminal width.
    """
    env = settings_env(settings)
    env.pop("COLUMNS", None)
    if columns is not None:
        env["COLUMNS"] = str(columns)
    done = await cli_run(env, "dlq", *args, stdin=stdin)
    return CliResult(args, done.returncode, done.stdout, done.stderr)


async def dlq_ok(
    settings: Settings, *args: str, stdin: str | None = None, columns: int | None = None
) -> CliResult:
    """Run a dlq command that must succeed."""
    result = await dlq(settings, *args, stdin=stdin, columns=columns)
    assert result.code == 0, str(result)
    return result


def dead_letter(
    body: bytes,
    *,
    reason: str = EARLIER_REASON,
    message_id: str | None = None,
    dead_lettered_at: datetime | None = None,
) -> aio_pika.Message:
    """A message as the worker writes it to scores.dlx, with its reason headers."""
    at = dead_lettered_at or datetime.now(UTC)
    return aio_pika.Message(
        body=body,
        headers={
            REASON_HEADER: reason,
            DETAIL_HEADER: "refused by an earlier worker version",
            TIME_HEADER: at.isoformat(),
            QUEUE_HEADER: QUEUE,
        },
        content_type=CONTENT_TYPE,
        type=MESSAGE_TYPE,
        message_id=message_id,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


def refused_score(score: ScoreMessage, **kwargs: Any) -> aio_pika.Message:
    """A good score that an earlier worker version dead-lettered (so it deserves a replay)."""
    amqp = to_amqp_message(score)
    return dead_letter(amqp.body, message_id=str(score.score_id), **kwargs)


async def publish_dead_letters(settings: Settings, messages: Iterable[aio_pika.Message]) -> None:
    """Publish straight to scores.dlx with confirms, as the worker does when it dead-letters."""
    connection = await aio_pika.connect(settings.amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(DEAD_LETTER_EXCHANGE, ensure=False)
        pending = [exchange.publish(m, ROUTING_KEY, mandatory=True) for m in messages]
        for start in range(0, len(pending), 500):
            await asyncio.gather(*pending[start : start + 500])


async def reject_one_from_persist_queue(settings: Settings) -> bytes:
    """Consume one message from scores.persist and reject it, so RabbitMQ dead-letters it."""
    connection = await aio_pika.connect(settings.amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(QUEUE, ensure=False)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while (message := await queue.get(no_ack=False, fail=False)) is None:
            assert loop.time() < deadline, "nothing to reject in scores.persist"
            await asyncio.sleep(0.05)
        await message.reject(requeue=False)
        return message.body


@dataclass(frozen=True)
class Peeked:
    """A dead letter seen without removing it."""

    message_id: str | None
    headers: dict[str, Any]
    body: bytes


async def wait_for_dead_count(
    broker: Broker, expected: int, *, at_least: bool = False, timeout: float = 10.0
) -> int:
    """Poll scores.dead until it holds expected ready messages (or at least that many)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        count = await broker.ready_count(DEAD_LETTER_QUEUE)
        if count == expected or (at_least and count >= expected) or loop.time() > deadline:
            return count
        await asyncio.sleep(0.05)


async def peek_dead_letters(settings: Settings) -> list[Peeked]:
    """Every message in scores.dead, left there (consumed unacked, returned on channel close)."""
    seen: list[Peeked] = []
    connection = await aio_pika.connect(settings.amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(DEAD_LETTER_QUEUE, passive=True)
        expected = queue.declaration_result.message_count or 0
        if expected:
            await channel.set_qos(prefetch_count=expected)
            async with asyncio.timeout(20), queue.iterator() as messages:
                async for message in messages:
                    seen.append(
                        Peeked(message.message_id, dict(message.headers or {}), message.body)
                    )
                    if len(seen) == expected:
                        break
    async with connect_broker(settings) as broker:
        returned = await wait_for_dead_count(broker, len(seen), at_least=True)
        assert returned >= len(seen), f"peeked {len(seen)} dead letters, {returned} came back"
    return seen


async def stored_ids(db: asyncpg.Connection) -> set[UUID]:
    """The score ids of every stored row."""
    return {row["score_id"] for row in await db.fetch("SELECT score_id FROM scores")}


def table_rows(output: str) -> dict[str, list[str]]:
    """The data rows of a rich table, by their first cell (the dead letter id)."""
    rows: dict[str, list[str]] = {}
    for line in output.splitlines():
        if "│" not in line:
            continue
        cells = [cell.strip() for cell in line.strip().strip("│").split("│")]
        rows[cells[0]] = cells
    return rows


def json_lines(text: str) -> list[dict[str, Any]]:
    """Parse JSON Lines: every non-empty line must be one JSON object."""
    objects: list[dict[str, Any]] = []
    for line in text.splitlines():
        if line.strip():
            parsed = json.loads(line)
            assert isinstance(parsed, dict), line
            objects.append(parsed)
    return objects


def _score_json(score: ScoreMessage, **changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = json.loads(score.model_dump_json())
    fields.update(changes)
    return fields


@dataclass(frozen=True)
class Expected:
    """A dead letter a test made, and what `dlq` must say about it."""

    id: str | None  # None: no message_id, the id is whatever dlq derives from the body
    reason: str
    entity: str
    project: str
    body: bytes
    detail_mentions: str = ""


@dataclass(frozen=True)
class Poisoned:
    """The dead letters of the `poisoned` fixture, by name."""

    letters: Mapping[str, Expected]

    @property
    def total(self) -> int:
        """How many there are."""
        return len(self.letters)

    def ids(self, *names: str) -> set[str]:
        """The (known) ids of the named letters."""
        found = {self.letters[name].id for name in names}
        return {letter_id for letter_id in found if letter_id is not None}


@pytest.fixture
async def poisoned(settings: Settings) -> Poisoned:
    """Six dead letters, of every origin: rejected by a consumer, poison the worker refused,
    and an old one from an earlier worker version. Left in scores.dead, no worker running."""
    rejected = score_message()
    acme_base = score_message()
    other = score_message(
        entity=OTHER_ENTITY,
        project=OTHER_PROJECT,
        scorer=f"weave:///{OTHER_ENTITY}/{OTHER_PROJECT}/op/exact_match:abc123",
    )
    old = score_message(
        entity=OLD_ENTITY,
        project=OLD_PROJECT,
        scorer=f"weave:///{OLD_ENTITY}/{OLD_PROJECT}/op/exact_match:abc123",
    )
    missing_score_id = _score_json(acme_base)
    del missing_score_id["score_id"]
    letters = {
        "rejected": Expected(
            str(rejected.score_id), "rejected", ENTITY, PROJECT, to_amqp_message(rejected).body
        ),
        "invalid-json": Expected(None, "invalid_json", "?", "?", b"{this is not json"),
        "schema-acme": Expected(
            "poison-schema-acme",
            "schema_violation",
            ENTITY,
            PROJECT,
            json.dumps(missing_score_id).encode(),
            "score_id",
        ),
        "schema-other": Expected(
            "poison-schema-other",
            "schema_violation",
            OTHER_ENTITY,
            OTHER_PROJECT,
            json.dumps(_score_json(other, colour="red")).encode(),
            "colour",
        ),
        "content-type": Expected(
            "poison-content-type",
            "unsupported_content_type",
            ENTITY,
            PROJECT,
            to_amqp_message(score_message()).body,
            "text/plain",
        ),
        "old": Expected(
            str(old.score_id),
            "storage_rejected",
            OLD_ENTITY,
            OLD_PROJECT,
            to_amqp_message(old).body,
            "earlier worker version",
        ),
    }

    def poison(name: str, content_type: str = CONTENT_TYPE) -> aio_pika.Message:
        letter = letters[name]
        return aio_pika.Message(
            body=letter.body,
            content_type=content_type,
            type=MESSAGE_TYPE,
            message_id=letter.id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )

    async with connect_broker(settings) as broker:
        await broker.publish_scores([rejected])
        assert await reject_one_from_persist_queue(settings) == letters["rejected"].body
        assert await wait_for_dead_count(broker, 1) == 1
        async with running_worker(settings):
            await broker.publish(
                [
                    poison("invalid-json"),
                    poison("schema-acme"),
                    poison("schema-other"),
                    poison("content-type", content_type="text/plain"),
                ]
            )
            await publish_dead_letters(
                settings,
                [
                    refused_score(
                        old,
                        reason="storage_rejected",
                        dead_lettered_at=datetime.now(UTC) - timedelta(hours=2),
                    )
                ],
            )
            assert await wait_for_dead_count(broker, len(letters)) == len(letters)
    return Poisoned(letters)


async def assert_dead_count_settles_at(settings: Settings, expected: int) -> None:
    """scores.dead holds exactly expected ready messages (once returned ones are back)."""
    async with connect_broker(settings) as broker:
        assert await wait_for_dead_count(broker, expected) == expected


async def test_list_prints_each_dead_letter_and_removes_nothing(
    settings: Settings, poisoned: Poisoned
) -> None:
    result = await dlq_ok(settings, "list")

    rows = table_rows(result.stdout)
    by_reason: dict[str, list[list[str]]] = {}
    for cells in rows.values():
        by_reason.setdefault(cells[1], []).append(cells)
    for name, letter in poisoned.letters.items():
        if letter.id is not None:
            assert letter.id in rows, f"{name}: id {letter.id} not listed in full\n{result}"
            cells = rows[letter.id]
        else:
            (cells,) = by_reason[letter.reason]
        _, reason, age, entity_project, size = cells[:5]
        assert reason == letter.reason, (name, cells)
        assert entity_project == f"{letter.entity}/{letter.project}", (name, cells)
        assert size == str(len(letter.body)), (name, cells)
        hours, minutes, _ = age.split(":")
        expected_hours = "2" if name == "old" else "0"
        assert (hours, minutes) in {(expected_hours, "00"), (expected_hours, "01")}, (name, cells)
    assert len(rows) == poisoned.total, str(result)
    assert f"{poisoned.total} dead letter(s)" in result.stderr

    await assert_dead_count_settles_at(settings, poisoned.total)

    # An id read from the table finds its letter, even one without a message_id.
    (invalid_json_row,) = by_reason["invalid_json"]
    shown = await dlq_ok(settings, "show", invalid_json_row[0])
    assert json.loads(shown.stdout)["body"] == poisoned.letters["invalid-json"].body.decode()


@pytest.mark.parametrize(
    ("options", "names"),
    [
        (["--reason", "schema_violation"], ["schema-acme", "schema-other"]),
        (["--entity", ENTITY, "--project", PROJECT], ["rejected", "schema-acme", "content-type"]),
        (["--older-than", "1h"], ["old"]),
        (
            ["--newer-than", "30m"],
            ["rejected", "invalid-json", "schema-acme", "schema-other", "content-type"],
        ),
    ],
)
async def test_list_filters(
    settings: Settings, poisoned: Poisoned, options: list[str], names: list[str]
) -> None:
    # A wide terminal, so that this test is about the filters, not the table's layout.
    result = await dlq_ok(settings, "list", *options, columns=250)

    rows = table_rows(result.stdout)
    assert len(rows) == len(names), str(result)
    expected = poisoned.ids(*names)
    assert expected <= set(rows), str(result)
    assert {cells[1] for cells in rows.values()} == {poisoned.letters[n].reason for n in names}
    await assert_dead_count_settles_at(settings, poisoned.total)


async def test_show_prints_headers_and_body_as_json(settings: Settings, poisoned: Poisoned) -> None:
    schema = poisoned.letters["schema-acme"]
    assert schema.id is not None
    shown = json.loads((await dlq_ok(settings, "show", schema.id)).stdout)
    assert shown["id"] == schema.id
    assert shown["reason"] == "schema_violation"
    assert shown["body"] == schema.body.decode()
    assert shown["headers"][REASON_HEADER] == "schema_violation"
    assert schema.detail_mentions in shown["headers"][DETAIL_HEADER]
    assert shown["headers"][QUEUE_HEADER] == QUEUE
    assert (shown["entity"], shown["project"]) == (ENTITY, PROJECT)

    rejected = poisoned.letters["rejected"]
    assert rejected.id is not None
    shown = json.loads((await dlq_ok(settings, "show", rejected.id)).stdout)
    assert shown["reason"] == "rejected"
    assert shown["body"] == rejected.body.decode()
    (death, *_) = shown["headers"]["x-death"]
    assert death["reason"] == "rejected"
    assert death["queue"] == QUEUE
    assert shown["source_queue"] == QUEUE
    assert shown["dead_lettered_at"] is not None

    unknown = await dlq(settings, "show", "no-such-dead-letter")
    assert unknown.code == 1, str(unknown)
    assert unknown.stdout == ""
    await assert_dead_count_settles_at(settings, poisoned.total)


async def test_export_writes_json_lines_and_removes_nothing(
    settings: Settings, poisoned: Poisoned, tmp_path: Path
) -> None:
    target = tmp_path / "dead.jsonl"
    result = await dlq_ok(settings, "export", str(target))
    assert f"exported {poisoned.total}" in result.stderr

    exported = json_lines(target.read_text())
    assert len(exported) == poisoned.total
    by_body = {line["body"]: line for line in exported}
    for name, letter in poisoned.letters.items():
        line = by_body[letter.body.decode()]
        assert line["reason"] == letter.reason, name
        assert letter.detail_mentions in line["detail"], name
        if letter.id is not None:
            assert line["id"] == letter.id, name
    await assert_dead_count_settles_at(settings, poisoned.total)

    to_stdout = await dlq_ok(settings, "export", "-", "--entity", OTHER_ENTITY)
    (line,) = json_lines(to_stdout.stdout)
    assert line["id"] == poisoned.letters["schema-other"].id
    assert line["body"] == poisoned.letters["schema-other"].body.decode()
    await assert_dead_count_settles_at(settings, poisoned.total)


async def test_purge_asks_first_and_exports_what_it_removes(
    settings: Settings, poisoned: Poisoned, tmp_path: Path
) -> None:
    declined = await dlq(settings, "purge", stdin="n\n")
    assert declined.code != 0, str(declined)
    await assert_dead_count_settles_at(settings, poisoned.total)

    exported = tmp_path / "purged.jsonl"
    purged = await dlq_ok(
        settings, "purge", "--reason", "schema_violation", "--export", str(exported), "--yes"
    )
    assert "purged 2" in purged.stderr, str(purged)
    await assert_dead_count_settles_at(settings, poisoned.total - 2)
    assert {line["id"] for line in json_lines(exported.read_text())} == poisoned.ids(
        "schema-acme", "schema-other"
    )
    remaining = await peek_dead_letters(settings)
    assert sorted(letter.body for letter in remaining) == sorted(
        letter.body
        for name, letter in poisoned.letters.items()
        if name not in {"schema-acme", "schema-other"}
    )

    confirmed = await dlq_ok(settings, "purge", "--export", str(exported), stdin="y\n")
    assert f"purged {poisoned.total - 2}" in confirmed.stderr, str(confirmed)
    await assert_dead_count_settles_at(settings, 0)
    # --export appends: every purged letter is in the file, the first purge's included.
    assert sorted(line["body"] for line in json_lines(exported.read_text())) == sorted(
        letter.body.decode() for letter in poisoned.letters.values()
    )


async def wait_for_worker(
    worker: ScoreWorker, *, persisted: int, duplicates: int = 0, timeout: float = 15.0
) -> None:
    """Poll the worker's counters until it has stored and skipped that many in total."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (worker.persisted, worker.duplicates) != (persisted, duplicates):
        assert loop.time() < deadline, (
            f"worker persisted {worker.persisted} (want {persisted}), "
            f"skipped {worker.duplicates} duplicates (want {duplicates})"
        )
        await asyncio.sleep(0.02)


async def assert_nothing_moves(settings: Settings, db: asyncpg.Connection, dead: int) -> None:
    """For a moment: no score stored, scores.persist empty, scores.dead still holds dead."""
    async with connect_broker(settings) as broker:
        assert await wait_for_dead_count(broker, dead) == dead
        await broker.assert_stays_empty(QUEUE, seconds=0.5)
    assert await db.fetchval(COUNT_SCORES) == 0


async def test_replay_stores_good_dead_letters_by_filter(
    settings: Settings, db: asyncpg.Connection, worker: ScoreWorker
) -> None:
    acme = [score_message(prediction_id=f"acme-{i}") for i in range(3)]
    other = [
        score_message(
            entity=OTHER_ENTITY,
            project=OTHER_PROJECT,
            scorer=f"weave:///{OTHER_ENTITY}/{OTHER_PROJECT}/op/exact_match:abc123",
        )
        for _ in range(2)
    ]
    await publish_dead_letters(settings, [refused_score(s) for s in [*acme, *other]])
    await assert_dead_count_settles_at(settings, 5)

    result = await dlq_ok(settings, "replay", "--entity", OTHER_ENTITY, "--project", OTHER_PROJECT)
    assert "replayed 2" in result.stderr, str(result)
    await wait_for_worker(worker, persisted=2)
    assert await stored_ids(db) == {s.score_id for s in other}
    await assert_dead_count_settles_at(settings, 3)

    await dlq_ok(settings, "replay", "--reason", EARLIER_REASON)
    await wait_for_worker(worker, persisted=5)
    assert await stored_ids(db) == {s.score_id for s in [*acme, *other]}
    await assert_dead_count_settles_at(settings, 0)
    stored = await db.fetchrow(
        "SELECT entity, project, value FROM scores WHERE score_id = $1", acme[0].score_id
    )
    assert stored is not None
    assert (stored["entity"], stored["project"]) == (ENTITY, PROJECT)
    assert json.loads(stored["value"]) == acme[0].value


async def test_replay_of_a_message_the_broker_dead_lettered(
    settings: Settings, db: asyncpg.Connection, poisoned: Poisoned
) -> None:
    rejected = poisoned.letters["rejected"]
    async with running_worker(settings) as worker:
        result = await dlq_ok(settings, "replay", "--reason", "rejected")
        assert "replayed 1" in result.stderr, str(result)
        await wait_for_worker(worker, persisted=1)
    assert {str(score_id) for score_id in await stored_ids(db)} == {rejected.id}
    await assert_dead_count_settles_at(settings, poisoned.total - 1)


async def test_replay_dry_run_moves_nothing_and_limit_moves_exactly_that_many(
    settings: Settings, db: asyncpg.Connection, worker: ScoreWorker
) -> None:
    scores = [score_message(prediction_id=f"p-{i}") for i in range(5)]
    await publish_dead_letters(settings, [refused_score(s) for s in scores])
    await assert_dead_count_settles_at(settings, 5)

    dry = await dlq_ok(settings, "replay", "--dry-run")
    assert "would replay 5" in dry.stderr, str(dry)
    await assert_nothing_moves(settings, db, dead=5)

    limited = await dlq_ok(settings, "replay", "--limit", "2")
    assert "replayed 2" in limited.stderr, str(limited)
    await wait_for_worker(worker, persisted=2)
    await assert_dead_count_settles_at(settings, 3)
    stored = await stored_ids(db)
    assert len(stored) == 2
    assert stored <= {s.score_id for s in scores}
    remaining = {letter.message_id for letter in await peek_dead_letters(settings)}
    assert remaining == {str(s.score_id) for s in scores} - {str(i) for i in stored}


async def test_replay_keeps_a_stored_score_single_and_a_deleted_score_deleted(
    settings: Settings,
    db: asyncpg.Connection,
    worker: ScoreWorker,
    client: httpx.AsyncClient,
    api_key: str,
) -> None:
    kept = score_message(prediction_id="kept")
    deleted = score_message(prediction_id="deleted")
    async with connect_broker(settings) as broker:
        await broker.publish_scores([kept, deleted])
    await wait_for_worker(worker, persisted=2)
    response = await client.delete(
        f"/v2/{ENTITY}/{PROJECT}/scores",
        params={"score_ids": [str(deleted.score_id)]},
        headers=basic_auth(api_key),
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"num_deleted": 1}

    await publish_dead_letters(settings, [refused_score(kept), refused_score(deleted)])
    await assert_dead_count_settles_at(settings, 2)
    await dlq_ok(settings, "replay")

    await wait_for_worker(worker, persisted=2, duplicates=2)
    await assert_dead_count_settles_at(settings, 0)
    assert await db.fetchval("SELECT count(*) FROM scores WHERE score_id = $1", kept.score_id) == 1
    assert await stored_ids(db) == {kept.score_id}
    response = await client.get(
        f"/v2/{ENTITY}/{PROJECT}/scores/{deleted.score_id}", headers=basic_auth(api_key)
    )
    assert response.status_code == 404, response.text


async def test_replayed_messages_that_are_still_invalid_return_to_dead_letters(
    settings: Settings, db: asyncpg.Connection, worker: ScoreWorker
) -> None:
    good = score_message(prediction_id="good")
    bad_bodies = {
        "invalid_json": b"[not json",
        "schema_violation": json.dumps(_score_json(score_message(), surprise=1)).encode(),
    }
    async with connect_broker(settings) as broker:
        await broker.publish(
            aio_pika.Message(
                body=body,
                content_type=CONTENT_TYPE,
                message_id=f"still-{reason}",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            for reason, body in bad_bodies.items()
        )
        assert await wait_for_dead_count(broker, 2) == 2
    await publish_dead_letters(settings, [refused_score(good)])
    await assert_dead_count_settles_at(settings, 3)

    result = await dlq_ok(settings, "replay")
    assert "replayed 3" in result.stderr, str(result)

    await wait_for_worker(worker, persisted=1)
    assert await stored_ids(db) == {good.score_id}
    async with connect_broker(settings) as broker:
        assert await wait_for_dead_count(broker, 2) == 2
        await broker.assert_stays_empty(QUEUE, seconds=0.3)
    back = {letter.message_id: letter for letter in await peek_dead_letters(settings)}
    assert set(back) == {f"still-{reason}" for reason in bad_bodies}
    for reason, body in bad_bodies.items():
        letter = back[f"still-{reason}"]
        assert letter.body == body
        assert letter.headers[REASON_HEADER] == reason
        assert letter.headers[DETAIL_HEADER]
        assert letter.headers["x-replay-count"] == 1


@pytest.mark.fault
async def test_a_replay_killed_midway_loses_nothing(
    settings: Settings, db: asyncpg.Connection, worker: ScoreWorker
) -> None:
    good = [score_message(prediction_id=f"crash-{i}") for i in range(1900)]
    bad = {f"bad-{i}" for i in range(100)}
    letters = [refused_score(score) for score in good]
    for i, bad_id in enumerate(sorted(bad)):
        letters.insert(i * 20, dead_letter(b"{broken", message_id=bad_id))
    await publish_dead_letters(settings, letters)
    await assert_dead_count_settles_at(settings, len(letters))

    replay = CliProcess("dlq replay", ["dlq", "replay"], settings)
    async with connect_broker(settings) as broker, replay:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        # Kill it once it has taken a good part, but not all, of the dead letters.
        while await broker.ready_count(DEAD_LETTER_QUEUE) > len(letters) - 300:
            assert replay.returncode is None, replay.failure("ended before it was killed")
            assert loop.time() < deadline, replay.failure("replayed too little within 30s")
            await asyncio.sleep(0.01)
        assert replay.returncode is None, replay.failure("ended before it was killed")
        assert await replay.kill() == -signal.SIGKILL

    # Every dead letter is either stored (when good) or back in scores.dead, once the broker
    # has returned what the killed process held and the worker has stored what it replayed.
    good_ids = {score.score_id for score in good}
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        dead_ids = [letter.message_id for letter in await peek_dead_letters(settings)]
        dead_good = {UUID(i) for i in dead_ids if i is not None and i not in bad}
        stored = await stored_ids(db)
        missing_good = good_ids - stored - dead_good
        missing_bad = bad - set(dead_ids)
        if not missing_good and not missing_bad:
            break
        assert asyncio.get_running_loop().time() < deadline, (
            f"after the kill, {len(missing_good)} good scores are neither stored nor dead "
            f"letters, and {len(missing_bad)} invalid ones are not dead letters"
        )
        await asyncio.sleep(0.2)
    assert stored <= good_ids, "only good scores are stored"
    assert 0 < len(stored) < len(good), "the kill should have come part-way"
    assert len(dead_good) < len(good)
    async with connect_broker(settings) as broker:
        await broker.assert_stays_empty(QUEUE, seconds=0.3)
    assert await stored_ids(db) == stored, "nothing still on its way after the settling"
