"""Request and response bodies of the scores endpoints, named as in the Weave service API."""

from pydantic import BaseModel, Field

from shared.contract import Identifier, ScorerRef, StorableJson


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
