"""Quotas: how many scores a key, and all the keys of an entity, may send per second.

A quota is a rate (scores per second, each score of a batch counted) and a burst (the most
scores at once, after a quiet spell), enforced as a token bucket. A key's own quota is
stored on its row, an entity's in `entity_quotas`; either falls back to the QUOTA_KEY_* or
QUOTA_ENTITY_* settings, and with neither there is no limit. Both travel with the key's
cached record (api/keys.py), so a change takes effect within AUTH_CACHE_TTL_SECONDS.

Several api replicas share a quota without talking to each other: each holds its own
buckets, filled at 1/API_REPLICAS of the rate up to 1/API_REPLICAS of the burst. Behind a
load balancer that spreads requests evenly, the replicas together allow the quota; a client
whose requests all reach one replica gets its share only, and a wrong API_REPLICAS scales
every quota by (replicas running) / API_REPLICAS. README "Quotas" has the arithmetic.

A request takes its scores from every bucket it is held to, or from none: refused, it
costs nothing. A request of more scores than a replica's share of the burst passes on a
full bucket, which then goes below empty and refills for longer, so that a batch up to the
whole burst is never impossible on one replica; a batch larger than the burst is.
"""

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

import asyncpg

from api.errors import BatchOverQuota, QuotaExceeded
from api.metrics import QUOTA_REJECTIONS
from api.sql import CLEAR_ENTITY_QUOTA, FIND_ENTITY_QUOTA, SET_ENTITY_QUOTA
from shared.contract import MAX_BATCH_SCORES

if TYPE_CHECKING:
    from api.deps import ProjectScope

Clock = Callable[[], float]
Policy = Literal["key", "entity"]

# Entities that get a label of their own on the rejections counter; the rest count as
# "other", so that no number of tenants can grow the metric without bound.
QUOTA_METRIC_ENTITIES: Final = 100
OTHER_LABEL: Final = "other"
# A vendor parameter (the draft asks for a prefix) carrying the burst beside q and w.
BURST_PARAMETER: Final = "si-burst"


@dataclass(frozen=True)
class Quota:
    """A rate in scores per second and a burst: the most scores taken at once."""

    rate: int
    burst: int

    @classmethod
    def of(cls, rate: int, burst: int | None = None) -> "Quota":
        """A quota whose burst defaults to one full batch or one second's rate, the larger."""
        return cls(rate, burst if burst is not None else max(rate, MAX_BATCH_SCORES))

    @classmethod
    def stored(cls, rate: int | None, burst: int | None) -> "Quota | None":
        """The quota in a row's (rate, burst) columns; None where they are NULL."""
        return None if rate is None or burst is None else cls(rate, burst)

    def __str__(self) -> str:
        return f"{self.rate} scores/s, burst {self.burst}"


@dataclass(frozen=True)
class StoredQuotas:
    """What a key's record says of quotas: its own and its entity's (None: the default)."""

    key: Quota | None = None
    entity: Quota | None = None


NO_STORED_QUOTAS: Final = StoredQuotas()


async def entity_quota(conn: asyncpg.Connection, entity: str) -> Quota | None:
    """The quota stored for an entity's keys together, if any."""
    row = await conn.fetchrow(FIND_ENTITY_QUOTA, entity)
    return None if row is None else Quota(row["rate"], row["burst"])


async def set_entity_quota(conn: asyncpg.Connection, entity: str, quota: Quota | None) -> bool:
    """Store an entity's quota, or (None) remove it; False when there was none to remove.
    Running apis apply it within AUTH_CACHE_TTL_SECONDS."""
    if quota is None:
        return await conn.fetchval(CLEAR_ENTITY_QUOTA, entity) is not None
    await conn.execute(SET_ENTITY_QUOTA, entity, quota.rate, quota.burst)
    return True


