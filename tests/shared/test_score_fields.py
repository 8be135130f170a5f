"""SCORE_FIELDS, the one declaration of a score's fields, and everything that must agree with it:
the pydantic models, the create route's path, the `scores` table, and what is derived from it
(the api's message, the worker's rows and INSERT, a read's answer)."""

import json
import string
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, cast
from uuid import UUID

import asyncpg
import pytest
from pydantic import BaseModel
from pydantic_core import to_json

from api.deps import ProjectScope, Services
from api.keys import Principal
from api.repository import answer_encoder, score_json
from api.routes.scores import CREATE_PATH
from api.schemas import ScoreCreateBody, ScoreReadRes
from api.service import score_message
from shared.contract import ScoreMessage
from shared.ids import new_score_id
from shared.score_fields import (
    ANSWERED_FIELDS,
    FIELD_NAMES,
    SCORE_FIELDS,
    Filled,
    Kind,
    ScoreField,
)
from worker import sql as worker_sql
from worker.decode import row_of

# A column's type as information_schema names it.
_DATA_TYPES = {
    Kind.UUID: "uuid",
    Kind.TEXT: "text",
    Kind.JSON: "jsonb",
    Kind.TIME: "timestamp with time zone",
}


def _kind_in_schema(model: type[BaseModel], name: str) -> tuple[Kind, bool]:
    """The kind of a model's field, and whether it may be null, read from its JSON Schema."""
    schema = model.model_json_schema()
    found = schema["properties"][name]
    alternatives = found.get("anyOf", [found])
    nullable = {"type": "null"} in alternatives
    (kept,) = [alternative for alternative in alternatives if alternative != {"type": "null"}]
    optional = nullable and name not in schema.get("required", [])
    if "type" not in kept:
        return Kind.JSON, optional
    assert kept["type"] == "string", f"{model.__name__}.{name}: {kept}"
    formats = {"uuid": Kind.UUID, "uuid7": Kind.UUID, "date-time": Kind.TIME}
    return formats.get(kept.get("format", ""), Kind.TEXT), optional


def test_the_message_has_the_declared_fields_in_order_with_their_kinds() -> None:
    assert tuple(ScoreMessage.model_fields) == FIELD_NAMES
    for field in SCORE_FIELDS:
        assert _kind_in_schema(ScoreMessage, field.name) == (field.kind, field.optional), field


def test_the_request_body_has_the_fields_the_client_gives() -> None:
    from_request = [field for field in SCORE_FIELDS if field.filled is Filled.REQUEST]
    assert set(ScoreCreateBody.model_fields) == {field.name for field in from_request}
    for field in from_request:
        assert _kind_in_schema(ScoreCreateBody, field.name) == (field.kind, field.optional)


def test_the_create_path_holds_the_fields_it_fills() -> None:
    in_path = {name for _, name, _, _ in string.Formatter().parse(CREATE_PATH) if name}
    assert in_path == {field.name for field in SCORE_FIELDS if field.filled is Filled.PATH}


def test_a_read_answers_the_declared_fields_in_order() -> None:
    assert tuple(ScoreReadRes.model_fields) == tuple(field.answer for field in ANSWERED_FIELDS)
    assert len({field.answer for field in ANSWERED_FIELDS}) == len(ANSWERED_FIELDS)


async def test_the_scores_table_has_a_column_for_each_field_and_fills_the_others(
    db: asyncpg.Connection,
) -> None:
    columns = {
        row["column_name"]: row
        for row in await db.fetch(
            """
            SELECT column_name, data_type, is_nullable, column_default
            FROM information_schema.columns
            WHERE table_schema = current_schema() AND table_name = 'scores'
            """
        )
    }
    for field in SCORE_FIELDS:
        column = columns.pop(field.name, None)
        assert column is not None, f"no column for {field.name}: write its migration"
        assert column["data_type"] == _DATA_TYPES[field.kind], field
        assert (column["is_nullable"] == "YES") == field.optional, field
    # Every other column is filled by PostgreSQL itself (persisted_at).
    assert {name: column["column_default"] is not None for name, column in columns.items()} == {
        "persisted_at": True
    }


