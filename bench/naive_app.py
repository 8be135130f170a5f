"""What a team builds without a queue: validate, INSERT the score, commit, then answer.

Same body model and the same table shape as score-ingest's `scores`, in a table of its own
(`naive_scores`) of the bench database; one asyncpg pool of `DB_POOL_MAX_SIZE` connections.
A 200 here is durable too: the row is committed before the answer.
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from fastapi import FastAPI, Request
from pydantic_core import to_json

from api.app import NO_OPENTELEMETRY
from api.schemas import ScoreCreateBody, ScoreCreateRes
from shared.ids import new_score_id
from shared.settings import Settings, get_settings

CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS naive_scores (
    score_id          uuid        PRIMARY KEY,
    entity            text        NOT NULL,
    project           text        NOT NULL,
    prediction_id     text        NOT NULL,
    scorer            text        NOT NULL,
    value             jsonb       NOT NULL,
    evaluation_run_id text,
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS naive_scores_by_project ON naive_scores (entity, project, score_id);
CREATE INDEX IF NOT EXISTS naive_scores_by_evaluation_run
    ON naive_scores (entity, project, evaluation_run_id, score_id);
"""

INSERT_SCORE = """
INSERT INTO naive_scores (
    score_id, entity, project, prediction_id, scorer, value, evaluation_run_id
) VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7)
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    """The naive app; its pool opens in the lifespan, on DATABASE_URL."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = await asyncpg.create_pool(
            settings.database_url, min_size=1, max_size=settings.db_pool_max_size
        )
        await pool.execute(CREATE_TABLE)
        app.state.pool = pool
        try:
            yield
        finally:
            await pool.close()

    app = FastAPI(title="bench-naive", lifespan=lifespan, telemetry=NO_OPENTELEMETRY)

    @app.post("/v2/{entity}/{project}/scores")
    async def score_create(
        entity: str, project: str, body: ScoreCreateBody, request: Request
    ) -> ScoreCreateRes:
        """Validate, insert and commit, then answer the id."""
        score_id = new_score_id()
        pool: asyncpg.Pool = request.app.state.pool
        await pool.execute(
            INSERT_SCORE,
            score_id,
            entity,
            project,
            body.prediction_id,
            body.scorer,
            to_json(body.value).decode(),
            body.evaluation_run_id,
        )
        return ScoreCreateRes(score_id=str(score_id))

    return app
