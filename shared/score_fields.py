"""A score's fields, declared once.

`SCORE_FIELDS` is the one list of what a score holds. From it come the fields of the message
the api builds from a request (api/service.py), the worker's row from a message, validated
or only parsed (worker/decode.py), the INSERT's columns and parameters (worker/sql.py), and
what a read selects and answers (api/sql.py, api/repository.py).

The pydantic models stay classes of their own, because they hold each field's rules and
descriptions and make the JSON Schemas and the OpenAPI document: `ScoreMessage`
(shared/contract.py), `ScoreCreateBody` and `ScoreReadRes` (api/schemas.py). A test
(tests/shared/test_score_fields.py) checks that they, and the `scores` table once migrated,
agree with this list. Adding a field: declare it here, add it to `ScoreMessage` in the same
place, to `ScoreCreateBody` if the client gives it and `ScoreReadRes` if reads return it,
write the migration adding its column, then `make schema`.
"""

from dataclasses import dataclass
from enum import Enum
from typing import Final


class Kind(Enum):
    """What a field holds; the value is the PostgreSQL type of its column."""

    UUID = "uuid"  # a UUID, as its text in JSON
    TEXT = "text"
    JSON = "jsonb"  # any JSON value
    TIME = "timestamptz"  # ISO 8601 with a zone, in JSON


class Filled(Enum):
    """Who gives a field its value when a score is created through the api."""

    REQUEST = "request"  # the client, in the request body: a field of ScoreCreateBody
    PATH = "path"  # the request's path, /{entity}/{project}/…
    API = "api"  # the api, as it accepts the score: the id, the time, the key's id


@dataclass(frozen=True)
class ScoreField:
    """One field of a score: its name in the message, which is its column's in `scores`."""

    name: str
    kind: Kind
    filled: Filled
    # Null allowed: the message may leave it out (then it is null) and the column is nullable.
    optional: bool = False
    # Its key in the answer of a read or list, if those return it.
    answer: str | None = None


# In the order of the message's fields (ScoreMessage) and of the worker's row.
SCORE_FIELDS: Final = (
    ScoreField("score_id", Kind.UUID, Filled.API, answer="score_id"),
    ScoreField("entity", Kind.TEXT, Filled.PATH),
    ScoreField("project", Kind.TEXT, Filled.PATH),
    ScoreField("prediction_id", Kind.TEXT, Filled.REQUEST),
    ScoreField("scorer", Kind.TEXT, Filled.REQUEST, answer="scorer"),
    ScoreField("value", Kind.JSON, Filled.REQUEST, answer="value"),
    ScoreField(
        "evaluation_run_id", Kind.TEXT, Filled.REQUEST, optional=True, answer="evaluation_run_id"
    ),
    ScoreField("created_at", Kind.TIME, Filled.API),
    ScoreField("created_by", Kind.TEXT, Filled.API, answer="wb_user_id"),
)

FIELD_NAMES: Final = tuple(field.name for field in SCORE_FIELDS)
# What a read or list answers, in the order of its JSON object.
ANSWERED_FIELDS: Final = tuple(field for field in SCORE_FIELDS if field.answer is not None)
