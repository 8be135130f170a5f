"""The FastAPI application: connections made in the lifespan, routes, limits, error mapping."""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from fastapi import FastAPI
from fastapi.telemetry import TelemetryConfig

from api.deps import Services
from api.errors import install_error_handlers
from api.fast_path import ScoreCreateFastPath
from api.keys import KeyVerifier
from api.metrics import RequestContextMiddleware
from api.publisher import ScorePublisher
from api.request_gate import RequestGate
from api.routes import health, scores
from shared.settings import Settings, get_settings
from shared.signing import KeyRing

_CONNECT_TIMEOUT_SECONDS = 5
# We export Prometheus metrics and JSON logs, not OpenTelemetry. FastAPI's native telemetry
# would otherwise look up the global OpenTelemetry providers on every request.
NO_OPENTELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API; connections open when the app starts and close when it stops."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # min_size=0: the API starts, and serves cached keys, while PostgreSQL is down.
        pool = await asyncpg.create_pool(
            settings.database_url,
            min_size=0,
            max_size=settings.db_pool_max_size,
            timeout=_CONNECT_TIMEOUT_SECONDS,
        )
        signing = KeyRing(pool)
        await signing.try_refresh()
        refreshing = asyncio.create_task(signing.keep_fresh())
        publisher = ScorePublisher(settings, signing)
        publisher.start()
        app.state.services = Services(
            settings,
            pool,
            publisher,
            KeyVerifier(pool, settings.auth_cache_ttl_seconds, settings.auth_cache_max_entries),
        )
        try:
            yield
        finally:
            refreshing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refreshing
            await publisher.close()
            await pool.close()

    app = FastAPI(
        title="score-ingest",
        version="0.1.0",
        description="Durable ingestion for Weave scores.",
        lifespan=lifespan,
        telemetry=NO_OPENTELEMETRY,
        # A trailing slash is a 404, not a redirect: Starlette builds its Location from the
        # Host header, which makes an open redirect.
        redirect_slashes=False,
    )
    # Innermost first: the fast path sees requests already checked (path, key, size),
    # counted and tagged.
    if settings.api_fast_path:
        app.add_middleware(ScoreCreateFastPath)
    app.add_middleware(
        RequestGate,
        max_bytes=settings.max_body_bytes,
        max_batch_bytes=settings.max_batch_body_bytes,
    )
    app.add_middleware(RequestContextMiddleware)
    install_error_handlers(app, settings.retry_after_seconds)
    app.include_router(scores.router)
    app.include_router(health.router)
    return app
