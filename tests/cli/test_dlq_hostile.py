"""`score-ingest dlq` over dead letters no client library would write, as a subprocess.

A body of 100,000 `[` then as many `]` (dead-lettered by the real worker as invalid JSON), a
header table nested 3000 levels deep, header keys and values that are not UTF-8, a binary
body, properties full of terminal escapes and console markup, a body of megabytes: each
must be listed, shown, exported, counted for replay and purged by its id, while ordinary
letters beside it stay where they are, in order. Messages client libraries refuse to
encode are put on the wire byte for byte by tests.support.raw_amqp.
"""

import base64
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import aio_pika
import asyncpg
import pytest

from cli._dead_letters import describe
from shared import field_tables
from shared.contract import CONTENT_TYPE, MESSAGE_TYPE, ScoreMessage
from shared.dead_letters import DETAIL_HEADER, QUEUE_HEADER, REASON_HEADER, TIME_HEADER
from shared.settings import Settings
from shared.topology import DEAD_LETTER_EXCHANGE, QUEUE, ROUTING_KEY
from tests.cli.test_dlq import (
    Peeked,
    assert_dead_count_settles_at,
    dlq_ok,
    json_lines,
    peek_dead_letters,
    publish_dead_letters,
    refused_score,
    stored_ids,
    table_rows,
    wait_for_dead_count,
    wait_for_worker,
)
from tests.conftest import ENTITY, PROJECT
from tests.support.messages import to_amqp_message
from tests.support.processes import connect_broker, running_worker, score_message
from tests.support.raw_amqp import (
    field_table,
    long_string,
    nested_table,
    publish_raw,
    raw_message,
)
from worker.worker import ScoreWorker

DEEP_JSON_BODY = b"[" * 100_000 + b"]" * 100_000
HEADER_DEPTH = 3000
BINARY_BODY = bytes(range(256)) * 64
HUGE_VALUE_BYTES = 6 * 1024 * 1024
# The raw bytes of the odd-properties letter, and how dlq writes them: bytes that are not
# UTF-8 as \xff (by field_tables), then every unprintable character escaped too.
ODD_MESSAGE_ID = b"[/bold]\x1b[31mred\xff"
ODD_ID = "[/bold]\\x1b[31mred\\xff"
ODD_REASON = b"\x1b[2J[red]boom[/red]"
ODD_REASON_SHOWN = "\\x1b[2J[red]boom[/red]"
EXPORT_KEYS = {
    "id",
    "reason",
    "detail",
    "dead_lettered_at",
    "source_queue",
    "entity",
    "project",
    "size",
    "content_type",
    "type",
    "message_id",
    "headers",
}


@dataclass(frozen=True)
class Letter:
    """A dead letter a test put in scores.dead, and what `dlq` must say about it."""

    name: str
    id: str
    reason: str
    entity_project: str
    body: bytes


@dataclass(frozen=True)
class Hostile:
    """The letters of the `hostile` fixture, in their order in scores.dead."""

    letters: Sequence[Letter]
    stored_on_replay: frozenset[str]  # ids of the letters a replay stores

    def __getitem__(self, name: str) -> Letter:
        (letter,) = [letter for letter in self.letters if letter.name == name]
        return letter

    @property
    def ids(self) -> list[str]:
        """Every id, in queue order."""
        return [letter.id for letter in self.letters]


def _score_json(score: ScoreMessage, **changes: Any) -> bytes:
    fields: dict[str, Any] = json.loads(score.model_dump_json())
    fields.update(changes)
    return json.dumps(fields).encode()


def _dead_letter_headers(reason: bytes, *extra: tuple[bytes, bytes]) -> bytes:
    """A header table as the worker writes it, plus extra (raw key, encoded value) fields."""
    return field_table(
        [
            (REASON_HEADER.encode(), long_string(reason)),
            (DETAIL_HEADER.encode(), long_string(b"refused")),
            (TIME_HEADER.encode(), long_string(datetime.now(UTC).isoformat().encode())),
            (QUEUE_HEADER.encode(), long_string(QUEUE.encode())),
            *extra,
        ]
    )


async def _publish_raw_dead_letter(settings: Settings, message: Any) -> None:
    await publish_raw(settings.amqp_url, DEAD_LETTER_EXCHANGE, ROUTING_KEY, [message])


