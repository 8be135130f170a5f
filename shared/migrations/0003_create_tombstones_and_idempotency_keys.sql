-- A deleted score leaves a tombstone, so a later copy of its message (redelivered, still
-- queued, replayed from dead letters) is never stored again. Scoped to the project, so a
-- delete in one project cannot suppress another project's score.
CREATE TABLE score_tombstones (
    entity     text        NOT NULL,
    project    text        NOT NULL,
    score_id   uuid        NOT NULL,
    deleted_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (entity, project, score_id)
);

-- Idempotency-Key → the score ids it was answered with, and a hash of the request body.
CREATE TABLE idempotency_keys (
    entity          text        NOT NULL,
    project         text        NOT NULL,
    idempotency_key text        NOT NULL,
    request_hash    bytea       NOT NULL,
    score_ids       uuid[]      NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (entity, project, idempotency_key)
);

CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);
