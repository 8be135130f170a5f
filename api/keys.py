"""API keys: how they look, how they are stored (hashed) and how they are checked.

A key reads `si_<key_id>_<secret>`. The key id is public and finds the row; only a SHA-256
of the whole key is stored. SHA-256 suits here because keys carry 256 random bits, so
there is nothing to brute-force and checking stays cheap on the hot path.
"""

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from api import sql
from api.errors import AuthBackendUnavailable, InvalidCredentials
from api.quotas import (
    NO_STORED_QUOTAS,
    Quota,
    QuotaLedger,
    StoredQuotas,
    TokenBucket,
)
from api.repository import BoundedPool
from shared.db import DATABASE_UNAVAILABLE

log = logging.getLogger(__name__)

_KEY_PATTERN = re.compile(r"si_([0-9a-f]{16})_[A-Za-z0-9_-]{43}")
# Key ids found to have no key, remembered so that a client retrying with a wrong key costs
# no lookup each time; apart from the known keys, and small: made-up ids are endless.
UNKNOWN_KEYS_REMEMBERED = 1024


@dataclass(frozen=True)
class Principal:
    """Who a verified key speaks for: one entity, and all or some of its projects; and the
    quotas stored for the key and its entity when it was read."""

    key_id: str
    entity: str
    projects: frozenset[str] | None
    quotas: StoredQuotas = NO_STORED_QUOTAS

    def may_access(self, entity: str, project: str) -> bool:
        """Whether this key is scoped to entity/project."""
        return entity == self.entity and (self.projects is None or project in self.projects)


@dataclass(frozen=True)
class KeyInfo:
    """A stored key as `keys list` shows it; never the secret."""

    key_id: str
    entity: str
    projects: tuple[str, ...] | None
    name: str | None
    created_at: datetime
    revoked_at: datetime | None
    quota: Quota | None = None


@dataclass(frozen=True)
class _StoredKey:
    secret_hash: bytes
    principal: Principal
    revoked: bool


def hash_key(key: str) -> bytes:
    """The stored form of a key."""
    return hashlib.sha256(key.encode()).digest()


def _key_info(row: asyncpg.Record, quota: Quota | None) -> KeyInfo:
    projects = row["projects"]
    return KeyInfo(
        key_id=row["key_id"],
        entity=row["entity"],
        projects=tuple(projects) if projects is not None else None,
        name=row["name"],
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
        quota=quota,
    )


async def create_key(
    conn: asyncpg.Connection,
    entity: str,
    projects: Sequence[str] = (),
    name: str | None = None,
    quota: Quota | None = None,
) -> tuple[KeyInfo, str]:
    """Store a new key for entity (optionally only some projects, and with a quota of its
    own); returns it and its secret."""
    key_id = secrets.token_hex(8)
    key = f"si_{key_id}_{secrets.token_urlsafe(32)}"
    async with conn.transaction():
        row = await conn.fetchrow(
            sql.INSERT_KEY, key_id, hash_key(key), entity, sorted(set(projects)) or None, name
        )
        assert row is not None
        if quota is not None:
            await set_key_quota(conn, key_id, quota)
    return _key_info(row, quota), key


async def list_keys(conn: asyncpg.Connection, entity: str | None = None) -> list[KeyInfo]:
    """All keys, or those of one entity, oldest first."""
    quotas = {
        row["key_id"]: Quota(row["quota_rate"], row["quota_burst"])
        for row in await conn.fetch(sql.LIST_KEY_QUOTAS, entity)
    }
    return [
        _key_info(row, quotas.get(row["key_id"])) for row in await conn.fetch(sql.LIST_KEYS, entity)
    ]


async def set_key_quota(conn: asyncpg.Connection, key_id: str, quota: Quota | None) -> bool:
    """Give a key a quota of its own, or (None) the default back; False when there is no
    such key. Running apis apply it within AUTH_CACHE_TTL_SECONDS."""
    rate, burst = (quota.rate, quota.burst) if quota is not None else (None, None)
    return await conn.fetchval(sql.SET_KEY_QUOTA, key_id, rate, burst) is not None


async def revoke_key(conn: asyncpg.Connection, key_id: str) -> bool:
    """Revoke a key; False when there is no such key."""
    return await conn.fetchval(sql.REVOKE_KEY, key_id) is not None


