"""The HTTP ceiling: validate the body with score-ingest's own model, answer a new id, nothing else.

No authentication, no broker, no database: whatever score-ingest spends beyond this app is
the price of its durability and its checks.
"""

from fastapi import FastAPI

from api.app import NO_OPENTELEMETRY
from api.schemas import ScoreCreateBody, ScoreCreateRes
from shared.ids import new_score_id
from shared.settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    """The bare app; takes settings only to match `api.app.create_app` (see bench.serve)."""
    app = FastAPI(title="bench-bare", telemetry=NO_OPENTELEMETRY)

    @app.post("/v2/{entity}/{project}/scores")
    async def score_create(entity: str, project: str, body: ScoreCreateBody) -> ScoreCreateRes:
        """Validate, then answer an id."""
        return ScoreCreateRes(score_id=str(new_score_id()))

    return app
