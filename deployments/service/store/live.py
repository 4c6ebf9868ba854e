"""Live audio of the takes being sampled (`mg:live:{id}:{attempt}:{take}`, schema.py): the generator
appends each take's MP3 bytes as they are encoded, and any ingress replica reads them from an entry id
on, so a listener on another node than the generator hears the song while it is written."""

from __future__ import annotations

from dataclasses import dataclass

from deployments.service.store.records import text
from deployments.service.store.schema import LIVE_TTL_S, live_key
from deployments.service.store.steps import Call, Pipeline, Steps, operation

LIVE_DONE = "done"  # the take's stored file holds exactly the bytes before this entry
LIVE_STOPPED = "stopped"  # the attempt ended without a take (failed, canceled, lost its lease)


@dataclass(frozen=True)
class LiveChunk:
    entry: str  # the stream entry id: read after it for what follows
    data: bytes  # MP3 bytes (empty for the end entry)
    end: str | None = None  # LIVE_DONE or LIVE_STOPPED on the last entry


class LiveOps:
    @operation
    def live_append(self, job_id: str, attempt: int, take: int, data: bytes) -> Steps[None]:
        """Append MP3 bytes of a take to its attempt's live stream (and keep it LIVE_TTL_S more)."""
        key = live_key(job_id, attempt, take)
        yield Pipeline((Call("xadd", (key, {"b": data})), Call("expire", (key, LIVE_TTL_S))))

    @operation
    def live_end(self, job_id: str, attempt: int, take: int, how: str) -> Steps[None]:
        """Mark the end of a take's live stream: LIVE_DONE or LIVE_STOPPED."""
        key = live_key(job_id, attempt, take)
        yield Pipeline((Call("xadd", (key, {"end": how})), Call("expire", (key, LIVE_TTL_S))))

    @operation
    def live_read(
        self, job_id: str, attempt: int, take: int, after: str | None = None, count: int = 64
    ) -> Steps[list[LiveChunk]]:
        """Up to `count` entries of a take's live stream after entry `after` (from its start for None);
        [] when nothing follows yet, or the stream does not exist (not started, or expired)."""
        start = f"({after}" if after else "-"
        entries = yield Call("xrange", (live_key(job_id, attempt, take), start, "+"), {"count": count})
        chunks = []
        for eid, fields in entries:
            fields = {text(k): v for k, v in fields.items()}
            end = fields.get("end")
            chunks.append(LiveChunk(text(eid), fields.get("b", b""), text(end) if end is not None else None))
        return chunks