class TokenBucket:
    """Tokens that come back at `rate` a second up to `capacity`.

    Taking n needs n tokens, or a full bucket when n is more than it holds (it then goes
    below empty). The clock is injected so that tests need no sleeps.
    """

    def __init__(self, rate: float, capacity: float, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._rate = rate
        self._capacity = capacity
        self._tokens = capacity
        self._updated = clock()

    @property
    def tokens(self) -> float:
        """The tokens in the bucket now (negative while it pays back a large take)."""
        now = self._clock()
        self._tokens = min(self._capacity, self._tokens + (now - self._updated) * self._rate)
        self._updated = now
        return self._tokens

    def wait(self, n: float) -> float:
        """Seconds until a take of n would pass; 0 when it would now."""
        missing = min(n, self._capacity) - self.tokens
        return missing / self._rate if missing > 0 else 0.0

    def take(self, n: float) -> None:
        """Take n tokens, whether or not they are there (check `wait` first)."""
        self._tokens = self.tokens - n

    def give_back(self, n: float) -> None:
        """Return n tokens taken for a request that then failed (at most up to capacity)."""
        self._tokens = min(self._capacity, self.tokens + n)

    def try_take(self, n: float = 1) -> bool:
        """Take n tokens if a take of n would pass now."""
        if self.wait(n) > 0:
            return False
        self.take(n)
        return True

    def resize(self, rate: float, capacity: float) -> None:
        """Change the rate and capacity, keeping the tokens (at most the new capacity)."""
        tokens = self.tokens
        self._rate = rate
        self._capacity = capacity
        self._tokens = min(tokens, capacity)


@dataclass(frozen=True)
class Limit:
    """One quota a request is held to: which policy, whose bucket, and the quota."""

    policy: Policy
    holder: str
    quota: Quota


@dataclass(frozen=True)
class Charge:
    """Scores taken from buckets for one request, to give back if it fails."""

    buckets: Sequence[TokenBucket] = ()
    count: int = 0

    def give_back(self) -> None:
        """Return the scores: the request published nothing it answered for."""
        for bucket in self.buckets:
            bucket.give_back(self.count)


NOTHING_CHARGED: Final = Charge()


class QuotaLedger:
    """This api process's token buckets, one per key and one per entity held to a quota.

    Buckets are made on first use and kept for the most recently used `max_buckets`
    holders: one dropped comes back full, at worst one replica's share of a burst too many.
    """

    def __init__(self, max_buckets: int, clock: Clock = time.monotonic) -> None:
        self._max_buckets = max_buckets
        self._clock = clock
        self._buckets: dict[tuple[Policy, str], tuple[Quota, int, TokenBucket]] = {}

    def charge(self, limits: Sequence[Limit], count: int, replicas: int) -> "Charge":
        """Take count scores from every limit's bucket, or from none.

        Raises BatchOverQuota when count is over a limit's whole burst (no wait can help),
        QuotaExceeded when a bucket is short now.
        """
        too_small = [limit for limit in limits if count > limit.quota.burst]
        if too_small:
            limit = too_small[0]
            raise BatchOverQuota(
                f"{count} scores in one request is more than the {limit.policy} quota's "
                f"burst of {limit.quota.burst}: split the batch",
                {"RateLimit-Policy": _policies(limits)},
            )
        buckets = [self._bucket(limit, replicas) for limit in limits]
        waits = [bucket.wait(count) for bucket in buckets]
        if any(waits):
            retry_after = max(1, math.ceil(max(waits)))
            short = [limit for limit, wait in zip(limits, waits, strict=True) if wait]
            raise QuotaExceeded(
                "over the quota of "
                + " and ".join(f"this {limit.policy} ({limit.quota})" for limit in short)
                + f": retry after {retry_after} s",
                retry_after,
                {
                    "RateLimit-Policy": _policies(limits),
                    "RateLimit": ", ".join(
                        _service_limit(limit, bucket, wait, replicas)
                        for limit, bucket, wait in zip(limits, buckets, waits, strict=True)
                    ),
                },
            )
        for bucket in buckets:
            bucket.take(count)
        return Charge(buckets, count)

    def _bucket(self, limit: Limit, replicas: int) -> TokenBucket:
        holder = (limit.policy, limit.holder)
        found = self._buckets.pop(holder, None)
        if found is None:
            while len(self._buckets) >= self._max_buckets:
                del self._buckets[next(iter(self._buckets))]  # least recently used first
            bucket = TokenBucket(
                limit.quota.rate / replicas, limit.quota.burst / replicas, self._clock
            )
        else:
            quota, was_replicas, bucket = found
            if quota != limit.quota or was_replicas != replicas:
                bucket.resize(limit.quota.rate / replicas, limit.quota.burst / replicas)
        self._buckets[holder] = (limit.quota, replicas, bucket)
        return bucket


def _policies(limits: Sequence[Limit]) -> str:
    """RateLimit-Policy (draft-ietf-httpapi-ratelimit-headers): q scores in w seconds, the
    whole quota as set, with its burst in a parameter of ours."""
    return ", ".join(
        f'"{limit.policy}";q={limit.quota.rate};w=1;{BURST_PARAMETER}={limit.quota.burst}'
        for limit in limits
    )


def _service_limit(limit: Limit, bucket: TokenBucket, wait: float, replicas: int) -> str:
    """RateLimit for one policy: r, the scores available now (this replica's share scaled
    to the whole); t, for a policy that refused, the seconds until the request would pass."""
    available = min(limit.quota.burst, max(0, math.floor(bucket.tokens * replicas)))
    item = f'"{limit.policy}";r={available}'
    return f"{item};t={max(1, math.ceil(wait))}" if wait else item


def charge_quota(scope: "ProjectScope", count: int) -> Charge:
    """Take count scores from the quotas of the scope's key and entity; raises QuotaExceeded
    (429) or BatchOverQuota (413), taking nothing, when either is short."""
    settings = scope.services.settings
    stored = scope.principal.quotas
    key = stored.key or _default(settings.quota_key_rate, settings.quota_key_burst)
    entity = stored.entity or _default(settings.quota_entity_rate, settings.quota_entity_burst)
    if key is None and entity is None:
        return NOTHING_CHARGED
    limits: list[Limit] = []
    if key is not None:
        limits.append(Limit("key", scope.principal.key_id, key))
    if entity is not None:
        limits.append(Limit("entity", scope.principal.entity, entity))
    try:
        return scope.services.verifier.quotas.charge(limits, count, settings.api_replicas)
    except QuotaExceeded:
        QUOTA_REJECTIONS.labels(_entity_label(scope.principal.entity)).inc()
        raise


def _default(rate: int | None, burst: int | None) -> Quota | None:
    return None if rate is None else Quota.of(rate, burst)


class BoundedLabels:
    """Label values for a metric: the first `limit` values seen as they are, then `other`."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        """The label for value."""
        if value in self._seen:
            return value
        if len(self._seen) < self._limit:
            self._seen.add(value)
            return value
        return OTHER_LABEL


# As process-wide as the counter it labels.
_entity_label = BoundedLabels(QUOTA_METRIC_ENTITIES)
