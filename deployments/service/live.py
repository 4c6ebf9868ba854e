"""Live audio: a DiffRhythm 2 take heard while it is sampled, on any ingress replica of any node.

Generator side, `LiveTakes`: the pipeline hands each take's final samples to `on_audio` as its blocks
finish (musicgen.pipelines.dr2); they are MP3-encoded on a thread of this run (never on the engine's)
and appended to the take's live stream in the job store, keyed by the run's attempt. At the end the
bytes of each take are what its MP3 file holds, so a listener who heard it live and one who downloads
it later get the same bytes.

Ingress side, `follow`: the take's MP3 bytes from a byte offset on, as they are appended; a client whose
connection broke (its ingress replica killed, say) asks again with `offset` = the bytes it has and
gets the rest, none lost, none twice. When a job is requeued (its generator lost), the new attempt
samples the same seeds, so the same audio: the stream goes on at the same offset of the new attempt's
bytes (the same bytes on a generator of the same kind; on other hardware the floats differ by ~1e-6,
and a listener may hear a click where the attempts meet). Once the job has succeeded the stored file serves what the stream no longer holds.

Why MP3: a browser's audio element plays an MP3 byte stream progressively as it arrives (frames are
self-delimiting, no container index to wait for), any offset resumes at the next frame, and LAME
encodes far faster than real time; WAV and FLAC need their length up front to play in browsers, and
Ogg/Opus would need a second encoder for what the service already writes as MP3.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable

import torch

from deployments.service.store import (
    LIVE_DONE,
    LIVE_STOPPED,
    AsyncJobStore,
    JobState,
    JobStore,
    StoreUnavailable,
)
from musicgen.audio import Mp3Stream

log = logging.getLogger(__name__)

POLL_S = 0.2  # a listener reads its take's stream this often while nothing new has come
_STOP = object()


class LiveTakes:
    """One run's live audio: `on_audio(take, samples)` (the pipeline's callback, which never blocks)
    queues a take's next samples; a thread encodes them and appends the bytes to the store in order.
    `finish()` flushes the encoders and returns each take's MP3 bytes; `end(done)` marks the streams'
    end. A store error stops the appends (never a gap: listeners then get the rest from the file)."""

    def __init__(self, store: JobStore, job_id: str, attempt: int, takes: int, sample_rate: int):
        self.store, self.job_id, self.attempt = store, job_id, attempt
        self._encoders = [Mp3Stream(sample_rate, 2) for _ in range(takes)]
        self._bytes = [bytearray() for _ in range(takes)]
        self._appending = True
        self._ended = False
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"live-{job_id[:8]}", daemon=True)
        self._thread.start()

    def on_audio(self, take: int, samples: torch.Tensor) -> None:
        self._queue.put((take, samples))

    def _run(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            take, samples = item
            try:
                self._append(take, self._encoders[take].encode(samples.numpy().T))
            except BaseException as exc:  # e.g. a piece of the wrong shape: the take's file must not be made
                self._error = exc
                log.error("live audio of job %s failed", self.job_id, exc_info=True)
                return

    def _append(self, take: int, data: bytes) -> None:
        if not data:
            return
        self._bytes[take] += data
        if not self._appending:
            return
        try:
            self.store.live_append(self.job_id, self.attempt, take + 1, data)
        except StoreUnavailable:
            log.warning("live audio of job %s stops: the store is unreachable", self.job_id, exc_info=True)
            self._appending = False

    def finish(self) -> list[bytes]:
        """Each take's whole MP3 (after the last samples came): the bytes its file must hold."""
        self._queue.put(_STOP)
        self._thread.join()
        if self._error is not None:
            raise self._error
        for take, encoder in enumerate(self._encoders):
            self._append(take, encoder.flush())
        return [bytes(b) for b in self._bytes]

    def end(self, done: bool) -> None:
        """Mark every take's stream ended: LIVE_DONE (its file holds the bytes) or LIVE_STOPPED."""
        if self._ended:
            return
        self._ended = True
        if self._thread.is_alive():
            self._queue.put(_STOP)
        if not self._appending:
            return
        for take in range(len(self._encoders)):
            try:
                self.store.live_end(self.job_id, self.attempt, take + 1, LIVE_DONE if done else LIVE_STOPPED)
            except StoreUnavailable:
                log.warning("could not end the live audio of job %s", self.job_id, exc_info=True)
                return


async def follow(
    store: AsyncJobStore,
    job_id: str,
    take: int,
    offset: int,
    stored: Callable[[int], AsyncIterator[bytes]],
    *,
    poll_s: float = POLL_S,
) -> AsyncIterator[bytes]:
    """A take's MP3 bytes from byte `offset` on, as its run appends them, until its stream ends.
    `stored(offset)`: the take's stored file from an offset on, for what the stream no longer holds
    (it expired, or its run could not append) once the job has succeeded."""
    sent = offset  # bytes of the take the client has
    attempt: int | None = None
    after: str | None = None  # the last entry read of this attempt's stream
    at = 0  # bytes of this attempt's stream before `after`
    while True:
        job = await store.get(job_id)
        if job is None:  # expired meanwhile
            return
        if job.attempts != attempt:  # the first attempt seen, or a requeued job's next one
            attempt, after, at = job.attempts, None, 0
        chunks = await store.live_read(job_id, attempt, take, after) if attempt else []
        stopped = False
        for chunk in chunks:
            after = chunk.entry
            if chunk.end == LIVE_DONE:
                return
            if chunk.end == LIVE_STOPPED:
                stopped = True
                break
            if at + len(chunk.data) > sent:
                yield chunk.data[max(0, sent - at) :]
                sent = at + len(chunk.data)
            at += len(chunk.data)
        if chunks and not stopped:
            continue  # more may be there already
        if job.state == JobState.SUCCEEDED:
            async for data in stored(sent):
                yield data
            return
        if job.state.finished:  # failed or canceled: the audio heard so far is all there is
            return
        await asyncio.sleep(poll_s)
