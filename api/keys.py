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
from shared.db import DATABASE_UNAVAILABLE

log = logging.getLogger(__name__)

_KEY_PATTERN = re.compile(r"si_([0-9a-f]{16})_[A-Za-z0-9_-]{43}")


@dataclass(frozen=True)
class Principal:
    """Who a verified key speaks for: one entity, and all or some of its projects."""

    key_id: str
    entity: str
    projects: frozenset[str] | None

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


@dataclass(frozen=True)
class _StoredKey:
    secret_hash: bytes
    principal: Principal
    revoked: bool


def hash_key(key: str) -> bytes:
    """The stored form of a key."""
    return hashlib.sha256(key.encode()).digest()


def _key_info(row: asyncpg.Record) -> KeyInfo:
    projects = row["projects"]
    return KeyInfo(
        key_id=row["key_id"],
        entity=row["entity"],
        projects=tuple(projects) if projects is not None else None,
        name=row["name"],
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
    )


async def create_key(
    conn: asyncpg.Connection, entity: str, projects: Sequence[str] = (), name: str | None = None
) -> tuple[KeyInfo, str]:
    """Store a new key for entity (optionally only some projects); returns it and its secret."""
    key_id = secrets.token_hex(8)
    key = f"si_{key_id}_{secrets.token_urlsafe(32)}"
    row = await conn.fetchrow(
        sql.INSERT_KEY, key_id, hash_key(key), entity, sorted(set(projects)) or None, name
    )
    assert row is not None
    return _key_info(row), key


async def list_keys(conn: asyncpg.Connection, entity: str | None = None) -> list[KeyInfo]:
    """All keys, or those of one entity, oldest first."""
    return [_key_info(row) for row in await conn.fetch(sql.LIST_KEYS, entity)]


async def revoke_key(conn: asyncpg.Connection, key_id: str) -> bool:
    """Revoke a key; False when there is no such key."""
    return await conn.fetchval(sql.REVOKE_KEY, key_id) is not None


class KeyVerifier:
    """Checks keys against PostgreSQL, caching what it read for a short TTL.

    A cached key is checked without the database; when the TTL has passed and the database
    cannot be reached, the last known answer stands, so ingestion keeps working through a
    database outage. Revocation therefore takes effect within one TTL of the database
    being reachable.
    """

    def __init__(self, pool: asyncpg.Pool, ttl_seconds: float, max_entries: int) -> None:
        self._pool = pool
        self._ttl = ttl_seconds
        self._max_entries = max_entries
        self._cache: dict[str, tuple[float, _StoredKey | None]] = {}
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
        cached = self._cache.get(key_id)
        if cached is not None and time.monotonic() - cached[0] < self._ttl:
            return cached[1]
        lookup = self._lookups.get(key_id)
        if lookup is None:
            # One database read per key at a time, however many requests wait for it.
            lookup = asyncio.ensure_future(self._fetch(key_id))
            self._lookups[key_id] = lookup
            lookup.add_done_callback(lambda _: self._lookups.pop(key_id, None))
        try:
            return await asyncio.shield(lookup)
        except DATABASE_UNAVAILABLE as exc:
            if cached is not None:
                return cached[1]
            raise AuthBackendUnavailable("cannot verify API key: database unreachable") from exc

    async def _fetch(self, key_id: str) -> _StoredKey | None:
        row = await self._pool.fetchrow(sql.FIND_KEY, key_id, timeout=5)
        stored = None
        if row is not None:
            projects = row["projects"]
            stored = _StoredKey(
                secret_hash=bytes(row["secret_hash"]),
                principal=Principal(
                    key_id=row["key_id"],
                    entity=row["entity"],
                    projects=frozenset(projects) if projects is not None else None,
                ),
                revoked=row["revoked"],
            )
        self._remember(key_id, stored)
        return stored

    def _remember(self, key_id: str, stored: _StoredKey | None) -> None:
        self._cache.pop(key_id, None)
        while len(self._cache) >= self._max_entries:
            del self._cache[next(iter(self._cache))]  # oldest first: dicts keep insertion order
        self._cache[key_id] = (time.monotonic(), stored)
