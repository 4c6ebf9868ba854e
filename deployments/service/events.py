"""Job events for many listeners: one Redis subscription per process, fanned out in memory.

Every change of a job is an entry of its event stream and a message on one pub/sub channel (see
store/jobs.py). The `EventHub` holds that one subscription and, for each job somebody follows, the
set of `Listener`s (one per open event stream). An event is turned into an `Update` once and rendered once
per base URL, whatever the number of listeners; no listener polls Redis or holds a connection.

Queued jobs' positions move when other jobs leave the queue, which is not an event of theirs: after
such an event the hub re-reads the positions of the queued jobs it follows (one pipelined read) and
sends those that changed again, under the same event id.

When the subscription drops (Redis restart), the hub reconnects and sends every followed job's latest
event, so a listener never misses the end of a job. Every event is a full snapshot of the job, so a
listener that falls behind skips to the newest update it has (the final one always comes last).

An update renders two ways: the job's full view (a stream's first event, and any event that changes
the job's status) or a compact progress frame (status, stage, step, queue position, ...) for the
many events in between, a tenth of the bytes to format, send and parse.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from deployments.service.store import AsyncJobStore, JobEvent, JobState, SongJob, event_order

log = logging.getLogger(__name__)
FANOUT_CHUNK = 64  # listeners woken per turn of the event loop (see EventHub._push_all)

# (job, queue position, base url, event id, full view?) -> one server-sent event
Render = Callable[[SongJob, "int | None", str, str, bool], bytes]


class Update:
    """An event as delivered: the job it describes and its queue position, rendered on demand once
    per (base URL, full or compact) and shared by every listener."""

    __slots__ = ("event", "job", "position", "_render", "_frames")

    def __init__(self, event: JobEvent, params: dict[str, Any], position: int | None, render: Render):
        self.event = event
        self.job = event.job(params)
        self.position = position
        self._render = render
        self._frames: dict[tuple[str, bool], bytes] = {}

    @property
    def final(self) -> bool:
        return self.job.state.finished

    def frame(self, base: str, full: bool = True) -> bytes:
        out = self._frames.get((base, full))
        if out is None:
            out = self._frames[base, full] = self._render(self.job, self.position, base, self.event.id, full)
        return out

    def moved(self, position: int | None) -> Update:
        clone = Update.__new__(Update)
        clone.event, clone.job, clone.position, clone._render, clone._frames = (
            self.event, self.job, position, self._render, {},
        )  # fmt: skip
        return clone


class Listener:
    """One open event stream's inbox. Only the newest update waits: each is a full snapshot, so a
    listener that was slow to send skips what it missed."""

    def __init__(self, job_id: str):
        self.job_id = job_id
        self._update: Update | None = None
        self._wake = asyncio.Event()

    def push(self, update: Update) -> None:
        self._update = update
        self._wake.set()

    async def next(self, timeout: float) -> Update | None:
        """The newest update not yet taken, or None after `timeout` seconds without one."""
        if self._update is None:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
        update, self._update = self._update, None
        return update


class _Followed:
    __slots__ = ("listeners", "params", "last")

    def __init__(self, params: dict[str, Any]):
        self.listeners: set[Listener] = set()
        self.params = params
        self.last: Update | None = None


class EventHub:
    def __init__(self, store: AsyncJobStore, render: Render, *, queue_refresh_s: float = 0.2):
        self.store, self.render = store, render
        self.queue_refresh_s = queue_refresh_s
        self._followed: dict[str, _Followed] = {}
        self._task: asyncio.Task | None = None
        self._refresh: asyncio.Task | None = None
        self.connected = asyncio.Event()
        self.delivered = 0  # updates pushed to listeners (metrics, tests)

    # -- listeners ---------------------------------------------------------------------------

    def listen(self, job_id: str, params: dict[str, Any]) -> Listener:
        self.start()
        return self.listen_without_subscribing(job_id, params)

    def listen_without_subscribing(self, job_id: str, params: dict[str, Any]) -> Listener:
        """Register a listener; the caller delivers events itself (tests of the fan-out)."""
        followed = self._followed.get(job_id)
        if followed is None:
            followed = self._followed[job_id] = _Followed(params)
        listener = Listener(job_id)
        followed.listeners.add(listener)
        return listener

    def unlisten(self, listener: Listener) -> None:
        followed = self._followed.get(listener.job_id)
        if followed is not None:
            followed.listeners.discard(listener)
            if not followed.listeners:
                del self._followed[listener.job_id]

    def params(self, job_id: str) -> dict[str, Any] | None:
        followed = self._followed.get(job_id)
        return followed.params if followed is not None else None

    def latest(self, job_id: str) -> Update | None:
        """The newest update of a followed job, while the subscription is up (so nothing newer was
        missed); None otherwise (then read the job's last event from Redis)."""
        followed = self._followed.get(job_id)
        if followed is None or not self.connected.is_set():
            return None
        return followed.last

    @property
    def listeners(self) -> int:
        return sum(len(f.listeners) for f in self._followed.values())

    def update(self, event: JobEvent, params: dict[str, Any], position: int | None) -> Update:
        """An update for `event`; the hub remembers it as the job's latest if it is newer (a stream's
        first event is read from Redis by its handler, not delivered by the hub)."""
        update = Update(event, params, position, self.render)
        followed = self._followed.get(event.job_id)
        if followed is not None and (
            followed.last is None or event_order(event.id) > event_order(followed.last.event.id)
        ):
            followed.last = update
        return update

    # -- the subscription --------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="event-hub")

    async def stop(self, timeout: float = 5.0) -> None:
        tasks = [t for t in (self._task, self._refresh) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            # wait without awaiting the tasks themselves: their CancelledError must not reach the
            # caller (under anyio, as in FastAPI's lifespan, that hangs the shutdown)
            await asyncio.wait(tasks, timeout=timeout)

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            try:
                async with self.store.notifications() as events:
                    self.connected.set()
                    backoff = 0.1
                    await self._resync()
                    async for event in events:
                        await self._on_event(event)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("event subscription lost; reconnecting", exc_info=True)
            self.connected.clear()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _resync(self) -> None:
        """After (re)subscribing: each followed job's latest event, in case one was missed."""
        for job_id in list(self._followed):
            event = await self.store.last_event(job_id)
            followed = self._followed.get(job_id)
            if event is None or followed is None:
                continue
            if followed.last is None or event_order(event.id) > event_order(followed.last.event.id):
                await self._deliver(followed, event)

    async def _on_event(self, event: JobEvent) -> None:
        if event.state != JobState.QUEUED:  # a job may have left the queue: others moved up
            self._schedule_queue_refresh()
        followed = self._followed.get(event.job_id)
        if followed is not None:
            await self._deliver(followed, event)

    async def _deliver(self, followed: _Followed, event: JobEvent) -> None:
        position = await self.store.queue_position(event.job_id) if event.state == JobState.QUEUED else None
        update = followed.last = Update(event, followed.params, position, self.render)
        await self._push_all(followed, update)

    async def _push_all(self, followed: _Followed, update: Update) -> None:
        """Wake the listeners a chunk per turn of the event loop: each woken listener writes its frame
        in the next turn, and other requests (a status read, a health check) get their turn between
        chunks instead of waiting behind hundreds of writes."""
        listeners = list(followed.listeners)
        for i, listener in enumerate(listeners):
            if i and i % FANOUT_CHUNK == 0:
                await asyncio.sleep(0)
                if followed.last is not update:
                    return  # the listeners not woken yet are woken with the newer update
            listener.push(update)
        self.delivered += len(listeners)

    def _schedule_queue_refresh(self) -> None:
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.get_running_loop().create_task(self._refresh_queue())

    async def _refresh_queue(self) -> None:
        await asyncio.sleep(self.queue_refresh_s)  # one read for a burst of departures
        queued = [(job_id, f) for job_id, f in self._followed.items()
                  if f.last is not None and f.last.job.state == JobState.QUEUED]  # fmt: skip
        if not queued:
            return
        try:
            positions = await self.store.queue_positions([job_id for job_id, _ in queued])
        except Exception:
            log.warning("queue position refresh failed", exc_info=True)
            return
        for (_, followed), position in zip(queued, positions, strict=True):
            last = followed.last
            if last is not None and last.job.state == JobState.QUEUED and position != last.position:
                update = followed.last = last.moved(position)
                await self._push_all(followed, update)
