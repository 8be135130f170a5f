"""The score message contract: field rules and the message both sides validate.

The API validates requests with these field types, publishes `ScoreMessage`, and the worker
validates every message it consumes with the same model, so nothing can be accepted on one
side and refused on the other. The rules also refuse what JSON allows but PostgreSQL cannot
store (NUL characters, lone surrogates, NaN and infinities, runaway nesting).
"""

import math
import re
from datetime import UTC, datetime
from functools import lru_cache
from typing import Annotated, Any, Final

from pydantic import (
    UUID7,
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError, to_json

from shared.refs import InvalidRefError, WeaveRef, parse_weave_ref

MESSAGE_TYPE: Final = "score.create.v1"
BATCH_MESSAGE_TYPE: Final = "score.batch.v1"
CONTENT_TYPE: Final = "application/json"

MAX_NAME_CHARS: Final = 128
MAX_ID_CHARS: Final = 256
MAX_SCORER_CHARS: Final = 2048
MAX_JSON_DEPTH: Final = 64
MAX_INT_DIGITS: Final = 1000
MAX_BATCH_SCORES: Final = 1000
# A score's value, as the JSON stored and published: the api's default body limit, for
# direct publishers and batch items too.
MAX_VALUE_BYTES: Final = 1024 * 1024
# The most a score.create.v1 body can take: the value plus every text field at its longest
# with every character escaped as \uXXXX (6 bytes), and the keys, id and time.
MAX_SCORE_MESSAGE_BYTES: Final = (
    MAX_VALUE_BYTES + 6 * (2 * MAX_NAME_CHARS + 3 * MAX_ID_CHARS + MAX_SCORER_CHARS) + 1024
)

# Characters no entity or project name may hold: W&B's / \ # ? % :, and every control
# (Cc), format (Cf: bidi overrides, zero-width characters, the BOM), line and paragraph
# separator (Zl, Zp), surrogate (Cs), private-use (Co) and noncharacter code point. A fixed
# list rather than unicodedata, so that the api and the worker agree whatever their Python's
# Unicode version (a test checks it against unicodedata). The JSON Schema's pattern holds
# the Basic Multilingual Plane's part: astral ranges have no regex syntax that both
# ECMA-262 and Python read the same.
_NAME_FORBIDDEN_BMP = (
    r"/\\#?%:\u0000-\u001f\u007f-\u009f\u00ad\u0600-\u0605\u061c\u06dd\u070f"
    r"\u0890\u0891\u08e2\u180e\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u206f"
    r"\ud800-\udfff\ue000-\uf8ff\ufdd0-\ufdef\ufeff\ufff9-\ufffb\ufffe\uffff"
)
_NAME_FORBIDDEN_ASTRAL = (
    r"\U000110bd\U000110cd\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a"
    r"\U000e0001\U000e0020-\U000e007f\U000f0000-\U0010ffff"
    + "".join(f"\\U{plane:04x}fffe\\U{plane:04x}ffff" for plane in range(1, 15))
)
_NAME_FORBIDDEN = re.compile(f"[{_NAME_FORBIDDEN_BMP}{_NAME_FORBIDDEN_ASTRAL}]")
_TEXT_FORBIDDEN = re.compile(r"[\x00\ud800-\udfff]")
_MAX_INT = 10**MAX_INT_DIGITS


@lru_cache(maxsize=4096)
def _check_name(value: str) -> str:
    # Cached: a project's scores, and every score of a batch, share their entity and project.
    if _NAME_FORBIDDEN.search(value):
        raise PydanticCustomError(
            "name_chars",
            "must not contain / \\ # ? % :, or control, format, line or paragraph separator, "
            "surrogate, private-use or noncharacter code points",
        )
    if value[:1].isspace() or value[-1:].isspace():
        raise PydanticCustomError("name_whitespace", "must not start or end with whitespace")
    if value in (".", ".."):
        raise PydanticCustomError("name_dots", 'must not be "." or ".."')
    return value


_NUL_PROBLEM = "contains a NUL character (\\u0000), which PostgreSQL cannot store"


def _text_problem(value: str) -> str | None:
    if value.isascii():  # nearly every string, and it can only hide a NUL: a quicker test
        return _NUL_PROBLEM if "\x00" in value else None
    match = _TEXT_FORBIDDEN.search(value)
    if match is None:
        return None
    if match.group() == "\x00":
        return _NUL_PROBLEM
    return "contains a lone UTF-16 surrogate, which is not valid Unicode"


def _check_text(value: str) -> str:
    problem = _text_problem(value)
    if problem:
        raise PydanticCustomError("unstorable_text", problem)
    return value


def _check_utc_representable(value: datetime) -> datetime:
    if not value.utcoffset():  # already UTC: nothing to convert, no range to leave
        return value
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise PydanticCustomError(
            "datetime_range", "must lie between years 1 and 9999 once in UTC"
        ) from None


def _check_scorer(value: str) -> str:
    _check_text(value)
    parsed = _parse_scorer(value)
    if isinstance(parsed, str):
        raise PydanticCustomError(
            "weave_ref",
            "must be a Weave object or op reference "
            f"(weave:///<entity>/<project>/object|op/<name>:<digest>): {parsed}",
        )
    return value


@lru_cache(maxsize=4096)
def _parse_scorer(value: str) -> WeaveRef | str:
    """The parsed ref, or what is wrong with it."""
    # Cached: the scores of an evaluation, and of a batch, nearly always share their scorer.
    try:
        return parse_weave_ref(value)
    except InvalidRefError as exc:
        return str(exc)


def scorer_entity_problem(scorer: str, entity: str) -> str | None:
    """Why a valid scorer ref may not be used by a score of entity, or None if it may.

    A scorer is the entity's own: a ref may name any of its projects, never another
    entity's object, which a score would otherwise link to across tenants.
    """
    parsed = _parse_scorer(scorer)
    if isinstance(parsed, str) or parsed.entity == entity:
        return None
    return f"must name an object or op of entity {entity!r}, not of {parsed.entity!r}"


class _Unstorable(Exception):
    def __init__(self, path: str, problem: str) -> None:
        super().__init__(problem)
        self.path = path
        self.problem = problem


def _walk(value: Any, depth: int) -> None:
    kind = type(value)
    if kind is str:
        problem = _text_problem(value)
        if problem:
            raise _Unstorable("", f"string {problem}")
    elif kind is dict or kind is list:
        if depth >= MAX_JSON_DEPTH:
            raise _Unstorable("", f"nested deeper than {MAX_JSON_DEPTH} levels")
        items = value.items() if kind is dict else enumerate(value)
        for key, item in items:
            if kind is dict:
                problem = _text_problem(key) if isinstance(key, str) else None
                if problem:
                    raise _Unstorable(f"[{key!r}]", f"object key {problem}")
            item_kind = type(item)
            # Scalars are checked here rather than in a call each: most values are flat.
            if item is None or item_kind is bool or (item_kind is str and not _text_problem(item)):
                continue
            if item_kind is float and math.isfinite(item):
                continue
            if item_kind is int and -_MAX_INT < item < _MAX_INT:
                continue
            try:
                _walk(item, depth + 1)
            except _Unstorable as exc:
                exc.path = f"[{key!r}]{exc.path}"
                raise
    else:
        _walk_other(value, depth)


def _walk_other(value: Any, depth: int) -> None:
    """Values not of JSON's own types: subclasses, tuples, and what JSON cannot hold."""
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, str):
        _walk(str(value), depth)
    elif isinstance(value, int):
        if not -_MAX_INT < value < _MAX_INT:
            raise _Unstorable("", f"integer has more than {MAX_INT_DIGITS} digits")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise _Unstorable("", "NaN and infinite numbers are not JSON and cannot be stored")
    elif isinstance(value, dict):
        _walk(dict(value), depth)
    elif isinstance(value, list | tuple):
        _walk(list(value), depth)
    else:
        raise _Unstorable("", f"{type(value).__name__} is not a JSON value")


