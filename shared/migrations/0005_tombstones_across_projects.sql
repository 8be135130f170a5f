-- A deleted id stays deleted in every project of its entity: a tombstone now belongs to the
-- id within the entity, whichever of its projects a later copy of the message names. Not
-- across entities: a delete by one tenant must never keep another tenant's score, answered
-- 200 and still queued, from being stored. The deleting project is kept, for operators.
-- Where an id has tombstones in several projects of an entity, the first one stays.
DELETE FROM score_tombstones AS later
USING score_tombstones AS earlier
WHERE later.score_id = earlier.score_id
  AND later.entity = earlier.entity
  AND (earlier.deleted_at, earlier.project) < (later.deleted_at, later.project);

ALTER TABLE score_tombstones DROP CONSTRAINT score_tombstones_pkey;
ALTER TABLE score_tombstones ADD PRIMARY KEY (score_id, entity);

-- Workers purge tombstones older than TOMBSTONE_TTL_SECONDS.
CREATE INDEX score_tombstones_by_age ON score_tombstones (deleted_at);
