-- The worker no longer trusts signatures but the exchange a message came through (README,
-- "Trust model"), so the keys the api signed with go. Apis and workers of the signing
-- releases still running during an upgrade fail to read the keys they already hold and
-- keep them: they go on working, and every message they did not sign is validated.
DROP TABLE IF EXISTS message_signing_keys;
