"""Webhook delivery: POST the finished job to the URL it was submitted with, signed, retried from Redis.

Headers: `X-Musicgen-Timestamp` (unix seconds) and `X-Musicgen-Signature: sha256=<hex>`, the HMAC-SHA256
of "<timestamp>.<body>" under the service's MUSICGEN_WEBHOOK_SECRET (a receiver recomputes it and
rejects stale timestamps). Body: {"id", "status", "result", "error", "finished_at"}.

The script that ends a job queues its delivery in the job store (store/webhooks.py: `mg:webhook:{id}`,
`mg:webhooks`); a `WebhookDeliverer` on every ingress replica claims due deliveries and sends them.
Delivery is at least once: a 2xx answer ends it; other answers and network errors are retried with
exponential backoff, `attempts` times in all, then the delivery goes to the dead-letter list. A
replica that dies mid-attempt loses its lease and another replica makes the attempt again.

Every attempt checks the URL again (netguard: the host may resolve elsewhere since submission) and
connects to the address it checked, with the URL's host as Host header and TLS server name. A refused
URL is dead-lettered at once. Redirects are not followed: a 3xx answer is a failed attempt. The
receiver registered that URL, and a hop elsewhere would be a second, unchecked destination (and
POST-to-GET rewriting on 301/302 would lose the body anyway).

Logs name the job and the URL without its query (tokens live there), never the secret or signature.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import http.client
import json
import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor

from deployments.service import settings
from deployments.service.netguard import AddressPolicy, NotResolved, Refused, redact
from deployments.service.store import AsyncJobStore, WebhookDelivery

log = logging.getLogger(__name__)


def sign(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


class AttemptFailed(Exception):
    """The receiver did not take the webhook (an answer other than 2xx, or a network error)."""


def post(url: str, body: bytes, headers: dict[str, str], policy: AddressPolicy, timeout_s: float) -> None:
    """POST `body` to `url` once: check it, connect to a checked address, never follow a redirect.
    Raises Refused (the policy said no), NotResolved or AttemptFailed."""
    dest = policy.check(url)
    errors = []
    for address in dest.addresses:  # the checked answers, in the resolver's order
        cls = http.client.HTTPSConnection if dest.scheme == "https" else http.client.HTTPConnection
        conn = cls(dest.host, dest.port, timeout=timeout_s)  # Host header and SNI: the URL's host

        # connect to the checked address, not to whatever the name resolves to now
        def connect(_addr, timeout, source_address, address=address):
            return socket.create_connection((address, dest.port), timeout, source_address)

        conn._create_connection = connect  # type: ignore[attr-defined]  # http.client's hook, not in its stubs
        try:
            conn.request("POST", dest.target, body=body, headers=headers)
            resp = conn.getresponse()
            resp.read(64 * 1024)  # the answer's body is not used; read a little to end the exchange
        except (OSError, http.client.HTTPException) as exc:
            errors.append(f"{address}: {type(exc).__name__}: {exc}")
            continue
        finally:
            conn.close()
        if 200 <= resp.status < 300:
            return
        if 300 <= resp.status < 400:
            raise AttemptFailed(f"answered {resp.status} (redirects are not followed)")
        raise AttemptFailed(f"answered {resp.status}")
    raise AttemptFailed("; ".join(errors))


class WebhookDeliverer:
    """Sends the deliveries queued in the job store, from whichever replica runs one of these: every
    `poll_s` it claims up to `concurrency` due deliveries (each claim is a lease, so two replicas
    never make the same attempt at once) and sends them on threads. `run_forever()` until canceled."""

    def __init__(
        self,
        store: AsyncJobStore,
        secret: str,
        policy: AddressPolicy | None = None,
        *,
        attempts: int = settings.WEBHOOK_ATTEMPTS,
        backoff_s: float = settings.WEBHOOK_BACKOFF_S,
        backoff_max_s: float = settings.WEBHOOK_BACKOFF_MAX_S,
        timeout_s: float = settings.WEBHOOK_TIMEOUT_S,
        lease_s: float = settings.WEBHOOK_LEASE_S,
        poll_s: float = settings.WEBHOOK_POLL_S,
        concurrency: int = settings.WEBHOOK_CONCURRENCY,
    ):
        self.store, self.secret = store, secret
        self.policy = policy or AddressPolicy()
        self.attempts, self.backoff_s, self.backoff_max_s = attempts, backoff_s, backoff_max_s
        self.timeout_s, self.lease_s, self.poll_s, self.concurrency = timeout_s, lease_s, poll_s, concurrency
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="webhook")

    def delay_after(self, attempt: int) -> float:
        """Seconds between failed attempt `attempt` (1 = the first) and the next."""
        return min(self.backoff_s * 2 ** (attempt - 1), self.backoff_max_s)

    async def run_forever(self) -> None:
        while True:
            try:
                busy = await self.deliver_due()
            except Exception:
                log.warning("webhook delivery round failed (job store unreachable?)", exc_info=True)
                busy = 0
            if busy < self.concurrency:  # a full round: more may be due already
                await asyncio.sleep(self.poll_s)

    async def deliver_due(self) -> int:
        """One round: claim the due deliveries (up to `concurrency`), attempt them, record each outcome.
        Returns the number attempted."""
        claimed = await self.store.claim_webhooks(self.concurrency, self.lease_s)
        outcomes = await asyncio.gather(*(self._attempt(d) for d in claimed), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):  # not recorded: the lease runs out, it is tried again
                raise outcome
        return len(claimed)

    async def _attempt(self, d: WebhookDelivery) -> None:
        where = redact(d.url)
        if d.attempt > self.attempts:  # a replica died during the last attempt: no attempt is left
            await self._dead(d, where, "no attempts left (the last one was cut off)")
            return
        body = json.dumps(d.payload(), separators=(",", ":")).encode()
        ts = str(int(time.time()))
        headers = {"Content-Type": "application/json", "User-Agent": "musicgen-webhook/1",
                   "X-Musicgen-Timestamp": ts, "X-Musicgen-Signature": sign(self.secret, ts, body)}  # fmt: skip
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._pool, post, d.url, body, headers, self.policy, self.timeout_s)
        except NotResolved as exc:  # DNS may be back by the next attempt
            await self._failed(d, where, self._scrub(str(exc), d.url))
        except Refused as exc:  # the URL now points where the service may not go: retrying cannot help
            await self._dead(d, where, f"refused at delivery: {exc}")
        except AttemptFailed as exc:
            await self._failed(d, where, self._scrub(str(exc), d.url))
        except Exception as exc:  # a bug must not stop the loop: count it as a failed attempt
            log.error("webhook for job %s to %s: unexpected error", d.job_id, where, exc_info=True)
            await self._failed(d, where, type(exc).__name__)
        else:
            if await self.store.webhook_delivered(d):
                log.debug("webhook for job %s delivered to %s (attempt %d)", d.job_id, where, d.attempt)

    async def _failed(self, d: WebhookDelivery, where: str, error: str) -> None:
        if d.attempt >= self.attempts:
            await self._dead(d, where, error)
            return
        delay = self.delay_after(d.attempt)
        log.info("webhook for job %s to %s: attempt %d of %d failed (%s); next in %.1f s",
                 d.job_id, where, d.attempt, self.attempts, error, delay)  # fmt: skip
        await self.store.webhook_retry(d, error, delay)

    async def _dead(self, d: WebhookDelivery, where: str, error: str) -> None:
        if await self.store.webhook_dead(d, error):
            log.warning("webhook for job %s to %s failed after %d attempt(s) (%s): moved to the dead letters",
                        d.job_id, where, d.attempt, error)  # fmt: skip

    def _scrub(self, text: str, url: str) -> str:
        """An error message without the URL's query or the secret (exceptions may quote them)."""
        query = url.partition("?")[2].partition("#")[0]
        for secret in (query, self.secret):
            if secret:
                text = text.replace(secret, "…")
        return text

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
