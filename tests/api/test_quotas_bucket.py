"""The token buckets behind quotas, and what a refusal says, on a clock the tests turn."""

import pytest

from api.errors import BatchOverQuota, QuotaExceeded
from api.quotas import OTHER_LABEL, BoundedLabels, Limit, Quota, QuotaLedger, TokenBucket


class Clock:
    """A monotonic clock that moves only when told (by sums exact in binary, so that the
    arithmetic the tests expect is exact too)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_a_bucket_starts_full_and_refills_at_its_rate_up_to_its_capacity(clock: Clock) -> None:
    bucket = TokenBucket(rate=10, capacity=50, clock=clock)
    assert bucket.tokens == 50
    assert bucket.try_take(50)
    assert not bucket.try_take(1)
    assert bucket.wait(20) == pytest.approx(2.0)
    clock.advance(1.5)
    assert bucket.tokens == pytest.approx(15)
    assert not bucket.try_take(20)
    clock.advance(0.5)
    assert bucket.try_take(20)
    clock.advance(3600)
    assert bucket.tokens == 50


def test_a_take_larger_than_the_bucket_needs_it_full_and_leaves_it_in_debt(clock: Clock) -> None:
    bucket = TokenBucket(rate=10, capacity=50, clock=clock)
    assert bucket.try_take(80)
    assert bucket.tokens == -30
    # Full again only once the debt and the capacity have come back.
    assert bucket.wait(80) == pytest.approx(8.0)
    clock.advance(7.5)
    assert not bucket.try_take(80)
    clock.advance(0.5)
    assert bucket.try_take(80)


def test_a_resized_bucket_keeps_its_tokens_within_the_new_capacity(clock: Clock) -> None:
    bucket = TokenBucket(rate=10, capacity=50, clock=clock)
    bucket.take(20)
    bucket.resize(rate=1, capacity=10)
    assert bucket.tokens == 10
    bucket.take(10)
    clock.advance(1)
    assert bucket.tokens == pytest.approx(1)
    bucket.resize(rate=100, capacity=1000)
    clock.advance(1)
    assert bucket.tokens == pytest.approx(101)


KEY = Limit("key", "k1", Quota(rate=10, burst=100))
ENTITY = Limit("entity", "acme", Quota(rate=20, burst=150))


def test_a_request_is_charged_to_every_quota_it_is_held_to(clock: Clock) -> None:
    ledger = QuotaLedger(max_buckets=10, clock=clock)
    ledger.charge([KEY, ENTITY], 60, replicas=1)
    other_key = Limit("key", "k2", Quota(rate=10, burst=100))
    # k2 has its whole burst, but the entity has 90 of its 150 left.
    with pytest.raises(QuotaExceeded) as refused:
        ledger.charge([other_key, ENTITY], 100, replicas=1)
    assert refused.value.rate_limit == {
        "RateLimit-Policy": '"key";q=10;w=1;si-burst=100, "entity";q=20;w=1;si-burst=150',
        "RateLimit": '"key";r=100, "entity";r=90;t=1',
    }
    ledger.charge([other_key, ENTITY], 90, replicas=1)


def test_a_refused_request_takes_nothing_from_any_bucket(clock: Clock) -> None:
    ledger = QuotaLedger(max_buckets=10, clock=clock)
    ledger.charge([KEY], 80, replicas=1)
    with pytest.raises(QuotaExceeded) as refused:
        ledger.charge([KEY, ENTITY], 50, replicas=1)
    # 30 missing at 10 a second.
    assert refused.value.retry_after == 3
    assert refused.value.headers()["Retry-After"] == "3"
    assert refused.value.headers()["RateLimit"] == '"key";r=20;t=3, "entity";r=150'
    assert refused.value.status_code == 429
    assert "this key (10 scores/s, burst 100)" in refused.value.detail
    # Neither the key's 20 nor the entity's 150 were touched.
    ledger.charge([KEY, ENTITY], 20, replicas=1)
    ledger.charge([ENTITY], 130, replicas=1)
    with pytest.raises(QuotaExceeded):
        ledger.charge([ENTITY], 1, replicas=1)


def test_retry_after_is_whole_seconds_and_at_least_one(clock: Clock) -> None:
    ledger = QuotaLedger(max_buckets=10, clock=clock)
    ledger.charge([KEY], 100, replicas=1)
    clock.advance(0.75)
    with pytest.raises(QuotaExceeded) as refused:
        ledger.charge([KEY], 10, replicas=1)
    assert refused.value.retry_after == 1
    clock.advance(0.25)
    ledger.charge([KEY], 10, replicas=1)


def test_more_scores_than_the_burst_are_a_413_that_no_wait_can_fix(clock: Clock) -> None:
    ledger = QuotaLedger(max_buckets=10, clock=clock)
    with pytest.raises(BatchOverQuota) as refused:
        ledger.charge([KEY, ENTITY], 101, replicas=1)
    assert refused.value.status_code == 413
    assert "burst of 100" in refused.value.detail
    assert refused.value.headers() == {
        "RateLimit-Policy": '"key";q=10;w=1;si-burst=100, "entity";q=20;w=1;si-burst=150'
    }
    ledger.charge([KEY], 100, replicas=1)


def test_each_replica_holds_its_share_and_still_passes_a_batch_of_the_whole_burst(
    clock: Clock,
) -> None:
    ledger = QuotaLedger(max_buckets=10, clock=clock)
    # Two replicas: this one refills 5 a second up to 50.
    ledger.charge([KEY], 30, replicas=2)
    with pytest.raises(QuotaExceeded) as refused:
        ledger.charge([KEY], 30, replicas=2)
    # 20 left here, as 40 of the whole; 10 missing at 5 a second.
    assert refused.value.headers()["RateLimit"] == '"key";r=40;t=2'
    clock.advance(6)
    # Full again (50): a batch of the whole burst passes and leaves the bucket 50 short.
    ledger.charge([KEY], 100, replicas=2)
    # It pays the 50 back at 5 a second before it has a score to give.
    clock.advance(10)
    with pytest.raises(QuotaExceeded):
        ledger.charge([KEY], 1, replicas=2)
    clock.advance(0.25)
    ledger.charge([KEY], 1, replicas=2)


def test_a_changed_quota_applies_to_the_bucket_in_place(clock: Clock) -> None:
    ledger = QuotaLedger(max_buckets=10, clock=clock)
    ledger.charge([KEY], 100, replicas=1)
    raised = Limit("key", "k1", Quota(rate=1000, burst=1000))
    with pytest.raises(QuotaExceeded):
        ledger.charge([raised], 1, replicas=1)
    clock.advance(0.5)
    ledger.charge([raised], 500, replicas=1)


def test_the_ledger_keeps_the_most_recently_used_buckets(clock: Clock) -> None:
    ledger = QuotaLedger(max_buckets=2, clock=clock)
    first, second, third = (Limit("key", f"k{i}", Quota(rate=1, burst=10)) for i in range(3))
    ledger.charge([first], 10, replicas=1)
    ledger.charge([second], 10, replicas=1)
    ledger.charge([first], 0, replicas=1)  # first is now the most recently used
    ledger.charge([third], 10, replicas=1)  # second goes
    with pytest.raises(QuotaExceeded):
        ledger.charge([first], 1, replicas=1)
    with pytest.raises(QuotaExceeded):
        ledger.charge([third], 1, replicas=1)
    ledger.charge([second], 10, replicas=1)  # back, and full


def test_quota_burst_defaults_to_a_full_batch_or_a_second_of_rate() -> None:
    assert Quota.of(10) == Quota(10, 1000)
    assert Quota.of(5000) == Quota(5000, 5000)
    assert Quota.of(10, 20) == Quota(10, 20)


def test_metric_labels_are_the_first_values_seen_then_other() -> None:
    labels = BoundedLabels(2)
    assert [labels(v) for v in ("a", "b", "c", "a", "d", "b")] == [
        "a",
        "b",
        OTHER_LABEL,
        "a",
        OTHER_LABEL,
        "b",
    ]


def test_a_charge_given_back_returns_its_scores_to_every_bucket(clock: Clock) -> None:
    ledger = QuotaLedger(max_buckets=10, clock=clock)
    charge = ledger.charge([KEY, ENTITY], 100, replicas=1)
    with pytest.raises(QuotaExceeded):
        ledger.charge([KEY], 1, replicas=1)
    charge.give_back()
    ledger.charge([KEY, ENTITY], 100, replicas=1)
    # Never above a bucket's capacity: the entity's 150 hold 50 after the last charge.
    ledger.charge([ENTITY], 50, replicas=1).give_back()
    ledger.charge([ENTITY], 50, replicas=1).give_back()
    with pytest.raises(QuotaExceeded):
        ledger.charge([ENTITY], 51, replicas=1)
