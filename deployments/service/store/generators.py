"""Generator status reports (`mg:generators`): what each generator replica says of itself (model
loaded or why not), renewed every GENERATOR_STATUS_EVERY_S. Readiness reads this one hash instead of
asking the replicas, which would queue behind the songs they are generating."""

from __future__ import annotations

import json
import time
from typing import Any

from deployments.service.store.records import text
from deployments.service.store.schema import GENERATORS
from deployments.service.store.steps import Call, Steps, operation

GENERATOR_STATUS_EVERY_S = 5.0
GENERATOR_STATUS_TTL_S = 3 * GENERATOR_STATUS_EVERY_S  # two missed renewals: the replica is gone


class GeneratorOps:
    @operation
    def put_generator_status(
        self, worker: str, status: dict[str, Any], *, ttl_s: float | None = None
    ) -> Steps[None]:
        """`ttl_s`: how long readers trust this report (default GENERATOR_STATUS_TTL_S)."""
        report = {**status, "at": time.time(), **({"ttl_s": ttl_s} if ttl_s is not None else {})}
        yield Call("hset", (GENERATORS, worker, json.dumps(report)))

    @operation
    def generator_statuses(self) -> Steps[list[dict[str, Any]]]:
        """The live generator replicas' own reports; stale ones (a dead replica's) are pruned."""
        reports = yield Call("hgetall", (GENERATORS,))
        now, live, stale = time.time(), [], []
        for worker, raw in reports.items():
            report = json.loads(raw)
            if now - report.get("at", 0) > report.get("ttl_s", GENERATOR_STATUS_TTL_S):
                stale.append(text(worker))
            else:
                live.append(report)
        if stale:
            yield Call("hdel", (GENERATORS, *stale))
        return live