def _scope() -> ProjectScope:
    principal = Principal(key_id="key-1", entity="acme", projects=None)
    # score_message takes nothing from the services.
    return ProjectScope("acme", "evals", principal, cast(Services, None))


def test_the_apis_message_is_the_declared_fields_as_pydantic_writes_them() -> None:
    body = ScoreCreateBody(
        prediction_id="p-1",
        scorer="weave:///acme/evals/op/exact_match:abc",
        value={"correct": True, "ünïcode": [1, 2.5, None]},
        evaluation_run_id="run-1",
    )
    score_id, created_at = new_score_id(), datetime.now(UTC)
    fields = score_message(_scope(), body, score_id, created_at)

    assert tuple(fields) == FIELD_NAMES
    expected = ScoreMessage(
        score_id=score_id,
        entity="acme",
        project="evals",
        prediction_id="p-1",
        scorer="weave:///acme/evals/op/exact_match:abc",
        value={"correct": True, "ünïcode": [1, 2.5, None]},
        evaluation_run_id="run-1",
        created_at=created_at,
        created_by="key-1",
    )
    assert to_json(fields) == expected.model_dump_json().encode()


def test_a_row_holds_the_fields_in_order_as_their_columns_take_them() -> None:
    score = ScoreMessage(
        score_id=new_score_id(),
        entity="acme",
        project="evals",
        prediction_id="p-1",
        scorer="weave:///acme/evals/op/exact_match:abc",
        value={"correct": True},
        created_at=datetime.now(UTC),
        created_by="key-1",
    )
    row = row_of(score)
    assert len(row) == len(SCORE_FIELDS)
    for field, stored in zip(SCORE_FIELDS, row, strict=True):
        given = getattr(score, field.name)
        assert stored == (to_json(given).decode() if field.kind is Kind.JSON else given), field


def test_the_insert_takes_a_parameter_per_field_in_order() -> None:
    statement = " ".join(worker_sql.INSERT_SCORES.split())
    columns = ", ".join(FIELD_NAMES)
    assert f"INSERT INTO scores ({columns}) SELECT" in statement
    parameters = ", ".join(
        f"${index}::{'text' if field.kind is Kind.JSON else field.kind.value}[]"
        for index, field in enumerate(SCORE_FIELDS, 1)
    )
    assert f"FROM unnest({parameters}) AS batch ({columns})" in statement


def test_a_read_answer_is_the_json_of_the_declared_answers() -> None:
    score_id = new_score_id()
    row = (score_id, "weave:///acme/evals/op/x:1", '{"a": [1, "é"]}', None, "key-\u00fc")
    assert json.loads(score_json(row)) == {
        "score_id": str(score_id),
        "scorer": "weave:///acme/evals/op/x:1",
        "value": {"a": [1, "é"]},
        "evaluation_run_id": None,
        "wb_user_id": "key-ü",
    }


@pytest.mark.parametrize("optional", [False, True])
def test_a_read_answer_can_hold_a_field_of_every_kind(optional: bool) -> None:
    fields = [
        ScoreField(f"a_{kind.name}", kind, Filled.API, optional, answer=f"the_{kind.name}")
        for kind in Kind
    ]
    at = datetime(2026, 11, 25, 11, 37, 6, 852095, tzinfo=timezone(timedelta(hours=2)))
    values: dict[Kind, Any] = {
        Kind.UUID: UUID("01a2127e-c224-754b-b7f6-ca83214f3892"),
        Kind.TEXT: 'quote " backslash \\ tab \t ☃',
        Kind.JSON: '{"n": 1.5, "list": [true, null]}',
        Kind.TIME: at,
    }
    answer = answer_encoder(fields)
    assert json.loads(answer([values[kind] for kind in Kind])) == {
        "the_UUID": "01a2127e-c224-754b-b7f6-ca83214f3892",
        "the_TEXT": 'quote " backslash \\ tab \t ☃',
        "the_JSON": {"n": 1.5, "list": [True, None]},
        "the_TIME": "2026-11-25T11:37:06.852095+02:00",
    }
    if optional:
        assert json.loads(answer([None] * len(fields))) == {
            f"the_{kind.name}": None for kind in Kind
        }