def _check_storable_json(value: Any) -> Any:
    try:
        _walk(value, 0)
    except _Unstorable as exc:
        # The message is built here, not by pydantic's template: the path quotes the client's
        # own object keys, which may contain {placeholders}.
        raise PydanticCustomError("unstorable_json", f"value{exc.path}: {exc.problem}") from None
    # Measured as published and stored, not as received: numbers can take several times the
    # bytes they came in (1e15 is 1000000000000000.0).
    size = len(to_json(value))
    if size > MAX_VALUE_BYTES:
        raise PydanticCustomError(
            "value_too_large",
            f"takes {size} bytes as JSON, more than the {MAX_VALUE_BYTES} a value may take",
        )
    return value


_NAME_PATTERN = rf"^(?!\.\.?$)(?!\s)(?!.*\s$)[^{_NAME_FORBIDDEN_BMP}]+$"
_TEXT_PATTERN = r"^[^\u0000]+$"

_Name = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_NAME_CHARS),
    AfterValidator(_check_name),
    Field(json_schema_extra={"pattern": _NAME_PATTERN}),
]
EntityName = Annotated[_Name, Field(description="W&B entity (team or user) name")]
ProjectName = Annotated[_Name, Field(description="Project name within the entity")]
Identifier = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_ID_CHARS),
    AfterValidator(_check_text),
    Field(json_schema_extra={"pattern": _TEXT_PATTERN}),
]
ScorerRef = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_SCORER_CHARS),
    AfterValidator(_check_scorer),
    Field(
        description="The scorer reference (weave:// URI)",
        json_schema_extra={"pattern": r"^weave:///[^/]+/[^/]+/(object|op)/[^/:]+:[^/:]+(/.*)?$"},
    ),
]
StorableJson = Annotated[
    Any,
    AfterValidator(_check_storable_json),
    Field(
        description=(
            "The raw output of the scorer: any JSON value PostgreSQL jsonb can store "
            f"(no NUL characters, finite numbers, nested at most {MAX_JSON_DEPTH} levels), "
            f"at most {MAX_VALUE_BYTES} bytes as compact JSON"
        )
    ),
]


