"""The event hub's fan-out, without Redis: a running job's event reaches every listener, a chunk of
listeners per turn of the event loop, so that other requests are served between chunks."""

from __future__ import annotations

import asyncio
import json
import time

from deployments.service.events import FANOUT_CHUNK, EventHub
from deployments.service.store import JobEvent


def _running_event(job_id: str, seq: int) -> JobEvent:
    now = time.time()
    fields = {"id": job_id, "state": "running", "created_at": str(now), "updated_at": str(now),
              "attempts": "1", "progress": json.dumps({"step": seq})}  # fmt: skip
    return JobEvent(job_id, f"{int(now * 1000)}-{seq}", fields)


def _render(job, position, base, event_id, full) -> bytes:
    return f"id: {event_id}\ndata: {job.progress}\n\n".encode()


def test_a_burst_to_many_listeners_lets_other_work_run_between_chunks():
    async def scenario():
        hub = EventHub(store=None, render=_render)  # a running job's event needs no store read
        listeners = [hub.listen_without_subscribing("j1", {}) for _ in range(5 * FANOUT_CHUNK)]
        woken_when_other_work_ran = []

        async def other_request():
            await asyncio.sleep(0)  # scheduled before the burst: runs on the loop's next turn
            woken_when_other_work_ran.append(sum(1 for listener in listeners if listener._update))

        other = asyncio.ensure_future(other_request())
        await hub._on_event(_running_event("j1", 1))
        await other
        updates = [await listener.next(timeout=0) for listener in listeners]
        return woken_when_other_work_ran, updates, hub.delivered

    seen, updates, delivered = asyncio.run(scenario())
    assert 0 < seen[0] < 5 * FANOUT_CHUNK  # the other request ran in the middle of the burst
    assert all(u is not None and u.job.progress == {"step": 1} for u in updates)  # and nobody missed it
    assert delivered == 5 * FANOUT_CHUNK
    assert len({id(u) for u in updates}) == 1  # one update object (rendered once) shared by all


def test_a_newer_update_during_a_burst_supersedes_the_older_one():
    async def scenario():
        hub = EventHub(store=None, render=_render)
        listeners = [hub.listen_without_subscribing("j1", {}) for _ in range(3 * FANOUT_CHUNK)]
        first = asyncio.ensure_future(hub._on_event(_running_event("j1", 1)))
        await asyncio.sleep(0)  # the first burst is under way (one chunk woken)
        await hub._on_event(_running_event("j1", 2))
        await first
        return [(await listener.next(timeout=0)).job.progress["step"] for listener in listeners]

    assert set(asyncio.run(scenario())) == {2}  # every listener ends with the newest update
