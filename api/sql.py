"""Every SQL statement the API side runs."""

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

FIND_KEY = """
SELECT key_id, secret_hash, entity, projects, revoked_at IS NOT NULL AS revoked
FROM api_keys
WHERE key_id = $1
"""