class ScoreMessage(BaseModel):
    """Body of a `score.create.v1` message on exchange `scores`, routing key `score.create`."""

    # The fields of SCORE_FIELDS (shared/score_fields.py), in its order: the docstring and
    # the fields' descriptions are the JSON Schema's.
    model_config = ConfigDict(extra="forbid", frozen=True, title="ScoreMessage")

    score_id: UUID7 = Field(description="UUIDv7 assigned by the API (or the publisher)")
    entity: EntityName
    project: ProjectName
    prediction_id: Identifier = Field(description="The prediction ID")
    scorer: ScorerRef
    value: StorableJson
    evaluation_run_id: Identifier | None = Field(
        default=None, description="Optional evaluation run ID to link this score to"
    )
    created_at: Annotated[AwareDatetime, AfterValidator(_check_utc_representable)] = Field(
        description="When the API accepted the score (UTC)"
    )
    created_by: Identifier = Field(description="Id of the API key that created the score")

    @field_validator("scorer")
    @classmethod
    def _scorer_of_the_entity(cls, scorer: str, info: ValidationInfo) -> str:
        entity = info.data.get("entity")  # absent when the entity itself was invalid
        problem = None if entity is None else scorer_entity_problem(scorer, entity)
        if problem is not None:
            raise PydanticCustomError("scorer_entity", problem)
        return scorer


class ScoreBatchMessage(BaseModel):
    """Body of a `score.batch.v1` message: scores stored together, all of them or none."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="ScoreBatchMessage")

    scores: list[ScoreMessage] = Field(
        min_length=1,
        max_length=MAX_BATCH_SCORES,
        description=f"The scores, 1 to {MAX_BATCH_SCORES}; one invalid score refuses them all",
    )


def message_json_schema(message_type: str = MESSAGE_TYPE) -> dict[str, Any]:
    """The JSON Schema of a message type's body, as shipped in shared/*.schema.json."""
    model = ScoreBatchMessage if message_type == BATCH_MESSAGE_TYPE else ScoreMessage
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"urn:score-ingest:message:{message_type}",
        **model.model_json_schema(),
    }
