"""Every SQL statement the API side runs."""

from shared.score_fields import ANSWERED_FIELDS, Kind, ScoreField


def _answered_column(field: ScoreField) -> str:
    # jsonb as PostgreSQL's own text: the answer embeds it as it is.
    return f"{field.name}::text AS {field.name}" if field.kind is Kind.JSON else field.name


# What a read or list selects: the fields its answer holds, in order (api/repository.py).
_ANSWERED_COLUMNS = ", ".join(_answered_column(field) for field in ANSWERED_FIELDS)

INSERT_KEY = """
INSERT INTO api_keys (key_id, secret_hash, entity, projects, name)
VALUES ($1, $2, $3, $4, $5)
RETURNING key_id, entity, projects, name, created_at, revoked_at
"""

LIST_KEYS = """
SELECT key_id, entity, projects, name, created_at, revoked_at
FROM api_keys
WHERE $1::text IS NULL OR entity = $1
ORDER BY created_at, key_id
"""

REVOKE_KEY = """
UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())
WHERE key_id = $1
RETURNING key_id
"""

# A key with its own quota and its entity's (api/quotas.py), read as one record.
FIND_KEY = """
SELECT k.key_id, k.secret_hash, k.entity, k.projects, k.revoked_at IS NOT NULL AS revoked,
       k.quota_rate, k.quota_burst, e.rate AS entity_rate, e.burst AS entity_burst
FROM api_keys AS k
LEFT JOIN entity_quotas AS e ON e.entity = k.entity
WHERE k.key_id = $1
"""

LIST_KEY_QUOTAS = """
SELECT key_id, quota_rate, quota_burst
FROM api_keys
WHERE ($1::text IS NULL OR entity = $1) AND quota_rate IS NOT NULL
"""

SET_KEY_QUOTA = """
UPDATE api_keys SET quota_rate = $2, quota_burst = $3
WHERE key_id = $1
RETURNING key_id
"""

FIND_ENTITY_QUOTA = "SELECT rate, burst FROM entity_quotas WHERE entity = $1"

SET_ENTITY_QUOTA = """
INSERT INTO entity_quotas (entity, rate, burst) VALUES ($1, $2, $3)
ON CONFLICT (entity) DO UPDATE SET rate = $2, burst = $3, updated_at = now()
"""

CLEAR_ENTITY_QUOTA = "DELETE FROM entity_quotas WHERE entity = $1 RETURNING entity"

READ_SCORE = f"""
SELECT {_ANSWERED_COLUMNS}
FROM scores
WHERE entity = $1 AND project = $2 AND score_id = $3
"""

# The scores of a create that asked for them back (Prefer: return=representation).
READ_SCORES = f"""
SELECT {_ANSWERED_COLUMNS}
FROM scores
WHERE entity = $1 AND project = $2 AND score_id = ANY($3::uuid[])
"""

# Which of some ids the worker will never store (a tombstone in the entity): a read need
# not wait for them, since their announcement is past. A refused id is waited for still: its
# publisher may send it again, fixed.
DELETED_IDS = """
SELECT score_id FROM score_tombstones WHERE entity = $1 AND score_id = ANY($2::uuid[])
"""

# The scores the worker announced as settled that requests wait for, in whatever project
# (each request takes those of its own): the project first, then what a read answers.
READ_SETTLED = f"""
SELECT entity, project, {_ANSWERED_COLUMNS}
FROM scores
WHERE score_id = ANY($1::uuid[])
"""

# What became of a score, as the project's key may know it: stored in the project, deleted
# in the entity (a tombstone keeps the id out of every project of the entity), and the
# latest refusal of a message that named the project.
SCORE_FATE = """
SELECT
    (SELECT persisted_at FROM scores
     WHERE score_id = $3 AND entity = $1 AND project = $2) AS stored_at,
    (SELECT deleted_at FROM score_tombstones
     WHERE score_id = $3 AND entity = $1) AS deleted_at,
    failure.reason, failure.detail, failure.failed_at
FROM (SELECT 1) AS one
LEFT JOIN LATERAL (
    SELECT reason, detail, failed_at FROM score_failures
    WHERE score_id = $3 AND entity = $1 AND project = $2
    ORDER BY failed_at DESC
    LIMIT 1
) AS failure ON true
"""

# A page of a list: creation order is score_id order (score ids are UUIDv7), and a page
# starts after a score id (keyset paging), found in the index on (entity, project[,
# evaluation_run_id], score_id), so a page deep into a project costs what the first does.
# OFFSET serves only a list's first page, and the api bounds it. Two statements rather
# than one with "$n IS NULL OR ...": a prepared statement's generic plan could not use the
# evaluation run's index for that.
LIST_SCORES_PAGE = f"""
SELECT {_ANSWERED_COLUMNS}
FROM scores
WHERE entity = $1 AND project = $2 AND score_id > $3
ORDER BY score_id
LIMIT $4 OFFSET $5
"""

LIST_RUN_SCORES_PAGE = f"""
SELECT {_ANSWERED_COLUMNS}
FROM scores
WHERE entity = $1 AND project = $2 AND evaluation_run_id = $3 AND score_id > $4
ORDER BY score_id
LIMIT $5 OFFSET $6
"""

# Exclusive per-project lock; inserts take it shared (worker/sql.py).
LOCK_PROJECT_EXCLUSIVE = "SELECT pg_advisory_xact_lock(hashtextextended($1 || '/' || $2, 0))"

# A tombstone belongs to the id within the entity: the worker never stores it again in any
# of the entity's projects (and never lets it keep another entity's score out). None for an
# id stored in another project (a delete never touches another project's stored scores) or
# that is not a UUIDv7 (no score can have it).
INSERT_TOMBSTONES = """
INSERT INTO score_tombstones (score_id, entity, project)
SELECT ids.score_id, $1, $2
FROM unnest($3::uuid[]) AS ids (score_id)
WHERE substr(ids.score_id::text, 15, 1) = '7'
  AND NOT EXISTS (
    SELECT 1 FROM scores AS s
    WHERE s.score_id = ids.score_id AND (s.entity <> $1 OR s.project <> $2)
  )
ON CONFLICT (score_id, entity) DO NOTHING
"""

DELETE_SCORES = """
DELETE FROM scores WHERE entity = $1 AND project = $2 AND score_id = ANY($3::uuid[])
"""

# Records the key unless it exists and has not expired; either way returns the stored ids
# and request hash. Run again when it returns nothing: a concurrent first use (or renewal
# of an expired key) committed after this statement's snapshot was taken, and only a new
# statement sees it; an expired row is never returned.
CLAIM_IDEMPOTENCY_KEY = """
WITH claimed AS (
    INSERT INTO idempotency_keys (entity, project, idempotency_key, request_hash, score_ids)
    VALUES ($1, $2, $3, $4, $5::uuid[])
    ON CONFLICT (entity, project, idempotency_key) DO UPDATE
        SET request_hash = excluded.request_hash,
            score_ids = excluded.score_ids,
            created_at = now()
        WHERE idempotency_keys.created_at < now() - make_interval(secs => $6)
    RETURNING request_hash, score_ids
)
SELECT request_hash, score_ids FROM claimed
UNION ALL
SELECT request_hash, score_ids FROM idempotency_keys
WHERE entity = $1 AND project = $2 AND idempotency_key = $3
  AND created_at >= now() - make_interval(secs => $6)
  AND NOT EXISTS (SELECT 1 FROM claimed)
"""
