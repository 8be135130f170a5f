"""Scores written straight into PostgreSQL with COPY, bypassing the api and the broker: for
tests of reading that need many rows quickly."""

from collections.abc import Callable
from datetime import UTC, datetime

import asyncpg

from shared.ids import new_score_id
from tests.conftest import ENTITY, PROJECT

SCORER = f"weave:///{ENTITY}/{PROJECT}/op/exact_match:abc123"
COLUMNS = [
    "score_id",
    "entity",
    "project",
    "prediction_id",
    "scorer",
    "value",
    "evaluation_run_id",
    "created_at",
    "created_by",
]


async def copy_scores(
    db: asyncpg.Connection,
    rows: int,
    *,
    value: Callable[[int], str] = str,
    evaluation_run_id: Callable[[int], str] = lambda i: "run-big",
    created_by: str = "key-tests",
) -> list[str]:
    """COPY rows into scores (the i-th with value(i) as its JSON value); their ids, in order."""
    score_ids = sorted(new_score_id() for _ in range(rows))
    assert len(set(score_ids)) == rows
    now = datetime.now(UTC)
    await db.copy_records_to_table(
        "scores",
        columns=COLUMNS,
        records=(
            (
                score_id,
                ENTITY,
                PROJECT,
                f"p-{i}",
                SCORER,
                value(i),
                evaluation_run_id(i),
                now,
                created_by,
            )
            for i, score_id in enumerate(score_ids)
        ),
    )
    return [str(score_id) for score_id in score_ids]
