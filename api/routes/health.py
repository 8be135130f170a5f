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
    """Ready when a publish could be confirmed now: the broker channel is open and unblocked."""
    if services.publisher.ready:
        return JSONResponse({"status": "ready"})
    return JSONResponse({"status": "broker unavailable"}, status_code=503)


@router.get("/metrics")
async def metrics() -> Response:
    """Prometheus exposition of this process's metrics."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
