"""What the routes depend on, injected the FastAPI way: one `Services` object on `app.state`, read
by the dependency functions below (tests override them with `app.dependency_overrides`)."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from deployments.service import settings
from deployments.service.api.views import sse_frame
from deployments.service.events import EventHub
from deployments.service.jobs import AsyncJobStore
from deployments.service.media import TakeConverter
from deployments.service.params import SongParams
from deployments.service.schemas import SongCreate
from deployments.service.storage import Storage


@dataclass(frozen=True)
class ApiConfig:
    max_queue: int = settings.MAX_QUEUE
    max_upload_bytes: int = int(settings.MAX_UPLOAD_MB * 1024 * 1024)
    max_upload_seconds: float = settings.MAX_UPLOAD_SECONDS
    seconds_per_job_estimate: float = settings.SECONDS_PER_JOB_ESTIMATE
    sse_keepalive_s: float = settings.SSE_KEEPALIVE_S


async def _always_ready() -> tuple[bool, str]:
    return True, "ready"


async def _no_models() -> list[dict]:
    return []


@dataclass
class Services:
    """The API's collaborators. `validate` turns a submission into SongParams (the validator
    deployment, or a SongValidator in a thread); `dispatch` hands a new job id to the generators and
    must not block; `ready` and `models` come from the generators' reports."""

    store: AsyncJobStore
    validate: Callable[[SongCreate], Awaitable[SongParams]]
    dispatch: Callable[[str], None]
    results: Storage
    uploads: Storage
    ready: Callable[[], Awaitable[tuple[bool, str]]] = _always_ready
    models: Callable[[], Awaitable[list[dict]]] = _no_models
    config: ApiConfig = field(default_factory=ApiConfig)
    # CPU-heavy file work (decoding uploads, converting takes) off the event loop, bounded
    audio_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(2, thread_name_prefix="audio")
    )
    hub: EventHub | None = None  # default: a hub on `store` rendering this API's views
    converter: TakeConverter = field(init=False)

    def __post_init__(self) -> None:
        if self.hub is None:
            self.hub = EventHub(
                self.store, functools.partial(sse_frame, seconds_per_job=self.config.seconds_per_job_estimate)
            )
        self.converter = TakeConverter(self.results)


# Dependencies are `async def`: FastAPI runs plain `def` dependencies on a thread pool, a thread hop
# per request (and anyio's hop walks every task of the loop: thousands with open event streams).


async def get_services(request: Request) -> Services:
    return request.app.state.services


async def get_store(services: Annotated[Services, Depends(get_services)]) -> AsyncJobStore:
    return services.store


async def get_config(services: Annotated[Services, Depends(get_services)]) -> ApiConfig:
    return services.config


async def base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


ServicesDep = Annotated[Services, Depends(get_services)]
StoreDep = Annotated[AsyncJobStore, Depends(get_store)]
ConfigDep = Annotated[ApiConfig, Depends(get_config)]
BaseUrl = Annotated[str, Depends(base_url)]
