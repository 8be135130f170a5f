"""Liveness, readiness and metrics for orchestrators and Prometheus (no authentication)."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.deps import ServicesDep

router = APIRouter(include_in_schema=False)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive and serving."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(services: ServicesDep) -> JSONResponse:
    """Ready when a publish could be confirmed now: the broker channel is open and unblocked.

    The database does not count: creates with cached keys need none, so taking every api
    out of the load balancer while PostgreSQL is down or busy would turn a partial outage
    into a full one. The body shows, for people, the broker node the publisher is connected
    to (or trying) and each database budget's connections in use.
    """
    publisher = services.publisher
    database = {
        bounded.name: {"in_use": bounded.in_use, "max": bounded.max_size}
        for bounded in (services.key_pool, services.pool, services.read_pool)
    }
    body = {"broker": publisher.broker, "database": database}
    if publisher.ready:
        return JSONResponse({"status": "ready", **body})
    return JSONResponse({"status": "broker unavailable", **body}, status_code=503)


@router.get("/metrics")
async def metrics() -> Response:
    """Prometheus exposition of this process's metrics."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
