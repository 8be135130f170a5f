-- Scores as the worker persists them. score_id is a UUIDv7, so its order is creation order.
CREATE TABLE scores (
    score_id          uuid        PRIMARY KEY,
    entity            text        NOT NULL,
    project           text        NOT NULL,
    prediction_id     text        NOT NULL,
    scorer            text        NOT NULL,
    value             jsonb       NOT NULL,
    evaluation_run_id text,
    created_at        timestamptz NOT NULL,
    created_by        text        NOT NULL,
    persisted_at      timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX scores_by_project ON scores (entity, project, score_id);
CREATE INDEX scores_by_evaluation_run ON scores (entity, project, evaluation_run_id, score_id);
