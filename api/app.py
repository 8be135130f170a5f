"""The FastAPI application: connections made in the lifespan, routes, limits, error mapping."""

import asyncio
import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi._body_limit import AppBodyLimitMiddleware
from fastapi.telemetry import TelemetryConfig
from fastapi.telemetry._asgi import ExceptionTelemetryMiddleware
from starlette.types import ASGIApp

from api.deps import Services
from api.errors import install_error_handlers
from api.keys import KeyVerifier
from api.metrics import RequestContextMiddleware
from api.publisher import ScorePublisher
from api.repository import create_bounded_pool
from api.request_gate import RequestGate
from api.routes import health, scores
from api.stored_events import StoredEvents
from shared.settings import Settings, get_settings
from shared.tracing import start_tracing

# Traces come from our own middleware, and only when OTEL_EXPORTER_OTLP_ENDPOINT is set
# (api/tracing.py): FastAPI's native telemetry would otherwise look up the global
# OpenTelemetry providers on every request.
NO_OPENTELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}
_IDLE_LAYERS = (ExceptionTelemetryMiddleware, AppBodyLimitMiddleware)


class _App(FastAPI):
    """FastAPI, less two layers it puts around every request that do nothing in this app:
    ExceptionTelemetryMiddleware (its telemetry is off, NO_OPENTELEMETRY) and
    AppBodyLimitMiddleware (no app-wide max_body_size: RequestGate limits bodies). Each is a
    coroutine call per request, together about a twelfth of the api's CPU for a single POST
    (BENCHMARKS.md). tests/api/test_create_path.py holds the stack to its expected shape."""

    def build_middleware_stack(self) -> ASGIApp:
        """FastAPI's stack, its two idle layers taken out of the chain."""
        outermost = super().build_middleware_stack()
        layer: Any = outermost
        while layer is not None:
            while isinstance(getattr(layer, "app", None), _IDLE_LAYERS):
                layer.app = layer.app.app
            layer = getattr(layer, "app", None)
        return outermost


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API; connections open when the app starts and close when it stops."""
    settings = settings or get_settings()
    # Its exporter only sends once there are spans, and the lifespan's end flushes it.
    tracing = start_tracing(settings, "score-ingest-api")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # One pool per budget (api/deps.py Services), so that slow or stalled reads cannot
        # take the connections key lookups and writes need.
        bounded_pool = functools.partial(
            create_bounded_pool,
            settings.database_url,
            acquire_timeout=settings.db_acquire_timeout_seconds,
            statement_timeout=settings.db_statement_timeout_seconds,
            idle_in_transaction_timeout=settings.db_idle_in_transaction_timeout_seconds,
        )
        key_pool = await bounded_pool("keys", max_size=settings.auth_lookup_concurrency)
        pool = await bounded_pool("writes", max_size=settings.db_pool_max_size)
        read_pool = await bounded_pool("reads", max_size=settings.db_read_pool_max_size)
        publisher = ScorePublisher(settings)
        publisher.start()
        stored_events = StoredEvents(
            settings.database_url,
            read_pool,
            settings.read_max_waiting,
            settings.read_wait_recheck_seconds,
        )
        stored_events.start()
        app.state.services = Services(
            settings=settings,
            pool=pool,
            read_pool=read_pool,
            key_pool=key_pool,
            publisher=publisher,
            verifier=KeyVerifier(
                key_pool,
                ttl_seconds=settings.auth_cache_ttl_seconds,
                max_entries=settings.auth_cache_max_entries,
                lookups_per_second=settings.auth_lookups_per_second,
                max_concurrent_lookups=settings.auth_lookup_concurrency,
            ),
            stored_events=stored_events,
        )
        try:
            yield
        finally:
            await stored_events.close()
            await publisher.close()
            for bounded in (read_pool, pool, key_pool):
                await bounded.close()
            if tracing is not None:
                await asyncio.to_thread(tracing.close)

    app = _App(
        title="score-ingest",
        version="0.1.0",
        description="Durable ingestion for Weave scores.",
        lifespan=lifespan,
        telemetry=NO_OPENTELEMETRY,
        # A trailing slash is a 404, not a redirect: Starlette builds its Location from the
        # Host header, which makes an open redirect.
        redirect_slashes=False,
    )
    # Innermost first: the gate sees requests already counted and tagged.
    app.add_middleware(
        RequestGate,
        max_bytes=settings.max_body_bytes,
        max_batch_bytes=settings.max_batch_body_bytes,
    )
    app.add_middleware(RequestContextMiddleware, tracing=tracing)
    install_error_handlers(app, settings.retry_after_seconds)
    # RequestGate hands a write's POST to its route itself; the router has the same routes
    # (include_router would copy them as plain APIRoutes) for the OpenAPI document and for
    # other methods (405).
    app.router.routes[:0] = scores.writes.routes
    app.include_router(scores.router)
    app.include_router(health.router)
    return app
