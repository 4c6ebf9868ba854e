"""Admission: what may refuse a submission, checked in the script that creates the job (create.lua),
so that concurrent submissions cannot exceed a limit. The queue's length (`max_queue`), and with API
keys each key's quotas: jobs queued or running at once, jobs queued, songs and seconds of audio per
UTC day (its `mg:owner:{key id}:usage:{day}` counters)."""

from __future__ import annotations

import time
from typing import Any

from deployments.service import settings
from deployments.service.store.records import text

UNLIMITED = 2**62  # max_queue None: no queue limit


class QueueFull(Exception):
    def __init__(self, depth: int):
        super().__init__(f"{depth} songs are waiting")
        self.depth = depth


class QuotaExceeded(Exception):
    """A submission past one of its API key's quotas. For active_jobs and queued_jobs, when the key's
    earliest running job started and the best queue rank of its queued ones (None: there is none);
    for the daily quotas, when the day ends."""

    def __init__(self, quota: str, limit: float, used: float, *, first_start: float | None = None,
                 first_rank: int | None = None, day_ends_at: float | None = None):  # fmt: skip
        super().__init__(f"{quota}: {used:g} of {limit:g} used")
        self.quota, self.limit, self.used = quota, limit, used
        self.first_start, self.first_rank, self.day_ends_at = first_start, first_rank, day_ends_at


def utc_day(t: float) -> tuple[str, float]:
    """The UTC day of unix time `t` (the usage counters' key) and when it ends."""
    day = int(t // 86400)
    return time.strftime("%Y%m%d", time.gmtime(day * 86400)), (day + 1) * 86400.0


def quota_args(owner: str, quotas: settings.Quotas | None) -> list[float | str]:
    """create.lua's quota arguments: active_jobs, queued_jobs, songs_per_day, audio_s_per_day ('' for
    none: without an owner or quotas nothing is counted against a key)."""
    if not owner or quotas is None:
        return ["", "", "", ""]
    return [quotas.active_jobs, quotas.queued_jobs, quotas.songs_per_day, quotas.audio_s_per_day]


def audio_seconds(params: dict[str, Any]) -> float:
    """What a submission counts against audio_s_per_day: its duration times its takes."""
    return float(params.get("duration_s") or 0) * int(params.get("num_takes") or 1)


def refusal(reply: list[Any], day_ends_at: float) -> QueueFull | QuotaExceeded | None:
    """The exception a create.lua reply stands for ({'full', depth} or {'quota', name, limit, used,
    first start, first rank}); None when the job was admitted."""
    outcome, value = text(reply[0]), text(reply[1])
    if outcome == "full":
        return QueueFull(int(value))
    if outcome != "quota":
        return None
    limit, used, *when = (text(x) for x in reply[2:])
    first_start, first_rank = (when + ["", ""])[:2]
    return QuotaExceeded(
        value, float(limit), float(used), first_start=float(first_start) if first_start else None,
        first_rank=int(first_rank) if first_rank else None,
        day_ends_at=day_ends_at if value.endswith("_per_day") else None,
    )  # fmt: skip
