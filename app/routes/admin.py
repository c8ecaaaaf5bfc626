"""Admin: liveness, readiness, Prometheus metrics and model info.

Health and readiness are open (load balancers and orchestrators probe them without credentials);
metrics and info sit behind ADMIN_TOKEN when it is set, sent as a Bearer token, which Prometheus
scrapers support.
"""

from __future__ import annotations

import time
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from app.deps import AdminDep, ServicesDep
from app.errors import StoreUnavailable, error_body
from app.snapshots import Snapshots

router = APIRouter(prefix="/admin", tags=["admin"])


def _version() -> str:
    try:
        return version("reformer-chat")
    except PackageNotFoundError:
        return "unknown"


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: answering at all is the signal."""
    return {"status": "ok"}


@router.get("/ready", response_model=None)
async def ready(services: ServicesDep) -> dict[str, Any] | JSONResponse:
    """Readiness: the model's engine runs and Redis answers; 503 naming each part that is down."""
    down = []
    if not services.engine.alive:
        down.append("model: the engine thread is not running")
    try:
        await services.store.ping()
    except StoreUnavailable as exc:
        down.append(f"redis: {exc.message}")
    if down:
        return JSONResponse(
            error_body("not_ready", "; ".join(down)),
            status_code=503,
            headers={"Retry-After": str(services.settings.retry_after_seconds)},
        )
    return {"status": "ready", "checks": {"model": "ok", "redis": "ok"}}


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text exposition format",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    },
)
async def metrics(services: ServicesDep, _: AdminDep) -> Response:
    return Response(services.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/info")
async def info(services: ServicesDep, _: AdminDep) -> dict[str, Any]:
    cache = services.state_cache
    return {
        "version": _version(),
        "uptime_seconds": round(time.monotonic() - services.started_at, 3),
        "device": str(services.engine.device),
        "precision": services.model_info["precision"],
        "checkpoint": str(services.checkpoint),
        "model": services.model_info,
        "state_cache": {"entries": len(cache), "bytes": cache.nbytes, "budget_bytes": cache.budget_bytes},
        "snapshots": _snapshots(services.snapshots),
        "auth": {"api_keys": not services.api_keys.is_open, "admin_token": not services.admin.is_open},
    }


def _snapshots(snapshots: Snapshots | None) -> dict[str, Any]:
    """What each conversation's snapshot costs Redis and when one is written (README, "Operations")."""
    if snapshots is None:
        return {"enabled": False}
    return {
        "enabled": True,
        "bytes_per_conversation": snapshots.bytes_per_conversation,
        "min_tokens": snapshots.min_tokens,
        "every_tokens": snapshots.every_tokens,
        "max_bytes": snapshots.max_bytes,
    }