class KeyVerifier:
    """Checks keys against PostgreSQL, caching what it read for a short TTL.

    A cached key is checked without the database; when the TTL has passed and the database
    cannot be reached (or the lookups are over their bounds), the last known answer stands,
    so ingestion keeps working through a database outage. Revocation therefore takes effect
    within one TTL of the database being reachable.

    Keys that exist (revoked or not) and key ids that do not are cached apart, the latter
    in a small cache of their own, so no number of made-up keys can push a known key out.
    Database lookups are bounded per process: at most `max_concurrent_lookups` at once (the
    size of the pool they use), and for keys not known, `lookups_per_second` on average.
    A key beyond either bound is answered AuthBackendUnavailable at once, not queued.

    `quotas` holds this process's token buckets of the keys' and entities' quotas
    (api/quotas.py), as many as the keys it remembers, beside the records they come from.
    """

    def __init__(
        self,
        pool: BoundedPool,
        *,
        ttl_seconds: float,
        max_entries: int,
        lookups_per_second: float,
        max_concurrent_lookups: int,
    ) -> None:
        self._pool = pool
        self._ttl = ttl_seconds
        self._max_entries = max_entries
        self._max_concurrent_lookups = max_concurrent_lookups
        # `lookups_per_second` on average, and as many at once after a quiet second.
        self._bucket = TokenBucket(lookups_per_second, max(1.0, lookups_per_second))
        self.quotas = QuotaLedger(2 * max_entries)
        self._known: dict[str, tuple[float, _StoredKey]] = {}
        self._unknown: dict[str, float] = {}
        self._lookups: dict[str, asyncio.Future[_StoredKey | None]] = {}

    async def verify(self, key: str) -> Principal:
        """The principal of a valid key; raises InvalidCredentials or AuthBackendUnavailable."""
        match = _KEY_PATTERN.fullmatch(key)
        if match is None:
            raise InvalidCredentials("malformed API key")
        stored = await self._stored_key(match.group(1))
        if stored is None or not hmac.compare_digest(stored.secret_hash, hash_key(key)):
            raise InvalidCredentials("invalid API key")
        if stored.revoked:
            raise InvalidCredentials("API key revoked")
        return stored.principal

    async def _stored_key(self, key_id: str) -> _StoredKey | None:
        now = time.monotonic()
        known = self._known.get(key_id)
        if known is not None and now - known[0] < self._ttl:
            return known[1]
        unknown_since = self._unknown.get(key_id)
        if unknown_since is not None and now - unknown_since < self._ttl:
            return None
        last_answer = _LastAnswer(known[1] if known is not None else None, unknown_since)
        lookup = self._lookups.get(key_id)
        if lookup is None:
            # Refreshing a known key spends no token: known keys are few and legitimate, and
            # a flood of made-up keys must not delay a revocation.
            if len(self._lookups) >= self._max_concurrent_lookups or (
                known is None and not self._bucket.try_take()
            ):
                return last_answer.stands("too many API key lookups right now, retry later")
            # One database read per key at a time, however many requests wait for it.
            lookup = asyncio.ensure_future(self._fetch(key_id))
            self._lookups[key_id] = lookup
            lookup.add_done_callback(lambda _: self._lookups.pop(key_id, None))
        try:
            return await asyncio.shield(lookup)
        except DATABASE_UNAVAILABLE as exc:
            return last_answer.stands("cannot verify API key: database unreachable", exc)

    async def _fetch(self, key_id: str) -> _StoredKey | None:
        async with self._pool.connection() as conn:
            row = await conn.fetchrow(sql.FIND_KEY, key_id, timeout=self._pool.query_timeout)
        if row is None:
            self._remember_unknown(key_id)
            return None
        projects = row["projects"]
        stored = _StoredKey(
            secret_hash=bytes(row["secret_hash"]),
            principal=Principal(
                key_id=row["key_id"],
                entity=row["entity"],
                projects=frozenset(projects) if projects is not None else None,
                quotas=StoredQuotas(
                    key=Quota.stored(row["quota_rate"], row["quota_burst"]),
                    entity=Quota.stored(row["entity_rate"], row["entity_burst"]),
                ),
            ),
            revoked=row["revoked"],
        )
        self._remember_known(key_id, stored)
        return stored

    def _remember_known(self, key_id: str, stored: _StoredKey) -> None:
        self._unknown.pop(key_id, None)
        self._known.pop(key_id, None)
        while len(self._known) >= self._max_entries:
            del self._known[next(iter(self._known))]  # oldest first: dicts keep insertion order
        self._known[key_id] = (time.monotonic(), stored)

    def _remember_unknown(self, key_id: str) -> None:
        self._known.pop(key_id, None)
        self._unknown.pop(key_id, None)
        while len(self._unknown) >= UNKNOWN_KEYS_REMEMBERED:
            del self._unknown[next(iter(self._unknown))]
        self._unknown[key_id] = time.monotonic()


@dataclass(frozen=True)
class _LastAnswer:
    """What was last read about a key whose cache entry is stale, if anything."""

    stored: _StoredKey | None
    unknown_since: float | None

    def stands(self, why: str, cause: BaseException | None = None) -> _StoredKey | None:
        """The last answer, when there is one; AuthBackendUnavailable otherwise."""
        if self.stored is not None or self.unknown_since is not None:
            return self.stored
        raise AuthBackendUnavailable(why) from cause
