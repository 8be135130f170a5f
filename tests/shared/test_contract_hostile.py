"""The contract against hostile input: names, a value's size, scorer refs, message size."""

import json
import re
import unicodedata
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError
from pydantic_core import to_json

from shared.contract import (
    MAX_ID_CHARS,
    MAX_NAME_CHARS,
    MAX_SCORE_MESSAGE_BYTES,
    MAX_SCORER_CHARS,
    MAX_VALUE_BYTES,
    EntityName,
    ScoreBatchMessage,
    ScoreMessage,
)
from shared.settings import Settings
from tests.shared.test_contract import message

SCHEMA_FILE = Path(__file__).parents[2] / "shared" / "score-message.schema.json"
_NAME: TypeAdapter[str] = TypeAdapter(EntityName)
REFUSED_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Zl", "Zp"}
# Egyptian hieroglyph format controls unassigned before Unicode 15, refused ahead of it.
_FORMAT_CONTROLS_OF_UNICODE_15 = range(0x13439, 0x13440)


def name_pattern() -> re.Pattern[str]:
    """The entity name pattern of the shipped JSON Schema."""
    schema: dict[str, Any] = json.loads(SCHEMA_FILE.read_text())
    return re.compile(schema["properties"]["entity"]["pattern"])


def refused(name: str) -> bool:
    try:
        _NAME.validate_python(name)
    except ValidationError:
        return True
    return False


def should_be_refused(code_point: int) -> bool:
    """Control, format, separator (line, paragraph), surrogate, private-use, noncharacter."""
    noncharacter = 0xFDD0 <= code_point <= 0xFDEF or code_point & 0xFFFE == 0xFFFE
    return (
        unicodedata.category(chr(code_point)) in REFUSED_CATEGORIES
        or noncharacter
        or chr(code_point) in "/\\#?%:"
    )


def test_names_refuse_every_control_format_separator_private_and_noncharacter() -> None:
    # Every code point but the bulk of the supplementary private-use planes (their ends are in).
    code_points = [*range(0xF0000), 0xF0000, 0xFFFFD, 0xFFFFE, 0x100000, 0x10FFFF]
    wrong = [
        hex(code_point)
        for code_point in code_points
        if refused(f"a{chr(code_point)}b") != should_be_refused(code_point)
        and code_point not in _FORMAT_CONTROLS_OF_UNICODE_15
    ]
    assert wrong == []


def test_the_schema_pattern_refuses_what_the_model_refuses_in_the_basic_plane() -> None:
    pattern = name_pattern()
    disagree = [
        hex(code_point)
        for code_point in range(0x10000)
        if (pattern.search(f"a{chr(code_point)}b") is None) != refused(f"a{chr(code_point)}b")
    ]
    assert disagree == []


HOSTILE_NAMES = {
    "next line U+0085": "ac\u0085me",
    "right-to-left override": "ac\u202eme",
    "byte order mark": "\ufeffacme",
    "zero-width space": "ac\u200bme",
    "zero-width joiner": "ac\u200dme",
    "line separator": "ac\u2028me",
    "private use": "ac\ue000me",
    "noncharacter": "acme\ufffe",
    "a space": " ",
    "spaces": "   ",
    "no-break space only": "\u00a0",
    "ideographic space only": "\u3000",
    "leading space": " acme",
    "trailing tab": "acme\t",
    "trailing no-break space": "acme\u00a0",
    "dot": ".",
    "dot dot": "..",
    "tag character": "acme\U000e0041",
    "supplementary private use": "acme\U000f0000",
}


@pytest.mark.parametrize("case", HOSTILE_NAMES)
def test_hostile_names_are_refused_by_the_model_and_the_schema(case: str) -> None:
    name = HOSTILE_NAMES[case]
    with pytest.raises(ValidationError):
        ScoreMessage.model_validate_json(json.dumps(message(entity=name)))
    with pytest.raises(ValidationError):
        ScoreMessage.model_validate_json(json.dumps(message(project=name)))
    if all(ord(char) < 0x10000 for char in name):  # the pattern holds the basic plane's part
        assert name_pattern().search(name) is None


