-- Quotas (api/quotas.py): a rate in scores per second and a burst, per key and per entity.
-- A key's are NULL unless set (QUOTA_KEY_RATE and QUOTA_KEY_BURST then apply); an entity
-- without a row gets QUOTA_ENTITY_RATE and QUOTA_ENTITY_BURST. Adding nullable columns
-- without a default rewrites nothing, so this is instant on a live api_keys.
ALTER TABLE api_keys
    ADD COLUMN quota_rate  integer CHECK (quota_rate > 0),
    ADD COLUMN quota_burst integer CHECK (quota_burst > 0),
    ADD CONSTRAINT api_keys_quota_whole CHECK ((quota_rate IS NULL) = (quota_burst IS NULL));

CREATE TABLE entity_quotas (
    entity     text        PRIMARY KEY,
    rate       integer     NOT NULL CHECK (rate > 0),
    burst      integer     NOT NULL CHECK (burst > 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);
