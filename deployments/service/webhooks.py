"""Webhook delivery: POST the final job to the submitter's URL, signed, with retries.

Headers: `X-Musicgen-Timestamp` (unix seconds) and `X-Musicgen-Signature: sha256=<hex>`, the HMAC-SHA256
of "<timestamp>.<body>" under the service's MUSICGEN_WEBHOOK_SECRET (a receiver recomputes it and
rejects stale timestamps). Delivery is at least once: 2xx ends it; other answers and network errors
are retried with exponential backoff.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

log = logging.getLogger(__name__)


def sign(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def deliver(
    url: str,
    payload: dict,
    secret: str,
    *,
    attempts: int = 4,
    backoff_s: float = 1.0,
    timeout_s: float = 10.0,
) -> bool:
    body = json.dumps(payload, separators=(",", ":")).encode()
    for attempt in range(attempts):
        ts = str(int(time.time()))
        req = urllib.request.Request(
            url, data=body, method="POST",
            headers={"Content-Type": "application/json", "User-Agent": "musicgen-webhook/1",
                     "X-Musicgen-Timestamp": ts, "X-Musicgen-Signature": sign(secret, ts, body)},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                if 200 <= resp.status < 300:
                    return True
        except (urllib.error.URLError, OSError) as exc:
            log.info("webhook %s attempt %d failed: %s", url, attempt + 1, exc)
        if attempt + 1 < attempts:
            time.sleep(backoff_s * 2**attempt)
    return False


def notify(
    job, secret: str, record: Callable[[str], object], *, backoff_s: float = 1.0
) -> threading.Thread | None:
    """POST the finished job (a SongJob) to the webhook_url it was submitted with, on a background
    thread (retries must hold neither a GPU nor an HTTP request), then `record("delivered" | "failed")`
    from that thread. For every way a job ends: the worker's outcome, a cancel while queued, a job
    failed by the reconciler. None when the job asked for no webhook."""
    url = job.params.get("webhook_url")
    if not url:
        return None
    payload = {"id": job.id, "status": job.state.value, "result": job.result, "error": job.error,
               "finished_at": job.finished_at}  # fmt: skip

    def send() -> None:
        ok = deliver(url, payload, secret, backoff_s=backoff_s)
        try:
            record("delivered" if ok else "failed")
        except Exception:
            log.warning("could not record the webhook delivery of %s", job.id, exc_info=True)

    thread = threading.Thread(target=send, name=f"webhook-{job.id[:8]}", daemon=True)
    thread.start()
    return thread
