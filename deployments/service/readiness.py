"""Whether the service can take songs, and the models list GET /v1/models serves, from what the
generator replicas say of themselves in the job store (asking a replica instead would wait behind the
songs it is generating). A report is the dict a `GeneratorWorker` puts there: loaded, model, error,
and for a model on an engine (DiffRhythm 2) `engine`: what it samples now and its cache budget, from
which a song that could never fit is refused at submission (`check_fits`).

Every generator also names a probe file it wrote to its results storage: an ingress that cannot read
it (a generator on another node, each keeping results on its own disk) would answer 404 to every
download of that generator's songs, so the service is not ready until every node shares a storage.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from deployments.service.errors import ServiceError
from deployments.service.storage import Storage
from deployments.service.store import AsyncJobStore

if TYPE_CHECKING:
    from deployments.service.params import SongParams

READY_CACHE_S = 1.0  # submissions and /readyz read the generators' reports at most this often


def model_state(
    model: str, reports: list[dict], *, scales_to_zero: bool, unplaceable: str | None = None
) -> tuple[bool, str]:
    """(ready, why) of one served model, from the reports of its generators. Ready when one has the
    model loaded, or when none has reported and the deployment may be scaled to zero (the first
    song starts a generator); a failed load is told with its recovery hint, and `unplaceable` (why
    no node of the cluster can run a generator) when none has reported."""
    loaded = [r for r in reports if r.get("loaded")]
    failed = [r["error"] for r in reports if r.get("error")]
    if loaded:
        why = f"serving {model} on {len(loaded)} generator(s)"
        engines = [r["engine"] for r in loaded if r.get("engine")]
        if engines:  # continuous pipelines say what they sample now
            running, waiting = (sum(e.get(k, 0) for e in engines) for k in ("running", "waiting"))
            why += f": {running} takes sampling, {waiting} waiting for cache memory"
        return True, why
    if failed:
        return False, f"{model}: {failed[0]['message']}; {failed[0]['recovery']}"
    if scales_to_zero and unplaceable:  # accepted songs wait for a node (a cluster autoscaler adds one)
        return True, f"{model} scaled to zero, and no generator can start yet: {unplaceable}"
    if scales_to_zero:
        return True, f"{model} scaled to zero: the first song starts a generator, which loads the model first"
    if unplaceable:
        return False, f"{model}: no generator is running: {unplaceable}"
    return False, f"{model}: no generator has reported yet: the model is loading"


class Readiness:
    """`ready` and `check_fits` (on reports read at most every `cache_s`: every submission asks) and
    `models`, as the API's Services take them, over the served models' generator reports."""

    def __init__(
        self,
        store: AsyncJobStore,
        served_models: list[str],
        *,
        scales_to_zero: bool,  # min_generators == 0: a model without generators is not a failure
        results: Storage | None = None,  # where this ingress reads takes: generators' probes must be there
        node: str | None = None,  # the node this ingress runs on (for the messages)
        # why no node of the cluster can host a generator (None: one can); called off the event loop
        unplaceable: Callable[[], str | None] | None = None,
        cache_s: float = READY_CACHE_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.store, self.served_models, self.scales_to_zero = store, list(served_models), scales_to_zero
        self.results, self.node, self.unplaceable = results, node, unplaceable
        self._unplaceable: tuple[float, str | None] = (float("-inf"), None)
        self.cache_s, self.clock = cache_s, clock
        self._cache: tuple[float, list[dict]] | None = None
        self._probes_seen: set[str] = set()  # found once: the storage is shared (it stays so)
        self._unshared: tuple[float, str | None] = (float("-inf"), None)  # (when checked, why not ready)

    async def _recent_reports(self) -> list[dict]:
        """The generators' reports, read again when the last read is `cache_s` old."""
        now = self.clock()
        if self._cache is None or now - self._cache[0] >= self.cache_s:
            self._cache = now, await self.store.generator_statuses()
        return self._cache[1]

    async def _states(self, reports: list[dict]) -> dict[str, tuple[bool, str]]:
        by_model = {m: [r for r in reports if r.get("model") == m] for m in self.served_models}
        unplaceable = None
        if self.unplaceable is not None and not all(by_model.values()):
            if self.clock() - self._unplaceable[0] >= self.cache_s:
                self._unplaceable = (self.clock(), await asyncio.to_thread(self.unplaceable))
            unplaceable = self._unplaceable[1]
        return {
            m: model_state(m, rs, scales_to_zero=self.scales_to_zero, unplaceable=unplaceable)
            for m, rs in by_model.items()
        }

    async def states(self) -> dict[str, tuple[bool, str]]:
        """Each served model's (ready, why), read now."""
        return await self._states(await self.store.generator_statuses())

    async def ready(self) -> tuple[bool, str]:
        """Ready when every served model is and this ingress reads every generator's storage; why,
        model by model."""
        reports = await self._recent_reports()
        states = (await self._states(reports)).values()
        unshared = await self._storage_not_shared(reports)
        if unshared is not None:
            return False, unshared
        return all(ok for ok, _ in states), "; ".join(why for _, why in states)

    async def _storage_not_shared(self, reports: list[dict]) -> str | None:
        """Why this ingress cannot serve some generator's takes (None: it can), checked at most every
        `cache_s` while one is missing."""
        if self.results is None:
            return None
        todo = [r for r in reports if r.get("storage_probe") and r["storage_probe"] not in self._probes_seen]
        if not todo:
            return None
        if self.clock() - self._unshared[0] < self.cache_s:
            return self._unshared[1]
        why = None
        for report in todo:
            key = report["storage_probe"]
            try:
                found = await asyncio.to_thread(self.results.exists, key)
            except Exception as exc:  # storage unreachable from here: say so, like a missing probe
                found, error = False, f" ({type(exc).__name__}: {exc})"
            else:
                error = ""
            if found:
                self._probes_seen.add(key)
            elif why is None:
                why = (
                    f"generator {report.get('worker')} (node {report.get('node') or '?'}) stores results in "
                    f"{report.get('storage') or 'its storage'}, which this ingress (node {self.node or '?'}) "
                    f"cannot read{error}: every download of its songs would fail. Give every node one "
                    "storage: set MUSICGEN_STORAGE_URL=s3://bucket/prefix (or mount one shared volume at "
                    "MUSICGEN_DATA_DIR on every node)"
                )
        self._unshared = (self.clock(), why)
        return why

    async def check_fits(self, params: SongParams) -> None:
        """Refuse (OUT_OF_MEMORY) a song whose takes could never fit the key/value cache budget of any
        generator of its model that reports one (DiffRhythm 2's engine): it would wait forever. While
        none reports (scaled to zero, all restarting) the song is judged against the largest budget
        the model's generators reported before (`engine_limit`). With neither (DiffRhythm 1, or a
        model no generator has loaded yet) nothing is refused here: the engine refuses such a take
        when the job runs, and the job fails with the same error."""
        from musicgen.engine import cache_bytes_alone
        from musicgen.model.dr2_sampler import BlockSamplerSettings, num_blocks
        from musicgen.registry import get_model_spec

        reports = [r for r in await self._recent_reports() if r.get("model") == params.model]
        engines = [
            r["engine"] for r in reports if r.get("loaded") and (r.get("engine") or {}).get("budget_bytes")
        ]
        when = ""
        if not engines:
            earlier = await self.store.engine_limit(params.model)
            if earlier is None:
                return
            engines = [earlier]
            when = f" (when one last reported, {earlier['age_s'] / 60:.1f} min ago: none runs now)"
        frames = get_model_spec(params.model).frames_for(params.duration_s)
        need = [
            cache_bytes_alone(
                len(params.tokens),
                num_blocks(frames, e["block_size"]),
                e["block_size"],
                guided=BlockSamplerSettings(params.steps, params.cfg_strength).uses_guidance,
                token_bytes=e["token_bytes"],
            )  # fmt: skip
            for e in engines
        ]
        best = max(e["budget_bytes"] for e in engines)
        if all(n > e["budget_bytes"] for n, e in zip(need, engines, strict=True)):
            raise ServiceError(
                "OUT_OF_MEMORY",
                f"one take of this song needs {min(need) / 2**20:.0f} MiB of key/value cache; the generators "
                f"of {params.model} hold {best / 2**20:.0f} MiB{when}",
                recovery="ask for a shorter song or shorter lyrics (or guidance 0, which halves it)",
                details={"needed_bytes": min(need), "budget_bytes": best},
            )

    async def models(self) -> list[dict]:
        """GET /v1/models: each served model's registry entry with its state (never cached)."""
        from deployments.service.schemas import model_view
        from musicgen.pipelines import MAX_TAKES
        from musicgen.registry import MODELS

        states = await self.states()
        return [model_view(MODELS[m], *states[m], MAX_TAKES) for m in self.served_models]
