"""Prometheus metrics of the worker."""

import math
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from datetime import datetime
from itertools import accumulate

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily

SCORES_PERSISTED = Counter("score_ingest_scores_persisted_total", "Scores written to PostgreSQL")
DUPLICATES_SKIPPED = Counter(
    "score_ingest_duplicates_skipped_total",
    "Scores not stored because they were already stored or deleted",
)
DEAD_LETTERED = Counter(
    "score_ingest_dead_lettered_total", "Messages sent to scores.dead, by reason", ["reason"]
)
BATCH_SIZE = Histogram(
    "score_ingest_batch_size",
    "Scores per INSERT",
    buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500),
)
INSERT_SECONDS = Histogram(
    "score_ingest_insert_seconds",
    "Time to store one batch (one transaction)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
PERSIST_LAG_SECONDS = Histogram(
    "score_ingest_persist_lag_seconds",
    "Time from the API accepting a score (created_at) to its row being committed",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
CONSUMER_LAG_SECONDS = Gauge(
    "score_ingest_consumer_lag_seconds",
    "Age (now - created_at) of the oldest score in the last stored batch",
)
QUEUE_DEPTH = Gauge(
    "score_ingest_queue_depth", "Messages ready in a queue, polled by the worker", ["queue"]
)
QUEUE_CONSUMERS = Gauge(
    "score_ingest_queue_consumers",
    "Consumers of a queue (every worker's), polled by the worker",
    ["queue"],
)
DATABASE_RETRIES = Counter(
    "score_ingest_database_retries_total", "Batch writes retried because PostgreSQL failed"
)
PREFETCH = Gauge(
    "score_ingest_worker_prefetch",
    "Messages the broker may send ahead, over every queue consumed (each queue's fitted to "
    "WORKER_PREFETCH_BYTES by message size)",
)
MESSAGES_DECODED = Counter(
    "score_ingest_messages_decoded_total",
    "Messages decoded, by how: `api_exchange` (through scores.api, parsed only) or `validation`",
    ["check"],
)
DEAD_LETTER_FALLBACKS = Counter(
    "score_ingest_dead_letter_fallbacks_total",
    "Messages rejected to the queue's dead-letter exchange because publishing their dead "
    "letter failed (they reach scores.dead without our reason headers)",
)
HELD_BYTES = Gauge(
    "score_ingest_worker_held_bytes",
    "Bytes of delivered messages not yet settled, as budgeted against WORKER_PREFETCH_BYTES",
)
HELD_MESSAGES = Gauge("score_ingest_worker_held_messages", "Delivered messages not yet settled")
CONNECTION_LOSSES = Counter(
    "score_ingest_consumer_connection_losses_total",
    "Consuming connections lost, by cause: `broker` (it closed them: shutdown, operator) or "
    "`unexplained` (then the worker takes one message at a time for a while)",
    ["cause"],
)
CAUTIOUS = Gauge(
    "score_ingest_worker_cautious",
    "1 while the worker takes one message at a time after an unexplained connection loss",
)
REDELIVERED = Counter(
    "score_ingest_messages_redelivered_total",
    "Deliveries of messages delivered before (to this worker or another)",
)


class _GroupedHistogram:
    """A histogram by one label, observed a group of equal values at a time.

    The scores of a batch message share their created_at, so a stored batch of 2,000 is a
    few groups of equal latencies; prometheus_client's Histogram takes one value per call,
    which was about 8 % of the worker's CPU in a drain of batch messages. Registered with
    the default registry, exposed as any histogram (cumulative buckets, _sum, _count).
    """

    def __init__(self, name: str, documentation: str, label: str, buckets: Iterable[float]):
        self._name, self._documentation, self._label = name, documentation, label
        self._bounds = (*buckets, math.inf)
        self._counts: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}
        REGISTRY.register(self)

    def observe(self, value: str, seconds: float, count: int) -> None:
        """Count `count` observations of `seconds` under label value `value`."""
        counts = self._counts.get(value)
        if counts is None:
            counts = self._counts[value] = [0] * len(self._bounds)
        counts[bisect_left(self._bounds, seconds)] += count  # buckets are `le`: inclusive
        self._sums[value] = self._sums.get(value, 0.0) + seconds * count

    def collect(self) -> Iterator[HistogramMetricFamily]:
        """The histogram, as the registry exposes it."""
        family = HistogramMetricFamily(self._name, self._documentation, labels=[self._label])
        for value, counts in self._counts.items():
            cumulative = zip(self._bounds, accumulate(counts), strict=True)
            buckets = [(_le(bound), total) for bound, total in cumulative]
            family.add_metric([value], buckets, sum_value=self._sums[value])
        yield family


def _le(bound: float) -> str:
    """A bucket's bound as Prometheus writes it (and prometheus_client's Histogram did)."""
    return "+Inf" if bound == math.inf else repr(float(bound))


ACCEPT_TO_STORED_SECONDS = _GroupedHistogram(
    "score_ingest_accept_to_stored_seconds",
    "Time from a score's created_at (the api's 200, or a direct publisher's time) to the commit "
    "that stored it, per score stored, by entity: the first ENTITY_LABELS (20) entities "
    "this worker stored, each by name, the rest as `#other`",
    "entity",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
ENTITY_LABELS = 20
"""Entities labelled by name in score_ingest_accept_to_stored_seconds; later ones share one."""
OTHER_ENTITIES = "#other"  # no entity is named so: `#` is not allowed in names
_named_entities: set[str] = set()


def _entity_label(entity: str) -> str:
    if entity in _named_entities:
        return entity
    if len(_named_entities) < ENTITY_LABELS:
        _named_entities.add(entity)
        return entity
    return OTHER_ENTITIES


def observe_accept_to_stored(
    stored: Iterable[tuple[str, datetime, int]], committed_at: datetime
) -> None:
    """Observe the time from created_at to committed_at of the scores stored, given as
    (entity, created_at, how many scores of that entity had that created_at)."""
    for entity, created_at, count in stored:
        seconds = (committed_at - created_at).total_seconds()
        ACCEPT_TO_STORED_SECONDS.observe(_entity_label(entity), seconds, count)
