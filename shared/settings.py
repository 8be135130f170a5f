"""One Settings class, read from the environment; every variable is documented in the README."""

from functools import lru_cache
from typing import Literal

from pydantic import Field, FilePath, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.contract import MAX_SCORE_MESSAGE_BYTES

MIB = 1024 * 1024


class Settings(BaseSettings):
    """score-ingest configuration, from environment variables of the same name (upper case)."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore")

    database_url: str = "postgresql://postgres@127.0.0.1:5432/score_ingest"
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    # TLS for amqps:// (every broker connection): the CAs to trust instead of the system's,
    # and a client certificate (its key in AMQP_KEY_FILE, or in the same file).
    amqp_ca_file: FilePath | None = None
    amqp_cert_file: FilePath | None = None
    amqp_key_file: FilePath | None = None

    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=0, le=65535)
    # The path prefix a proxy serves the api under, and removes (uvicorn's root_path).
    api_root_path: str = Field(default="", pattern=r"^(/[^/]+)*$")
    max_body_bytes: int = Field(default=MIB, ge=1024)
    max_batch_body_bytes: int = Field(default=16 * MIB, ge=1024)
    http_header_timeout_seconds: float = Field(default=10.0, gt=0)
    http_max_header_bytes: int = Field(default=32 * 1024, ge=1024)
    http_body_timeout_seconds: float = Field(default=30.0, gt=0)
    http_max_connections: int = Field(default=1000, ge=1)
    publish_timeout_seconds: float = Field(default=5.0, gt=0)
    retry_after_seconds: int = Field(default=1, ge=1)
    auth_cache_ttl_seconds: float = Field(default=30.0, ge=0)
    auth_cache_max_entries: int = Field(default=10_000, ge=1)
    auth_lookup_concurrency: int = Field(default=4, ge=1)
    auth_lookups_per_second: float = Field(default=100.0, gt=0)
    # Quotas (api/quotas.py): the rate (scores per second) and burst of a key, and of all
    # of an entity's keys together, where the database sets none; no rate, no limit.
    quota_key_rate: int | None = Field(default=None, ge=1)
    quota_key_burst: int | None = Field(default=None, ge=1)
    quota_entity_rate: int | None = Field(default=None, ge=1)
    quota_entity_burst: int | None = Field(default=None, ge=1)
    # How many api processes share each quota: each enforces 1/API_REPLICAS of it.
    api_replicas: int = Field(default=1, ge=1)
    db_pool_max_size: int = Field(default=10, ge=1)
    db_read_pool_max_size: int = Field(default=5, ge=1)
    db_acquire_timeout_seconds: float = Field(default=1.0, gt=0)
    db_statement_timeout_seconds: float = Field(default=5.0, gt=0)
    db_idle_in_transaction_timeout_seconds: float = Field(default=5.0, gt=0)
    list_send_timeout_seconds: float = Field(default=10.0, gt=0)
    idempotency_key_ttl_seconds: float = Field(default=24 * 3600, gt=0)
    tombstone_ttl_seconds: float = Field(default=30 * 24 * 3600, gt=0)
    # Reads that wait for a fresh score (README "Read your writes").
    read_wait_seconds: float = Field(default=5.0, ge=0)
    read_wait_max_seconds: float = Field(default=30.0, ge=0)
    read_wait_recent_seconds: float = Field(default=60.0, ge=0)
    read_max_waiting: int = Field(default=500, ge=0)
    read_wait_recheck_seconds: float = Field(default=0.5, gt=0)
    score_failure_ttl_seconds: float = Field(default=7 * 24 * 3600, gt=0)

    worker_health_host: str = "127.0.0.1"
    worker_health_port: int = Field(default=8001, ge=0, le=65535)
    worker_prefetch: int = Field(default=2000, ge=2)
    worker_prefetch_bytes: int = Field(default=64 * MIB, ge=MIB)
    worker_batch_size: int = Field(default=2000, ge=1)
    worker_flush_interval_seconds: float = Field(default=0.02, ge=0)
    worker_retry_max_seconds: float = Field(default=5.0, gt=0)
    worker_shutdown_grace_seconds: float = Field(default=30.0, ge=0)
    worker_stall_seconds: float = Field(default=30.0, gt=0)

    queue_max_length: int = Field(default=5_000_000, ge=1)
    queue_max_length_bytes: int = Field(default=4 * 1024 * MIB, ge=MIB)
    queue_delivery_limit: int = Field(default=20, ge=1)
    # Queues scores.persist.0..N-1 the api spreads projects over (0: it publishes to
    # scores.persist); workers consume them all. Changing it is a migration (README).
    queue_shards: int = Field(default=4, ge=0, le=64)
    # At most the broker's max_message_size; at least one score's largest message, so that
    # splitting can always keep a message under it.
    broker_max_message_bytes: int = Field(default=16 * MIB, ge=MAX_SCORE_MESSAGE_BYTES)

    # OpenTelemetry (README "Tracing"): the OTLP/HTTP collector's base URL (spans go to
    # <it>/v1/traces); unset, nothing is traced. The service name defaults to
    # score-ingest-api or score-ingest-worker.
    otel_exporter_otlp_endpoint: str | None = Field(default=None, pattern=r"^https?://")
    otel_service_name: str | None = None

    log_level: str = "INFO"
    # auto: readable text lines when stderr is a terminal, JSON lines otherwise (shared/logs.py).
    log_format: Literal["auto", "json", "text"] = "auto"

    @model_validator(mode="after")
    def _tls_files_need_amqps(self) -> "Settings":
        given = [
            name.upper()
            for name in ("amqp_ca_file", "amqp_cert_file", "amqp_key_file")
            if getattr(self, name) is not None
        ]
        if given and not self.amqp_url.startswith("amqps://"):
            raise ValueError(f"{', '.join(given)} set, but AMQP_URL does not use TLS (amqps://)")
        if self.amqp_key_file is not None and self.amqp_cert_file is None:
            raise ValueError("AMQP_KEY_FILE set without AMQP_CERT_FILE, the certificate it is for")
        return self

    @model_validator(mode="after")
    def _quota_bursts_need_rates(self) -> "Settings":
        for scope in ("key", "entity"):
            burst, rate = (getattr(self, f"quota_{scope}_{what}") for what in ("burst", "rate"))
            if burst is not None and rate is None:
                name = f"QUOTA_{scope.upper()}"
                raise ValueError(f"{name}_BURST set without {name}_RATE")
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
