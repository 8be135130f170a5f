"""Every SQL statement the worker runs."""

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

# One statement per batch: unnest turns the column arrays back into rows; the primary key
# makes redelivered or re-published scores no-ops, and tombstones keep deleted ids deleted
# in every project of the entity that deleted them.
INSERT_SCORES = """
INSERT INTO scores (
    score_id, entity, project, prediction_id, scorer, value,
    evaluation_run_id, created_at, created_by
)
SELECT batch.score_id, batch.entity, batch.project, batch.prediction_id, batch.scorer,
       batch.value::jsonb, batch.evaluation_run_id, batch.created_at, batch.created_by
FROM unnest(
    $1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
    $7::text[], $8::timestamptz[], $9::text[]
) AS batch (
    score_id, entity, project, prediction_id, scorer, value,
    evaluation_run_id, created_at, created_by
)
WHERE NOT EXISTS (
    SELECT 1 FROM score_tombstones AS t
    WHERE t.score_id = batch.score_id AND t.entity = batch.entity
)
ON CONFLICT (score_id) DO NOTHING
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
