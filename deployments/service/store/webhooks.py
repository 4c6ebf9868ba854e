"""Webhook deliveries, the Redis side: the scripts that end a job queue its delivery
(`mg:webhook:{id}`, due in `mg:webhooks`); any ingress replica claims due ones for a lease, sends
them (deployments/service/webhooks.py) and records each attempt's outcome here. Only the holder of an
attempt's claim token records it: after a lost lease another replica owns the delivery. When a
delivery is due, when a lease ends and when a retry is due are Redis time (the scripts read `TIME`),
so replicas whose clocks disagree still take turns; a dead letter's `dead_at` and `queued_at` are the
writers' clocks, for display."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from deployments.service import settings
from deployments.service.store.records import WebhookDelivery, pairs, text
from deployments.service.store.schema import DEAD_WEBHOOKS, WEBHOOKS, job_key, webhook_key
from deployments.service.store.steps import Call, Script, Steps, operation


def _settle(
    d: WebhookDelivery, outcome: str, delay_s: float = 0.0, error: str = "", dead: str = ""
) -> Steps[bool]:
    ok = yield Script(
        "webhook_settle", [WEBHOOKS, webhook_key(d.job_id), job_key(d.job_id), DEAD_WEBHOOKS],
        [d.job_id, d.token, outcome, delay_s, error, dead, settings.WEBHOOK_DEAD_MAX],
    )  # fmt: skip
    return bool(ok)


class WebhookOps:
    @operation
    def claim_webhooks(
        self, limit: int, lease_s: float = settings.WEBHOOK_LEASE_S
    ) -> Steps[list[WebhookDelivery]]:
        """Up to `limit` due deliveries, each claimed for `lease_s` seconds: no other replica takes
        them until then. Each claim counts as an attempt. Due and lease times are Redis time."""
        seconds, microseconds = yield Call("time")
        now = seconds + microseconds / 1e6
        due = yield Call("zrangebyscore", (WEBHOOKS, "-inf", now), {"start": 0, "num": limit})
        claimed = []
        for job_id in map(text, due):
            h = yield Script("webhook_claim", [WEBHOOKS, webhook_key(job_id)],
                             [job_id, lease_s, uuid.uuid4().hex])  # fmt: skip
            if h:  # None: another replica claimed it between the read and the script
                claimed.append(WebhookDelivery.from_hash(pairs(h)))
        return claimed

    @operation
    def webhook_delivered(self, d: WebhookDelivery) -> Steps[bool]:
        """Forget the delivery and mark the job's `webhook` field "delivered". False when this
        attempt's lease was lost (another replica owns the delivery now): nothing changes."""
        return (yield from _settle(d, "delivered"))

    @operation
    def webhook_retry(self, d: WebhookDelivery, error: str, delay_s: float) -> Steps[bool]:
        """Schedule the next attempt `delay_s` seconds from now, in Redis time."""
        return (yield from _settle(d, "retry", delay_s=delay_s, error=error))

    @operation
    def webhook_dead(self, d: WebhookDelivery, error: str) -> Steps[bool]:
        """Move the delivery to the dead-letter list and mark the job's `webhook` field "failed"."""
        letter = {"id": d.job_id, "url": d.url, "attempts": d.attempt, "error": error, "status": d.state,
                  "finished_at": d.payload()["finished_at"], "queued_at": d.created_at,
                  "dead_at": time.time()}  # fmt: skip
        return (yield from _settle(d, "dead", error=error, dead=json.dumps(letter)))

    @operation
    def dead_webhooks(self, limit: int = 100) -> Steps[list[dict[str, Any]]]:
        """The dead letters, newest first: {"id", "url", "attempts", "error", "status", "finished_at",
        "queued_at", "dead_at"}. The URL is whole (query included): this is operator data, not a log."""
        return [json.loads(x) for x in (yield Call("lrange", (DEAD_WEBHOOKS, 0, limit - 1)))]
