-- Why the worker refused a score (dead-lettered it), so that whoever created it can ask
-- (GET .../scores/{score_id}/status). One row per score each time it is refused, with the
-- entity and project its message named: a key sees only its own entity's and project's.
-- Workers purge rows older than SCORE_FAILURE_TTL_SECONDS.
CREATE TABLE score_failures (
    score_id  uuid        NOT NULL,
    entity    text        NOT NULL,
    project   text        NOT NULL,
    reason    text        NOT NULL,
    detail    text        NOT NULL,
    failed_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX score_failures_by_score ON score_failures (score_id, entity, project, failed_at);
CREATE INDEX score_failures_by_age ON score_failures (failed_at);
