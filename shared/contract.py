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
)
from pydantic_core import PydanticCustomError

from shared.refs import InvalidRefError, parse_weave_ref

MESSAGE_TYPE: Final = "score.create.v1"
BATCH_MESSAGE_TYPE: Final = "score.batch.v1"
CONTENT_TYPE: Final = "application/json"

MAX_NAME_CHARS: Final = 128
MAX_ID_CHARS: Final = 256
MAX_SCORER_CHARS: Final = 2048
MAX_JSON_DEPTH: Final = 64
MAX_INT_DIGITS: Final = 1000
MAX_BATCH_SCORES: Final = 1000

_NAME_FORBIDDEN = re.compile(r"[/\\#?%:\x00-\x1f\x7f\ud800-\udfff]")
_TEXT_FORBIDDEN = re.compile(r"[\x00\ud800-\udfff]")
_MAX_INT = 10**MAX_INT_DIGITS


@lru_cache(maxsize=4096)
def _check_name(value: str) -> str:
    # Cached: a project's scores, and every score of a batch, share their entity and project.
    if _NAME_FORBIDDEN.search(value):
        raise PydanticCustomError(
            "name_chars", "must not contain / \\ # ? % : or control characters"
        )
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
    problem = _scorer_problem(value)
    if problem is not None:
        raise PydanticCustomError(
            "weave_ref",
            "must be a Weave object or op reference "
            f"(weave:///<entity>/<project>/object|op/<name>:<digest>): {problem}",
        )
    return value


@lru_cache(maxsize=4096)
def _scorer_problem(value: str) -> str | None:
    # Cached: the scores of an evaluation, and of a batch, nearly always share their scorer.
    try:
        parse_weave_ref(value)
    except InvalidRefError as exc:
        return str(exc)
    return None


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
    return value


_NAME_PATTERN = r"^[^/\\#?%:\u0000-\u001f\u007f]+$"
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
            f"(no NUL characters, finite numbers, nested at most {MAX_JSON_DEPTH} levels)"
        )
    ),
]


class ScoreMessage(BaseModel):
    """Body of a `score.create.v1` message on exchange `scores`, routing key `score.create`."""

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
