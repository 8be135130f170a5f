"""The message contract: storability rules, and the shipped JSON Schema agreeing with the model."""

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pydantic import ValidationError

from shared.contract import MAX_JSON_DEPTH, ScoreMessage, message_json_schema
from shared.ids import new_score_id

SCHEMA_FILE = Path(__file__).parents[2] / "shared" / "score-message.schema.json"


def message(**overrides: Any) -> dict[str, Any]:
    """A valid message body as JSON-ready data."""
    body: dict[str, Any] = {
        "score_id": str(new_score_id()),
        "entity": "acme",
        "project": "evals",
        "prediction_id": "p-1",
        "scorer": "weave:///acme/evals/op/exact_match:abc",
        "value": {"correct": True},
        "evaluation_run_id": None,
        "created_at": datetime.now(UTC).isoformat(),
        "created_by": "billing-service",
    }
    body.update(overrides)
    return body


def nested(depth: int) -> Any:
    """A value with `depth` levels of containers."""
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def test_shipped_schema_is_generated_from_the_model() -> None:
    assert json.loads(SCHEMA_FILE.read_text()) == message_json_schema(), "run `make schema`"


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"value": None},
        {"value": 10**40},
        {"value": nested(MAX_JSON_DEPTH)},
        {"value": {"tab\tkey": "line\nbreak ☃ 🎯"}},
        {"evaluation_run_id": "run-1"},
        {"scorer": "weave:///acme/proj/object/judge:d/attr/x/index/0"},
    ],
)
def test_valid_messages_pass_the_model_and_the_schema(overrides: dict[str, Any]) -> None:
    body = message(**overrides)
    parsed = ScoreMessage.model_validate_json(json.dumps(body))
    assert parsed.value == body["value"]
    jsonschema.validate(body, json.loads(SCHEMA_FILE.read_text()))


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (json.dumps(message(value={"a": ["x\u0000"]})), "value['a'][0]: string contains a NUL"),
        (json.dumps(message(value={"k\u0000": 1})), "object key contains a NUL"),
        (json.dumps(message(value=nested(MAX_JSON_DEPTH + 1))), "nested deeper than 64"),
        (json.dumps(message(value=10**1000)), "more than 1000 digits"),
        (json.dumps(message()).replace('"value": {"correct": true}', '"value": NaN'), "NaN"),
        (json.dumps(message()).replace('{"correct": true}', "1e400"), "infinite"),
    ],
    # Named, not by the raw message: it holds a new score id in each process that collects it.
    ids=["nul-in-string", "nul-in-key", "too-deep", "too-many-digits", "nan", "infinity"],
)
def test_unstorable_values_are_refused_with_the_reason(raw: str, needle: str) -> None:
    with pytest.raises(ValidationError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        ScoreMessage.model_validate_json(raw)


@pytest.mark.parametrize(
    "overrides",
    [
        {"score_id": None},
        {"entity": "a/b"},
        {"project": "p:q"},
        {"project": "x" * 129},
        {"prediction_id": ""},
        {"prediction_id": "p\u0000"},
        {"scorer": "weave:///acme/evals/table/t:1"},
        {"created_by": "x" * 257},
        {"unexpected": 1},
    ],
)
def test_schema_violations_are_refused_by_model_and_schema(overrides: dict[str, Any]) -> None:
    body = message(**overrides)
    with pytest.raises(ValidationError):
        ScoreMessage.model_validate_json(json.dumps(body))
    assert not jsonschema.Draft202012Validator(json.loads(SCHEMA_FILE.read_text())).is_valid(body)


@pytest.mark.parametrize(
    "overrides",
    [
        {"score_id": "4d1c5f8e-9a43-4c1e-8f3a-2b6d7e8f9a0b"},  # a UUIDv4
        {"created_at": "2026-11-25T10:00:00"},  # no time zone
    ],
)
def test_the_model_refuses_what_json_schema_formats_cannot_express(
    overrides: dict[str, Any],
) -> None:
    with pytest.raises(ValidationError):
        ScoreMessage.model_validate_json(json.dumps(message(**overrides)))


def test_message_json_round_trips_exactly() -> None:
    original = ScoreMessage.model_validate_json(
        json.dumps(message(value={"n": 12345678901234567890123, "f": 0.1, "s": "é"}))
    )
    assert ScoreMessage.model_validate_json(original.model_dump_json()) == original
