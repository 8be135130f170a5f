"""Every SQL statement the worker runs."""

# One statement per batch: unnest turns the column arrays back into rows, and the primary
# key makes redelivered or re-published scores no-ops.
INSERT_SCORES = """
INSERT INTO scores (
    score_id, entity, project, prediction_id, scorer, value,
    evaluation_run_id, created_at, created_by
)
SELECT score_id, entity, project, prediction_id, scorer, value::jsonb,
       evaluation_run_id, created_at, created_by
FROM unnest(
    $1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
    $7::text[], $8::timestamptz[], $9::text[]
) AS batch (
    score_id, entity, project, prediction_id, scorer, value,
    evaluation_run_id, created_at, created_by
)
ON CONFLICT (score_id) DO NOTHING
"""
