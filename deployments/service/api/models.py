"""/v1/models: what this service serves and whether it is loaded."""

from __future__ import annotations

from fastapi import APIRouter

from deployments.service.api.deps import ServicesDep
from deployments.service.schemas import ModelView

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=list[ModelView])
async def list_models(services: ServicesDep) -> list[dict]:
    return await services.models()
