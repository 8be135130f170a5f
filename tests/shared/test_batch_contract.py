"""The score.batch.v1 contract: the model's rules, and the shipped JSON Schema agreeing with it."""

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from cli.main import app
from shared.contract import (
    BATCH_MESSAGE_TYPE,
    MAX_BATCH_SCORES,
    MESSAGE_TYPE,
    ScoreBatchMessage,
    message_json_schema,
)
from tests.shared.test_contract import message

SCHEMA_FILE = Path(__file__).parents[2] / "shared" / "score-batch-message.schema.json"


def shipped_schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(SCHEMA_FILE.read_text())
    return schema


def batch(count: int, **extra: Any) -> dict[str, Any]:
    """A batch body of count valid messages, as JSON-ready data."""
    return {"scores": [message(prediction_id=f"p-{i}") for i in range(count)], **extra}


def with_bad_item(count: int, index: int, **changes: Any) -> dict[str, Any]:
    """A batch of count messages whose item at index has changes."""
    body = batch(count)
    body["scores"][index].update(changes)
    return body


def test_shipped_schema_is_generated_from_the_model() -> None:
    assert shipped_schema() == message_json_schema(BATCH_MESSAGE_TYPE), "run `make schema`"


def test_the_schema_command_prints_the_batch_schema_that_make_schema_ships() -> None:
    result = CliRunner().invoke(app, ["schema", "--batch"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == message_json_schema(BATCH_MESSAGE_TYPE)
    single = CliRunner().invoke(app, ["schema"])
    assert single.exit_code == 0, single.output
    assert json.loads(single.output) == message_json_schema(MESSAGE_TYPE)


def test_the_batch_schema_names_its_type_and_items_are_the_single_message_schema() -> None:
    schema = shipped_schema()
    assert schema["$id"] == f"urn:score-ingest:message:{BATCH_MESSAGE_TYPE}"
    jsonschema.Draft202012Validator.check_schema(schema)
    single = message_json_schema(MESSAGE_TYPE)
    item = schema["$defs"]["ScoreMessage"]
    assert {key: value for key, value in single.items() if not key.startswith("$")} == item


@pytest.mark.parametrize("count", [1, 2, MAX_BATCH_SCORES])
def test_batches_of_one_to_the_maximum_pass_the_model_and_the_schema(count: int) -> None:
    body = batch(count)
    parsed = ScoreBatchMessage.model_validate_json(json.dumps(body))
    assert [str(score.score_id) for score in parsed.scores] == [
        item["score_id"] for item in body["scores"]
    ]
    jsonschema.validate(body, shipped_schema())


@pytest.mark.parametrize(
    ("body", "loc", "error_type"),
    [
        pytest.param(batch(0), ("scores",), "too_short", id="empty"),
        pytest.param(batch(MAX_BATCH_SCORES + 1), ("scores",), "too_long", id="over-maximum"),
        pytest.param(batch(2, note="x"), ("note",), "extra_forbidden", id="extra-field"),
        pytest.param({}, ("scores",), "missing", id="no-scores"),
        pytest.param({"scores": message()}, ("scores",), "list_type", id="scores-not-a-list"),
        pytest.param(
            with_bad_item(5, 3, entity="a/b"), ("scores", 3, "entity"), "name_chars", id="entity"
        ),
        pytest.param(
            with_bad_item(5, 0, scorer="weave:///acme/evals/table/t:1"),
            ("scores", 0, "scorer"),
            "weave_ref",
            id="scorer",
        ),
        pytest.param(
            with_bad_item(4, 3, prediction_id="p\u0000"),
            ("scores", 3, "prediction_id"),
            "unstorable_text",
            id="nul",
        ),
        pytest.param(
            with_bad_item(3, 1, surprise=1),
            ("scores", 1, "surprise"),
            "extra_forbidden",
            id="extra-item-field",
        ),
        pytest.param(
            with_bad_item(MAX_BATCH_SCORES, MAX_BATCH_SCORES - 1, project=""),
            ("scores", MAX_BATCH_SCORES - 1, "project"),
            "string_too_short",
            id="last-of-the-maximum",
        ),
    ],
)
def test_invalid_batches_are_refused_by_model_and_schema(
    body: dict[str, Any], loc: tuple[str | int, ...], error_type: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        ScoreBatchMessage.model_validate_json(json.dumps(body))
    errors = caught.value.errors()
    assert [(error["loc"], error["type"]) for error in errors] == [(loc, error_type)]
    assert not jsonschema.Draft202012Validator(shipped_schema()).is_valid(body)


def test_a_batch_with_two_bad_items_names_both() -> None:
    body = with_bad_item(9, 2, value={"k": "\u0000"})
    body["scores"][7]["created_at"] = "yesterday"
    with pytest.raises(ValidationError) as caught:
        ScoreBatchMessage.model_validate_json(json.dumps(body))
    assert {error["loc"][:3] for error in caught.value.errors()} == {
        ("scores", 2, "value"),
        ("scores", 7, "created_at"),
    }


def test_a_single_score_is_not_a_batch_nor_a_batch_a_single_score() -> None:
    with pytest.raises(ValidationError):
        ScoreBatchMessage.model_validate_json(json.dumps(message()))
    assert not jsonschema.Draft202012Validator(shipped_schema()).is_valid(message())
    single_schema = json.loads((SCHEMA_FILE.parent / "score-message.schema.json").read_text())
    assert not jsonschema.Draft202012Validator(single_schema).is_valid(batch(1))
