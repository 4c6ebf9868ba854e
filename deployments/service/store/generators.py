"""Generator status reports (`mg:generators`): what each generator replica says of itself (model
loaded or why not), renewed every GENERATOR_STATUS_EVERY_S. Readiness reads this one hash instead of
asking the replicas, which would queue behind the songs they are generating. A report of DiffRhythm 2's
engine also keeps its model's cache limits (`mg:engine_limits`) past the replica's life, so that a
song no generator could hold is refused at submission while none runs (`engine_limit`).

A report's `at` is Redis time when it was written, and readers judge its age in Redis time too, so
a replica or a reader whose clock is off neither keeps a dead replica's report alive nor drops a
live one's."""

from __future__ import annotations

import json
from typing import Any

from deployments.service.store.schema import ENGINE_LIMITS, GENERATORS
from deployments.service.store.steps import Call, Script, Steps, operation

GENERATOR_STATUS_EVERY_S = 5.0
GENERATOR_STATUS_TTL_S = 3 * GENERATOR_STATUS_EVERY_S  # two missed renewals: the replica is gone
# how long the largest engine budget reported of a model is trusted once its generators are gone (a
# service scaled to zero for a week still refuses what its GPUs could never hold; a larger budget
# reported meanwhile, on bigger GPUs, replaces it at once)
ENGINE_LIMIT_KEEP_S = 7 * 24 * 3600
ENGINE_LIMIT_FIELDS = ("budget_bytes", "token_bytes", "block_size")


class GeneratorOps:
    @operation
    def put_generator_status(
        self, worker: str, status: dict[str, Any], *, ttl_s: float | None = None
    ) -> Steps[None]:
        """`ttl_s`: how long readers trust this report (default GENERATOR_STATUS_TTL_S)."""
        seconds, microseconds = yield Call("time")
        at = seconds + microseconds / 1e6
        report = {**status, "at": at, **({"ttl_s": ttl_s} if ttl_s is not None else {})}
        yield Call("hset", (GENERATORS, worker, json.dumps(report)))
        engine = status.get("engine") or {}
        if status.get("loaded") and status.get("model") and engine.get("budget_bytes"):
            limit = {**{k: engine[k] for k in ENGINE_LIMIT_FIELDS}, "at": at}
            yield Script(
                "engine_limit", [ENGINE_LIMITS], [status["model"], json.dumps(limit), ENGINE_LIMIT_KEEP_S]
            )

    @operation
    def engine_limit(self, model: str) -> Steps[dict[str, Any] | None]:
        """The largest cache limits a generator of `model` reported within ENGINE_LIMIT_KEEP_S (Redis
        time), with `age_s`: how long ago; None if none did (or only a DiffRhythm 1 model's)."""
        seconds, microseconds = yield Call("time")
        raw = yield Call("hget", (ENGINE_LIMITS, model))
        if raw is None:
            return None
        limit = json.loads(raw)
        age = seconds + microseconds / 1e6 - float(limit.get("at", 0))
        return {**limit, "age_s": max(0.0, age)} if age <= ENGINE_LIMIT_KEEP_S else None

    @operation
    def generator_statuses(self) -> Steps[list[dict[str, Any]]]:
        """The live generator replicas' own reports; stale ones (a dead replica's: not renewed within
        their ttl_s) are pruned, in the same step."""
        live = yield Script("generators_prune", [GENERATORS], [GENERATOR_STATUS_TTL_S])
        return [json.loads(raw) for raw in live]