def _id_of(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()[:16]


@pytest.fixture
async def hostile(settings: Settings) -> Hostile:
    """Eight dead letters, published one after the other (so their order is known): an
    ordinary one, six hostile ones, another ordinary one. No worker left running."""
    # Peeking at the letters in this process must survive them too.
    field_tables.install()
    first, deep_header_score, odd_score, last = (score_message() for _ in range(4))
    huge_body = _score_json(score_message(), score_id=None, value="x" * HUGE_VALUE_BYTES)
    non_utf8_body = _score_json(score_message(), colour="red")
    ours = f"{ENTITY}/{PROJECT}"
    letters = [
        Letter("first", str(first.score_id), "schema_violation", ours, to_amqp_message(first).body),
        Letter("deep-json", "hostile-deep-json", "invalid_json", "?/?", DEEP_JSON_BODY),
        Letter(
            "deep-header",
            str(deep_header_score.score_id),
            "storage_rejected",
            ours,
            to_amqp_message(deep_header_score).body,
        ),
        Letter(
            "non-utf8-header",
            "hostile-non-utf8",
            "schema_violation",
            ours,
            non_utf8_body,
        ),
        Letter("binary", _id_of(BINARY_BODY), "unsupported_content_type", "?/?", BINARY_BODY),
        Letter(
            "odd-properties",
            ODD_ID,
            ODD_REASON_SHOWN,
            ours,
            to_amqp_message(odd_score).body,
        ),
        Letter("huge", "hostile-huge", "schema_violation", ours, huge_body),
        Letter("last", str(last.score_id), "schema_violation", ours, to_amqp_message(last).body),
    ]

    async with connect_broker(settings) as broker:
        await publish_dead_letters(settings, [refused_score(first)])
        assert await wait_for_dead_count(broker, 1) == 1
        async with running_worker(settings):
            await broker.publish(
                [
                    aio_pika.Message(
                        body=DEEP_JSON_BODY,
                        content_type=CONTENT_TYPE,
                        message_id="hostile-deep-json",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    )
                ]
            )
            assert await wait_for_dead_count(broker, 2) == 2
        await _publish_raw_dead_letter(
            settings,
            raw_message(
                to_amqp_message(deep_header_score).body,
                headers=_dead_letter_headers(
                    b"storage_rejected", (b"x-deep", nested_table(HEADER_DEPTH))
                ),
                message_id=str(deep_header_score.score_id).encode(),
                message_type=MESSAGE_TYPE.encode(),
            ),
        )
        await _publish_raw_dead_letter(
            settings,
            raw_message(
                non_utf8_body,
                headers=field_table(
                    [
                        (REASON_HEADER.encode(), long_string(b"schema_violation")),
                        (DETAIL_HEADER.encode(), long_string(b"caf\xe9 \xff")),
                        (b"x-\xffkey", long_string(b"\xfe\xfd")),
                    ]
                ),
                message_id=b"hostile-non-utf8",
            ),
        )
        await _publish_raw_dead_letter(
            settings,
            raw_message(
                BINARY_BODY,
                content_type=b"application/octet-stream",
                headers=_dead_letter_headers(b"unsupported_content_type"),
            ),
        )
        await _publish_raw_dead_letter(
            settings,
            raw_message(
                to_amqp_message(odd_score).body,
                headers=field_table(
                    [
                        (REASON_HEADER.encode(), long_string(ODD_REASON)),
                        (TIME_HEADER.encode(), long_string(b"yesterday")),
                    ]
                ),
                message_id=ODD_MESSAGE_ID,
                message_type=MESSAGE_TYPE.encode() + b"\xff",
                timestamp=2**63 - 1,
            ),
        )
        await publish_dead_letters(
            settings,
            [
                aio_pika.Message(
                    body=huge_body,
                    headers={REASON_HEADER: "schema_violation"},
                    content_type=CONTENT_TYPE,
                    message_id="hostile-huge",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                )
            ],
        )
        await publish_dead_letters(settings, [refused_score(last)])
        assert await wait_for_dead_count(broker, len(letters)) == len(letters)
    return Hostile(letters, frozenset({letters[0].id, letters[2].id, letters[-1].id}))


async def assert_left_in_order(settings: Settings, expected: Sequence[Letter]) -> list[Peeked]:
    """scores.dead holds exactly these letters, in this order, bodies intact."""
    await assert_dead_count_settles_at(settings, len(expected))
    remaining = await peek_dead_letters(settings)
    assert [letter.body for letter in remaining] == [letter.body for letter in expected], [
        letter.message_id for letter in remaining
    ]
    return remaining


async def test_list_shows_every_letter_escaped(settings: Settings, hostile: Hostile) -> None:
    result = await dlq_ok(settings, "list")

    rows = table_rows(result.stdout)
    assert set(rows) == set(hostile.ids), str(result)
    for letter in hostile.letters:
        _, reason, _, entity_project, size = rows[letter.id][:5]
        assert (reason, entity_project, size) == (
            letter.reason,
            letter.entity_project,
            str(len(letter.body)),
        ), letter.name
    assert "\x1b" not in result.stdout, "a publisher's escape sequence reached the terminal"
    assert f"{len(hostile.letters)} dead letter(s)" in result.stderr
    await assert_left_in_order(settings, hostile.letters)

    only = await dlq_ok(settings, "list", "--id", hostile["deep-header"].id)
    assert list(table_rows(only.stdout)) == [hostile["deep-header"].id], str(only)


async def _show(settings: Settings, letter: Letter) -> dict[str, Any]:
    result = await dlq_ok(settings, "show", letter.id)
    shown: dict[str, Any] = json.loads(result.stdout)
    assert shown["id"] == letter.id
    return shown


async def test_show_and_export_give_what_cannot_be_decoded_as_escapes(
    settings: Settings, hostile: Hostile, tmp_path: Path
) -> None:
    shown = await _show(settings, hostile["deep-json"])
    assert shown["body"] == DEEP_JSON_BODY.decode()
    assert shown["reason"] == "invalid_json"

    shown = await _show(settings, hostile["deep-header"])
    assert (shown["entity"], shown["project"]) == (ENTITY, PROJECT)
    table, depth = shown["headers"]["x-deep"], 1
    while isinstance(table, dict):
        table, depth = table["n"], depth + 1
    assert depth <= field_tables.MAX_DEPTH + 1
    assert "nested deeper than" in table, table

    shown = await _show(settings, hostile["non-utf8-header"])
    assert shown["headers"]["x-\\xffkey"] == "\\xfe\\xfd"
    assert shown["detail"] == "caf\\xe9 \\xff"
    assert shown["body"] == hostile["non-utf8-header"].body.decode()

    shown = await _show(settings, hostile["binary"])
    assert "body" not in shown
    assert base64.b64decode(shown["body_base64"]) == BINARY_BODY
    assert shown["body_escaped"] == BINARY_BODY.decode(errors="backslashreplace")

    shown = await _show(settings, hostile["odd-properties"])
    assert shown["message_id"] == ODD_MESSAGE_ID.decode(errors="backslashreplace")
    assert shown["reason"] == ODD_REASON.decode()
    assert shown["type"] == MESSAGE_TYPE + "\\xff"
    assert shown["dead_lettered_at"] is None

    target = tmp_path / "dead.jsonl"
    result = await dlq_ok(settings, "export", str(target))
    assert f"exported {len(hostile.letters)}" in result.stderr, str(result)
    exported = json_lines(target.read_text())
    assert [line["id"] for line in exported] == hostile.ids
    for line, letter in zip(exported, hostile.letters, strict=True):
        body = base64.b64decode(line["body_base64"]) if "body_base64" in line else line["body"]
        assert body == (letter.body if "body_base64" in line else letter.body.decode())
        assert set(line) - {"body", "body_base64"} == EXPORT_KEYS, letter.name
    # An ordinary letter's line is what it always was: its body as text.
    assert exported[0]["body"] == hostile["first"].body.decode()
    await assert_left_in_order(settings, hostile.letters)


async def test_replay_dry_run_counts_every_letter_and_moves_none(
    settings: Settings, hostile: Hostile, db: asyncpg.Connection
) -> None:
    dry = await dlq_ok(settings, "replay", "--dry-run")
    assert f"would replay {len(hostile.letters)}" in dry.stderr, str(dry)
    one = await dlq_ok(settings, "replay", "--dry-run", "--id", hostile["binary"].id)
    assert "would replay 1" in one.stderr, str(one)
    async with connect_broker(settings) as broker:
        await broker.assert_stays_empty(QUEUE, seconds=0.3)
    assert await db.fetchval("SELECT count(*) FROM scores") == 0
    await assert_left_in_order(settings, hostile.letters)


def _delivery_counts(letters: Sequence[Peeked]) -> dict[bytes, int]:
    return {letter.body: int(letter.headers.get("x-delivery-count", 0)) for letter in letters}


async def test_export_and_purge_by_id_touch_one_letter_and_leave_the_rest_in_order(
    settings: Settings, hostile: Hostile, tmp_path: Path
) -> None:
    one = await dlq_ok(settings, "export", "-", "--id", hostile["odd-properties"].id)
    (line,) = json_lines(one.stdout)
    assert line["id"] == hostile["odd-properties"].id
    # Each pass delivers each letter once (x-delivery-count, where the broker counts the
    # returns, rises by at most one per pass: this purge's and the peek's).
    before = _delivery_counts(await assert_left_in_order(settings, hostile.letters))
    purged_file = tmp_path / "purged.jsonl"
    remaining = list(hostile.letters)
    order = ("non-utf8-header", "deep-json", "binary", "deep-header", "odd-properties")
    for name in order:
        letter = hostile[name]
        result = await dlq_ok(
            settings, "purge", "--id", letter.id, "--yes", "--export", str(purged_file)
        )
        assert "purged 1" in result.stderr, str(result)
        remaining.remove(letter)
        left = await assert_left_in_order(settings, remaining)
        if name == order[0]:
            after = _delivery_counts(left)
            assert all(after[body] - before[body] <= 2 for body in after), (before, after)
    purged = json_lines(purged_file.read_text())
    assert [line["id"] for line in purged] == [hostile[name].id for name in order]
    assert base64.b64decode(purged[2]["body_base64"]) == BINARY_BODY

    unknown = await dlq_ok(settings, "purge", "--id", "no-such-letter", "--yes")
    assert "purged 0" in unknown.stderr, str(unknown)
    await assert_left_in_order(settings, remaining)


async def test_replay_stores_what_is_valid_and_returns_the_rest_with_a_reason(
    settings: Settings, hostile: Hostile, db: asyncpg.Connection, worker: ScoreWorker
) -> None:
    result = await dlq_ok(settings, "replay")
    assert f"replayed {len(hostile.letters)}" in result.stderr, str(result)

    await wait_for_worker(worker, persisted=len(hostile.stored_on_replay))
    assert {str(score_id) for score_id in await stored_ids(db)} == hostile.stored_on_replay
    returned = [letter for letter in hostile.letters if letter.id not in hostile.stored_on_replay]
    await assert_dead_count_settles_at(settings, len(returned))
    # The worker's order of dead-lettering is its own business: letters are found by body.
    names = {letter.body: letter.name for letter in returned}
    back = {names[letter.body]: letter for letter in await peek_dead_letters(settings)}
    assert {name: letter.headers[REASON_HEADER] for name, letter in back.items()} == {
        "deep-json": "invalid_json",
        "non-utf8-header": "schema_violation",
        "binary": "unsupported_content_type",
        "odd-properties": "unsupported_message_type",
        "huge": "schema_violation",
    }
    assert back["odd-properties"].message_id == ODD_MESSAGE_ID.decode(errors="backslashreplace")
    # Headers that were not UTF-8 went out as their escapes, and came back so.
    assert back["non-utf8-header"].headers["x-\\xffkey"] == "\\xfe\\xfd"
    assert all(letter.headers["x-replay-count"] == 1 for letter in back.values())


@pytest.mark.parametrize(
    "body",
    [
        DEEP_JSON_BODY,
        b'{"entity": "e", "project": "p", "value": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"entity": "e\xff", "project": "p"}',
        b'{"entity": "e", "project": "p", "n": 1' + b"0" * 5000 + b"}",
        BINARY_BODY,
        b"\xef\xbb\xbf{}",
        b"",
    ],
    ids=["deep-array", "deep-value", "not-utf8", "huge-int", "binary", "bom", "empty"],
)
def test_describe_never_raises_on_a_body(body: bytes) -> None:
    message = SimpleNamespace(headers={}, body=body, message_id=None, content_type=None, type=None)
    letter = describe(cast(Any, message))
    assert (letter.entity, letter.project) == (None, None)
    assert letter.id == _id_of(body)
    json.dumps(letter.to_json(escaped_body=True))
