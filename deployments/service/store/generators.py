"""Generator status reports (`mg:generators`): what each generator replica says of itself (model
loaded or why not), renewed every GENERATOR_STATUS_EVERY_S. Readiness reads this one hash instead of
asking the replicas, which would queue behind the songs they are generating.

A report's `at` is Redis time when it was written, and readers judge its age in Redis time too, so
a replica or a reader whose clock is off neither keeps a dead replica's report alive nor drops a
live one's."""

from __future__ import annotations

import json
from typing import Any

from deployments.service.store.schema import GENERATORS
from deployments.service.store.steps import Call, Script, Steps, operation

GENERATOR_STATUS_EVERY_S = 5.0
GENERATOR_STATUS_TTL_S = 3 * GENERATOR_STATUS_EVERY_S  # two missed renewals: the replica is gone


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

    @operation
    def generator_statuses(self) -> Steps[list[dict[str, Any]]]:
        """The live generator replicas' own reports; stale ones (a dead replica's: not renewed within
        their ttl_s) are pruned, in the same step."""
        live = yield Script("generators_prune", [GENERATORS], [GENERATOR_STATUS_TTL_S])
        return [json.loads(raw) for raw in live]