@pytest.mark.parametrize("name", ["a b", "...", ".hidden", "a.b", "é", "日本語", "🎉", "a\u00a0b"])
def test_ordinary_names_pass_the_model_and_the_schema(name: str) -> None:
    assert ScoreMessage.model_validate_json(json.dumps(message(project=name))).project == name
    assert name_pattern().search(name) is not None


def test_a_value_is_measured_as_published_json() -> None:
    at_limit = "v" * (MAX_VALUE_BYTES - 2)  # its quotes make MAX_VALUE_BYTES
    assert len(to_json(ScoreMessage.model_validate(message(value=at_limit)).value)) == (
        MAX_VALUE_BYTES
    )
    with pytest.raises(ValidationError, match="more than the"):
        ScoreMessage.model_validate(message(value=at_limit + "v"))
    # Under the limit as received, over it as published: 1e15 becomes 1000000000000000.0.
    expanding = "[" + ",".join(["1e15"] * (MAX_VALUE_BYTES // 8)) + "]"
    assert len(expanding) < MAX_VALUE_BYTES
    raw = json.dumps(message(value=None)).replace('"value": null', f'"value": {expanding}')
    with pytest.raises(ValidationError, match="more than the"):
        ScoreMessage.model_validate_json(raw)


def test_max_score_message_bytes_bounds_the_largest_score_message() -> None:
    escaped = "\x01"  # six bytes as JSON: \u0001
    widest = ScoreMessage.model_validate(
        message(
            entity="🎉" * MAX_NAME_CHARS,
            project="🎉" * MAX_NAME_CHARS,
            prediction_id=escaped * MAX_ID_CHARS,
            evaluation_run_id=escaped * MAX_ID_CHARS,
            created_by=escaped * MAX_ID_CHARS,
            scorer=(prefix := f"weave:///{'🎉' * MAX_NAME_CHARS}/p/op/")
            + escaped * (MAX_SCORER_CHARS - len(prefix) - 2)
            + ":d",
            value="v" * (MAX_VALUE_BYTES - 2),
        )
    )
    # Encoded as the api encodes a score's fields for its message.
    assert len(to_json(widest.model_dump())) <= MAX_SCORE_MESSAGE_BYTES


def test_settings_refuse_a_broker_limit_that_cannot_hold_one_score() -> None:
    with pytest.raises(ValidationError, match="broker_max_message_bytes"):
        Settings(broker_max_message_bytes=MAX_SCORE_MESSAGE_BYTES - 1)
    assert Settings(broker_max_message_bytes=MAX_SCORE_MESSAGE_BYTES)


def test_a_scorer_must_be_the_entitys_own_in_any_of_its_projects() -> None:
    of_another_project = message(scorer="weave:///acme/library/object/judge:d")
    assert ScoreMessage.model_validate(of_another_project).scorer.startswith("weave:///acme/")
    with pytest.raises(ValidationError) as refused_single:
        ScoreMessage.model_validate(message(scorer="weave:///globex/evals/op/f:1"))
    (error,) = refused_single.value.errors()
    assert (error["loc"], error["type"]) == (("scorer",), "scorer_entity")
    assert "'globex'" in error["msg"]

    items = [message() for _ in range(5)]
    items[3]["scorer"] = "weave:///globex/evals/op/f:1"
    with pytest.raises(ValidationError) as refused_batch:
        ScoreBatchMessage.model_validate({"scores": items})
    assert [error["loc"] for error in refused_batch.value.errors()] == [("scores", 3, "scorer")]


def test_an_invalid_entity_is_reported_alone_not_as_a_scorer_of_another_entity() -> None:
    with pytest.raises(ValidationError) as refused_message:
        ScoreMessage.model_validate(message(entity="a/b"))
    assert [error["loc"] for error in refused_message.value.errors()] == [("entity",)]
