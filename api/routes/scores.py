"""HTTP endpoints of the scores resource."""

from typing import Any

from fastapi import APIRouter

from api import service
from api.deps import ProjectScopeDep, PublisherDep
from api.schemas import ErrorRes, ScoreCreateBody, ScoreCreateRes

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorRes, "description": "Missing, malformed, unknown or revoked API key"},
    403: {"model": ErrorRes, "description": "The API key is not scoped to this entity/project"},
    413: {"model": ErrorRes, "description": "Request body larger than MAX_BODY_BYTES"},
    503: {
        "model": ErrorRes,
        "description": "Not accepted: the broker (or key store) is unavailable; see Retry-After",
    },
}

router = APIRouter(tags=["Scores"])


@router.post(
    "/v2/{entity}/{project}/scores",
    summary="Create a score",
    description="Creates a score. A 200 means the broker has durably accepted it.",
    responses={200: {"description": "Successful Response"}, **ERROR_RESPONSES},
)
async def score_create(
    scope: ProjectScopeDep, body: ScoreCreateBody, publisher: PublisherDep
) -> ScoreCreateRes:
    """Create one score."""
    score_id = await service.create_score(publisher, scope, body)
    return ScoreCreateRes(score_id=str(score_id))
