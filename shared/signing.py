"""Signed messages: the api vouches for what it validated, so the worker need not validate it again.

The api signs every message it publishes with HMAC-SHA256 over the message type and body,
under the newest key in PostgreSQL's `message_signing_keys` (which `migrate` fills), and
puts `<key id>.<hex digest>` in the `x-score-ingest-signature` header. A worker that finds
a signature it can verify with a key it knows stores the message after a lighter decode;
any other message, direct publishers' above all, is validated in full as before.

A signature is only ever a shortcut: a message with a missing, unknown or wrong signature
is not refused, it is validated. So rotating keys, a worker that has not yet seen a new key,
an api that could not load one, or an operator who edited a dead letter before replaying it
all cost speed, never scores. Whoever can read the table can forge signatures, but whoever
can reach the database can write scores anyway; a broker account alone cannot.
"""

import asyncio
import hashlib
import hmac
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Final

import asyncpg

log = logging.getLogger(__name__)

SIGNATURE_HEADER: Final = "x-score-ingest-signature"
KEY_BYTES: Final = 32
KEYS_KEPT: Final = 2  # rotation keeps the new key and the one before it
# How often running apis and workers look for a new key (after `signing-keys rotate`).
REFRESH_SECONDS: Final = 30.0
# The longest a read may take: a starting api or worker waits for its first (PostgreSQL may
# be down or unreachable), and nothing is refused meanwhile.
READ_SECONDS: Final = 1.0

_NEWEST_KEYS = """
SELECT key_id, secret FROM message_signing_keys ORDER BY created_at DESC, key_id DESC LIMIT $1
"""
_LIST_KEYS = """
SELECT key_id, created_at FROM message_signing_keys ORDER BY created_at DESC, key_id DESC
"""
_ADD_KEY = "INSERT INTO message_signing_keys (key_id, secret) VALUES ($1, $2)"
_ADD_FIRST_KEY = """
INSERT INTO message_signing_keys (key_id, secret)
SELECT $1, $2 WHERE NOT EXISTS (SELECT 1 FROM message_signing_keys)
"""
_DROP_OLDER = """
DELETE FROM message_signing_keys
WHERE key_id NOT IN (
    SELECT key_id FROM message_signing_keys ORDER BY created_at DESC, key_id DESC LIMIT $1
)
"""


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A key for signing messages: its id travels in the signature, its secret never does."""

    key_id: str
    secret: bytes = b""

    def __repr__(self) -> str:  # the secret stays out of logs and tracebacks
        return f"SigningKey({self.key_id!r})"

    def sign(self, message_type: str, body: bytes) -> str:
        """The signature header's value for a message of this type and body."""
        return f"{self.key_id}.{_digest(self.secret, message_type, body)}"


def _digest(secret: bytes, message_type: str, body: bytes) -> str:
    mac = hmac.new(secret, message_type.encode(), hashlib.sha256)
    mac.update(b"\n")
    mac.update(body)
    return mac.hexdigest()


def is_signed(
    keys: Mapping[str, SigningKey], message_type: str, body: bytes, signature: object
) -> bool:
    """Whether signature is a valid signature of the message under one of keys."""
    if not isinstance(signature, str):
        return False
    key_id, dot, digest = signature.rpartition(".")
    key = keys.get(key_id) if dot else None
    if key is None or not digest.isascii():  # compare_digest refuses other strings
        return False
    return hmac.compare_digest(digest, _digest(key.secret, message_type, body))


def new_key() -> SigningKey:
    """A fresh random key."""
    return SigningKey(f"msk_{secrets.token_hex(8)}", secrets.token_bytes(KEY_BYTES))


async def ensure_key(conn: asyncpg.Connection) -> bool:
    """Create the first key unless one exists (run by `migrate`); True when this call did."""
    key = new_key()
    status = await conn.execute(_ADD_FIRST_KEY, key.key_id, key.secret)
    return status.endswith(" 1")


async def rotate(conn: asyncpg.Connection) -> SigningKey:
    """Add a new key, which apis sign with from their next refresh; keep only the one before."""
    key = new_key()
    async with conn.transaction():
        await conn.execute(_ADD_KEY, key.key_id, key.secret)
        await conn.execute(_DROP_OLDER, KEYS_KEPT)
    return key


async def list_keys(conn: asyncpg.Connection) -> list[tuple[str, datetime]]:
    """Each key's id and when it was made, newest first; never the secrets."""
    rows = await conn.fetch(_LIST_KEYS)
    return [(row["key_id"], row["created_at"]) for row in rows]


async def newest_keys(pool: asyncpg.Pool | asyncpg.Connection) -> list[SigningKey]:
    """The keys in use, newest first: the api signs with the first, workers accept all."""
    rows = await pool.fetch(_NEWEST_KEYS, KEYS_KEPT)
    return [SigningKey(row["key_id"], bytes(row["secret"])) for row in rows]


class KeyRing:
    """The keys a running api or worker knows, read from PostgreSQL at start (waiting
    READ_SECONDS at most) and every REFRESH_SECONDS. Until a read succeeds there are none:
    the api publishes unsigned messages and the worker validates everything, as it does for
    direct publishers."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self.keys: dict[str, SigningKey] = {}
        self.newest: SigningKey | None = None

    async def refresh(self) -> None:
        """Read the keys now."""
        found = await newest_keys(self._pool)
        self.keys = {key.key_id: key for key in found}
        self.newest = found[0] if found else None

    async def try_refresh(self) -> bool:
        """Refresh within READ_SECONDS; on failure log why and keep the keys known so far."""
        try:
            async with asyncio.timeout(READ_SECONDS):
                await self.refresh()
        except (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresError) as exc:
            # Unreachable, or not yet migrated (UndefinedTableError): try again later.
            log.warning("could not read the message signing keys: %s", exc)
            return False
        if self.newest is None:
            log.warning("no message signing key: run `score-ingest migrate`")
        return True

    async def keep_fresh(self) -> None:
        """Refresh every REFRESH_SECONDS, for ever (after the first read, at start)."""
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            await self.try_refresh()
