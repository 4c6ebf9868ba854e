"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel

from deployments.service.api.deps import ServicesDep
from deployments.service.metrics import queue_metrics_text

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict:
    """The process answers (no dependency is checked)."""
    return {"status": "ok"}


class Readiness(BaseModel):
    ready: bool
    reason: str


@router.get(
    "/readyz", response_model=Readiness, responses={503: {"model": Readiness, "description": "not ready"}}
)
async def readyz(services: ServicesDep):
    """Ready to accept songs: the job store answers and a generator has the model (or may start one)."""
    await services.store.ping()
    ok, why = await services.ready()
    return JSONResponse({"ready": ok, "reason": why}, status_code=200 if ok else 503)


@router.get(
    "/metrics", response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text"}},
)  # fmt: skip
async def metrics(services: ServicesDep):
    queued, running = await services.store.counts()
    text = queue_metrics_text(queued, running, listeners=services.hub.listeners)
    return Response(text, media_type="text/plain; version=0.0.4")
