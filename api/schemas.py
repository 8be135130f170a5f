"""Request and response bodies of the scores endpoints, named as in the Weave service API."""

from typing import Any, Literal

from pydantic import BaseModel, Field

from shared.contract import MAX_BATCH_SCORES, Identifier, ScorerRef, StorableJson


class ScoreCreateBody(BaseModel):
    """Request body for creating a Score through the REST API.

    This model has no project_id: RESTful endpoints take it from the URL path.
    """

    evaluation_run_id: Identifier | None = Field(
        default=None,
        description="Optional evaluation run ID to link this score as a child call",
    )
    prediction_id: Identifier = Field(description="The prediction ID")
    scorer: ScorerRef = Field(description="The scorer reference (weave:// URI)")
    value: StorableJson = Field(description="The raw output of the scorer")


class ScoreCreateRes(BaseModel):
    """The id of the score the broker has confirmed."""

    score_id: str = Field(description="The score ID")


class ErrorRes(BaseModel):
    """Any error other than a validation error."""

    detail: str = Field(description="What went wrong")


MAX_BATCH_ITEMS = MAX_BATCH_SCORES  # a batch request becomes one batch message
MAX_DELETE_IDS = 1000
DEFAULT_LIST_LIMIT = 10_000
MAX_LIST_LIMIT = 1_000_000
# Skipping costs PostgreSQL a walk over every row skipped; deeper pages take `after`.
MAX_LIST_OFFSET = 10_000


class ScoreReadRes(BaseModel):
    """A stored score, as read and listed."""

    score_id: str = Field(description="The score ID")
    scorer: str = Field(description="The scorer reference (weave:// URI)")
    value: Any = Field(description="The raw output of the scorer")
    evaluation_run_id: str | None = Field(
        default=None, description="Evaluation run ID if this score is linked to one"
    )
    wb_user_id: str | None = Field(
        default=None, description="Who created the score: the id of the API key used"
    )


class ScoreDeleteRes(BaseModel):
    """How many stored scores a delete removed."""

    num_deleted: int = Field(description="Number of scores deleted")


class ScoreBatchCreateBody(BaseModel):
    """Many scores in one request: all are accepted, or none."""

    scores: list[ScoreCreateBody] = Field(
        min_length=1, max_length=MAX_BATCH_ITEMS, description="The scores, at most 1000"
    )


class ScoreBatchCreateRes(BaseModel):
    """The ids of the batch's scores, in request order, all confirmed by the broker."""

    score_ids: list[str] = Field(description="Score IDs in the order of the request")


ScoreState = Literal["accepted", "stored", "dead_lettered", "deleted", "unknown"]


class ScoreStatusRes(BaseModel):
    """What became of a score, as far as the service knows (README, "Read your writes")."""

    state: ScoreState = Field(
        description=(
            "`stored`: readable in this project. `deleted`: deleted, and never stored again. "
            "`dead_lettered`: the worker refused its message (see reason) and it waits in "
            "scores.dead; a replay that stores it makes it `stored`. `accepted`: a UUIDv7 "
            "minted within READ_WAIT_RECENT_SECONDS that is none of those yet: if a create "
            "was answered 200 with it, it is in flight to the database. `unknown`: none of "
            "these, and older, or not a UUIDv7"
        )
    )
    reason: str = Field(description="Why, in words: when it was stored or deleted, or why refused")
