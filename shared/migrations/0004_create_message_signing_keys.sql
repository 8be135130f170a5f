-- Keys the api signs its messages with (HMAC-SHA256, see shared/signing.py); `migrate`
-- creates the first one. The secret is kept as is: verifying a signature needs it.
CREATE TABLE message_signing_keys (
    key_id     text        PRIMARY KEY,
    secret     bytea       NOT NULL CHECK (octet_length(secret) >= 32),
    created_at timestamptz NOT NULL DEFAULT now()
);
