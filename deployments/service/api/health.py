"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from deployments.service.api.deps import ServicesDep
from deployments.service.metrics import queue_metrics_text

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict:
    """The process answers (no dependency is checked)."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(services: ServicesDep):
    """Ready to accept songs: the job store answers and a generator has the model (or may start one)."""
    await services.store.ping()
    ok, why = await services.ready()
    return JSONResponse({"ready": ok, "reason": why}, status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(services: ServicesDep):
    queued, running = await services.store.counts()
    text = queue_metrics_text(queued, running, listeners=services.hub.listeners)
    return Response(text, media_type="text/plain; version=0.0.4")
