-- API keys: only a SHA-256 of the secret is kept. projects NULL means every project of the entity.
CREATE TABLE api_keys (
    key_id      text        PRIMARY KEY,
    secret_hash bytea       NOT NULL,
    entity      text        NOT NULL,
    projects    text[],
    name        text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

CREATE INDEX api_keys_by_entity ON api_keys (entity);
