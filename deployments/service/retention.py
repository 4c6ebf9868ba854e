"""Retention: files are deleted when their time is up, as the job records are.

A finished job's record and events expire after `retention_s` (a Redis TTL); its takes (its folder
in the results storage, every attempt's) are due for deletion at the same moment, and an upload
`retention_s` after it was stored. The job store keeps what is due in one sorted set
(`mg:expiring`, see store/retention.py); a live ingress replica sweeps it every few seconds. Entries
are claimed atomically, so two replicas never delete the same files at once, and removed only once
their files are gone (with an upload's record, in the same step): a sweeper that dies or fails
midway leaves its entries to be claimed again later.
"""

from __future__ import annotations

import asyncio
import logging

from deployments.service.storage import Storage
from deployments.service.store import AsyncJobStore

log = logging.getLogger(__name__)


async def sweep_expired_files(
    store: AsyncJobStore, results: Storage, uploads: Storage, *, limit: int = 100
) -> list[tuple[str, str]]:
    """Delete the files that are due (at most `limit` entries); returns the (area, key) entries done."""
    done = []
    for area, key in await store.claim_due_files(limit):
        try:
            if area == "results":
                await asyncio.to_thread(results.delete_prefix, key)
            elif area == "uploads":
                await asyncio.to_thread(uploads.delete, key)
            else:
                log.warning("unknown file area %r in the expiry set; dropping the entry", area)
        except Exception:  # storage briefly away: the entry comes due again after SWEEP_CLAIM_S
            log.warning("could not delete the %s of %s", area, key, exc_info=True)
            continue
        done.append((area, key))
    await store.files_deleted(done)
    return done
