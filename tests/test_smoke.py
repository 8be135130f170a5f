"""POST a score through the in-process API and a real worker into PostgreSQL."""

import asyncpg
import httpx

from tests.conftest import ENTITY, PROJECT, basic_auth, score_body, wait_for_count
from worker.worker import ScoreWorker


async def test_post_persists_a_row(
    client: httpx.AsyncClient, api_key: str, worker: ScoreWorker, db: asyncpg.Connection
) -> None:
    response = await client.post(
        f"/v2/{ENTITY}/{PROJECT}/scores", json=score_body(), headers=basic_auth(api_key)
    )
    assert response.status_code == 200, response.text
    score_id = response.json()["score_id"]
    assert await wait_for_count(db, "SELECT count(*) FROM scores", 1) == 1
    row = await db.fetchrow("SELECT score_id, entity, project FROM scores")
    assert row is not None
    assert (str(row["score_id"]), row["entity"], row["project"]) == (score_id, ENTITY, PROJECT)
