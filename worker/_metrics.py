"""Prometheus metrics of the worker."""

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

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
ACCEPT_TO_STORED_SECONDS = Histogram(
    "score_ingest_accept_to_stored_seconds",
    "Time from a score's created_at (the api's 200, or a direct publisher's time) to the commit "
    "that stored it, per score stored, by entity: the first ENTITY_LABELS (20) entities "
    "this worker stored, each by name, the rest as `#other`",
    ["entity"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
ENTITY_LABELS = 20
"""Entities labelled by name in score_ingest_accept_to_stored_seconds; later ones share one."""
OTHER_ENTITIES = "#other"  # no entity is named so: `#` is not allowed in names
_named_entities: dict[str, Any] = {}


def _entity_histogram(entity: str) -> Any:
    histogram = _named_entities.get(entity)
    if histogram is not None:
        return histogram
    if len(_named_entities) < ENTITY_LABELS:
        histogram = _named_entities[entity] = ACCEPT_TO_STORED_SECONDS.labels(entity)
        return histogram
    return ACCEPT_TO_STORED_SECONDS.labels(OTHER_ENTITIES)


def observe_accept_to_stored(
    stored: Iterable[tuple[str, datetime]], committed_at: datetime
) -> None:
    """Observe the time from created_at to committed_at of each (entity, created_at) stored."""
    for entity, created_at in stored:
        _entity_histogram(entity).observe((committed_at - created_at).total_seconds())
