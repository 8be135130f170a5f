"""Every SQL statement the worker runs."""

from shared.score_fields import SCORE_FIELDS, Kind, ScoreField
from shared.stored_events import CHANNEL

# Shared per-project locks: inserts run side by side, while a delete in the same project
# (which takes the lock exclusively, see api/sql.py) waits for them and they for it, so a
# score can never slip in between a delete's tombstone and its DELETE.
LOCK_PROJECTS_SHARED = """
SELECT pg_advisory_xact_lock_shared(hashtextextended(entity || '/' || project, 0))
FROM (
    SELECT DISTINCT entity, project FROM unnest($1::text[], $2::text[]) AS t (entity, project)
    ORDER BY entity, project
) AS projects
"""


def _array_type(field: ScoreField) -> str:
    # A JSON value travels as its text (the row holds it so) and becomes jsonb in the SELECT.
    return f"{Kind.TEXT.value if field.kind is Kind.JSON else field.kind.value}[]"


def _stored(field: ScoreField) -> str:
    cast = "::jsonb" if field.kind is Kind.JSON else ""
    return f"batch.{field.name}{cast}"


_COLUMNS = ", ".join(field.name for field in SCORE_FIELDS)
_ARRAYS = ", ".join(f"${i}::{_array_type(field)}" for i, field in enumerate(SCORE_FIELDS, 1))
_STORED = ", ".join(_stored(field) for field in SCORE_FIELDS)

# One statement per batch. Its parameters are one array per column, in the order of
# SCORE_FIELDS (a row's), which unnest turns back into rows. The primary key makes
# redelivered or re-published scores no-ops, and tombstones keep deleted ids deleted in every
# project of the entity that deleted them. It returns what the accept-to-stored histogram
# needs of the rows it stored (worker/_metrics.py), counted by entity and created_at: a
# batch message's scores share theirs, so a batch is a few rows, not one per score.
INSERT_SCORES = f"""
WITH stored AS (
    INSERT INTO scores ({_COLUMNS})
    SELECT {_STORED}
    FROM unnest({_ARRAYS}) AS batch ({_COLUMNS})
    WHERE NOT EXISTS (
        SELECT 1 FROM score_tombstones AS t
        WHERE t.score_id = batch.score_id AND t.entity = batch.entity
    )
    ON CONFLICT (score_id) DO NOTHING
    RETURNING entity, created_at
)
SELECT entity, created_at, count(*)::int AS scores FROM stored GROUP BY entity, created_at
"""

# The apis' waiting reads hear of settled ids through NOTIFY, sent at commit
# (shared/stored_events.py): one notification per payload, in one statement.
ANNOUNCE_SETTLED = (
    f"SELECT count(pg_notify('{CHANNEL}', payload)) FROM unnest($1::text[]) AS payload"
)

# Why scores were refused, one row each, for GET .../scores/{score_id}/status.
INSERT_FAILURES = """
INSERT INTO score_failures (score_id, entity, project, reason, detail)
SELECT failed.score_id, failed.entity, failed.project, $4, $5
FROM unnest($1::uuid[], $2::text[], $3::text[]) AS failed (score_id, entity, project)
"""

PURGE_IDEMPOTENCY_KEYS = """
DELETE FROM idempotency_keys
WHERE ctid IN (
    SELECT ctid FROM idempotency_keys
    WHERE created_at < now() - make_interval(secs => $1)
    LIMIT $2
)
"""

PURGE_TOMBSTONES = """
DELETE FROM score_tombstones
WHERE ctid IN (
    SELECT ctid FROM score_tombstones
    WHERE deleted_at < now() - make_interval(secs => $1)
    LIMIT $2
)
"""

PURGE_FAILURES = """
DELETE FROM score_failures
WHERE ctid IN (
    SELECT ctid FROM score_failures
    WHERE failed_at < now() - make_interval(secs => $1)
    LIMIT $2
)
"""
