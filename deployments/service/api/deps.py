"""What the routes depend on, injected the FastAPI way: one `Services` object on `app.state`, read
by the dependency functions below (tests override them with `app.dependency_overrides`), and the
caller: the API key a request sends (`authenticate`), or nobody in particular when auth is off."""

from __future__ import annotations

import functools
import math
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPBearer

from deployments.service import settings
from deployments.service.api.views import sse_frame
from deployments.service.errors import ServiceError
from deployments.service.events import EventHub
from deployments.service.media import TakeConverter
from deployments.service.params import SongParams
from deployments.service.schemas import SongCreate
from deployments.service.storage import Storage
from deployments.service.store import SECRET, ApiKey, AsyncJobStore, AsyncKeyStore, RateLimited, Unauthorized


@dataclass(frozen=True)
class ApiConfig:
    max_queue: int = settings.MAX_QUEUE
    max_upload_bytes: int = int(settings.MAX_UPLOAD_MB * 1024 * 1024)
    max_upload_seconds: float = settings.MAX_UPLOAD_SECONDS
    seconds_per_job_estimate: float = settings.SECONDS_PER_JOB_ESTIMATE
    sse_keepalive_s: float = settings.SSE_KEEPALIVE_S
    max_body_bytes: int = settings.MAX_BODY_KB * 1024  # bodies other than uploads
    cors_origins: tuple[str, ...] = ()
    security_headers: bool = True
    auth: bool = False  # requests need an API key (AppArgs.auth_required)
    quotas: settings.Quotas = field(default_factory=settings.Quotas)  # each key's, unless it has its own
    ui_dir: str | None = None  # the web UI's files, served at / and /ui/ (None: no UI)


async def _always_ready() -> tuple[bool, str]:
    return True, "ready"


async def _no_models() -> list[dict]:
    return []


async def _fits_anywhere(params: SongParams) -> None:
    return None


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
    # raises ServiceError (OUT_OF_MEMORY) for a song no generator could ever hold (Readiness.check_fits)
    fits: Callable[[SongParams], Awaitable[None]] = _fits_anywhere
    config: ApiConfig = field(default_factory=ApiConfig)
    # CPU-heavy file work (decoding uploads, converting takes) off the event loop, bounded
    audio_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(2, thread_name_prefix="audio")
    )
    hub: EventHub = field(init=False)  # event fan-out on `store`, rendering this API's views
    keys: AsyncKeyStore = field(init=False)  # on the store's connection pool
    converter: TakeConverter = field(init=False)

    def __post_init__(self) -> None:
        self.keys = AsyncKeyStore.sharing(self.store)
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


@dataclass(frozen=True)
class Caller:
    """Who sends a request: an API key, or None when auth is off (everyone sees everything)."""

    key: ApiKey | None

    @property
    def owner(self) -> str:
        """What the caller's jobs and uploads record as their owner ("" without keys)."""
        return self.key.id if self.key else ""

    @property
    def sees_all(self) -> bool:
        return self.key is None or self.key.admin

    def owns(self, owner: str | None) -> bool:
        """May see a job or upload of `owner`; others' answer as missing ones do (404)."""
        return self.key is None or self.key.admin or owner == self.key.id


# Declares the bearer scheme in the OpenAPI spec; the checks (and their error bodies) are ours.
_bearer = HTTPBearer(auto_error=False, description="an API key: `musicgen keys create NAME` prints one")


def _unauthorized(message: str) -> ServiceError:
    return ServiceError("UNAUTHORIZED", message)  # the error handler adds WWW-Authenticate: Bearer


async def authenticate(
    request: Request,
    services: Annotated[Services, Depends(get_services)],
    _declared: Annotated[object, Depends(_bearer)] = None,  # for the spec; the header is read below
) -> Caller:
    """The caller of every /v1 route: its key, checked (unknown, revoked -> 401) and counted against
    its request rate (-> 429 RATE_LIMITED) in one Redis script."""
    cfg = services.config
    if not cfg.auth:
        return Caller(None)
    header = request.headers.get("authorization")
    if not header:
        raise _unauthorized("this API needs a key: send `Authorization: Bearer <key>`")
    scheme, _, secret = header.partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not SECRET.fullmatch(secret):
        raise _unauthorized("malformed Authorization header: expected `Bearer mgk_...` (an API key)")
    try:
        return Caller(await services.keys.authenticate(secret, cfg.quotas))
    except Unauthorized as exc:
        reason = "was revoked" if str(exc) == "revoked" else "is not a key of this service"
        raise _unauthorized(f"the API key {reason}") from None
    except RateLimited as limited:
        raise ServiceError(
            "RATE_LIMITED",
            f"more than {limited.quotas['requests_per_minute']:g} requests a minute "
            f"(bursts of {limited.quotas['burst']:g}) with this key",
            details={"retry_after_s": retry_after(limited.retry_after_s), **limited.quotas},
        ) from None


def retry_after(seconds: float) -> int:
    """A Retry-After value: whole seconds, rounded up (a client that waits that long may go on)."""
    return max(1, math.ceil(seconds))


ServicesDep = Annotated[Services, Depends(get_services)]
StoreDep = Annotated[AsyncJobStore, Depends(get_store)]
ConfigDep = Annotated[ApiConfig, Depends(get_config)]
BaseUrl = Annotated[str, Depends(base_url)]
CallerDep = Annotated[Caller, Depends(authenticate)]
