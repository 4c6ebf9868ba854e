"""Live audio on a real Redis (deployments/service/live.py, store/live.py): a run's takes MP3-encoded and
appended in order while they are sampled, and a listener following a take from any byte offset, across
a requeued job's attempts, to its end or to the stored file."""

from __future__ import annotations

import asyncio
import io

import pytest
import redis
import soundfile as sf
import torch

from deployments.service.live import LiveTakes, follow
from deployments.service.store import LIVE_DONE, LIVE_STOPPED, AsyncJobStore, JobStore, StoreUnavailable
from deployments.service.store.schema import LIVE_TTL_S, live_key

PARAMS = {"model": "tiny-2", "num_takes": 2}


@pytest.fixture()
def store(server):
    redis.Redis.from_url(server.url).flushdb()
    s = JobStore.from_url(server.url, lease_s=30)
    yield s
    s.close()


def running_job(store: JobStore) -> tuple[str, int]:
    job, _ = store.create(PARAMS)
    return job.id, store.claim(job.id, "w1")


def listen(url: str, job_id: str, take: int, offset: int = 0, stored=None, limit: int | None = None) -> bytes:
    """What a listener gets (at most `limit` bytes, then it hangs up)."""

    async def run() -> bytes:
        astore = AsyncJobStore.from_url(url)

        async def no_file(start):
            raise AssertionError("the stored file was not expected")
            yield b""

        out = bytearray()
        try:
            async for data in follow(astore, job_id, take, offset, stored or no_file, poll_s=0.02):
                out += data
                if limit is not None and len(out) >= limit:
                    break
        finally:
            await astore.aclose()
        return bytes(out[:limit] if limit is not None else out)

    return asyncio.run(run())


def test_a_runs_takes_are_encoded_in_order_and_end_as_their_files(store, server):
    job_id, token = running_job(store)
    live = LiveTakes(store, job_id, token, 2, 48_000)
    tone = torch.sin(torch.arange(48_000 * 3) / 48_000 * 2 * torch.pi * 440)[None].repeat(2, 1) * 0.5
    for piece in tone.split(7_000, dim=1):  # pieces of any length, as blocks release them
        live.on_audio(0, piece)
        live.on_audio(1, -piece)
    takes = live.finish()
    live.end(done=True)
    for n, data in enumerate(takes, start=1):
        heard = listen(server.url, job_id, n)
        assert heard == data and len(data) > 10_000
        audio, rate = sf.read(io.BytesIO(data), dtype="float32")
        assert rate == 48_000 and audio.shape[1] == 2 and abs(audio.shape[0] - 3 * 48_000) < 3_000
    raw = redis.Redis.from_url(server.url)
    assert 0 < raw.ttl(live_key(job_id, token, 1)) <= LIVE_TTL_S
    assert raw.xrevrange(live_key(job_id, token, 1), count=1)[0][1] == {b"end": LIVE_DONE.encode()}


def test_a_listener_resumes_from_any_offset_without_a_lost_or_repeated_byte(store, server):
    job_id, token = running_job(store)
    chunks = [bytes([i]) * (100 + i) for i in range(20)]
    for c in chunks:
        store.live_append(job_id, token, 1, c)
    store.live_end(job_id, token, 1, LIVE_DONE)
    whole = b"".join(chunks)
    assert listen(server.url, job_id, 1) == whole
    got = b""
    while len(got) < len(whole):  # hang up after every 333 bytes, come back with what we have
        got += listen(server.url, job_id, 1, offset=len(got), limit=333)
    assert got == whole
    for offset in (0, 1, 99, 100, 101, len(whole) - 1, len(whole)):
        assert listen(server.url, job_id, 1, offset=offset) == whole[offset:]


def test_a_requeued_job_goes_on_at_the_same_offset_of_its_next_attempt(store, server):
    """The lost run's stream ends stopped; the next run samples the same seeds: its bytes continue."""
    job_id, first = running_job(store)
    song = bytes(range(256)) * 40
    store.live_append(job_id, first, 1, song[:3000])

    async def scenario() -> bytes:
        astore = AsyncJobStore.from_url(server.url)
        out = bytearray()

        async def writer():
            await asyncio.sleep(0.2)
            store.live_end(job_id, first, 1, LIVE_STOPPED)  # its generator is lost: the job is requeued
            assert store.release(job_id, token=first) is not None
            second = store.claim(job_id, "w2")
            for start in range(0, len(song), 1000):
                store.live_append(job_id, second, 1, song[start : start + 1000])
                await asyncio.sleep(0.02)
            store.live_end(job_id, second, 1, LIVE_DONE)

        task = asyncio.create_task(writer())

        async def no_file(start):
            raise AssertionError("not expected")
            yield b""

        async for data in follow(astore, job_id, 1, 0, no_file, poll_s=0.02):
            out += data
        await task
        await astore.aclose()
        return bytes(out)

    assert asyncio.run(scenario()) == song


def test_the_stored_file_serves_what_the_stream_no_longer_holds(store, server):
    job_id, token = running_job(store)
    song = b"ID3" + bytes(5000)
    store.live_append(job_id, token, 1, song[:2000])  # then the store went away for this run's appends
    assert store.complete(job_id, {"takes": []}, token=token)
    asked = []

    async def stored(start):
        asked.append(start)
        yield song[start:]

    assert listen(server.url, job_id, 1, stored=stored) == song
    assert asked == [2000]
    assert listen(server.url, job_id, 1, offset=3000, stored=stored) == song[3000:]


def test_a_failed_job_ends_its_listeners_with_what_was_heard(store, server):
    job_id, token = running_job(store)
    store.live_append(job_id, token, 1, b"abc")
    store.live_end(job_id, token, 1, LIVE_STOPPED)
    assert store.fail(
        job_id, {"code": "INTERNAL", "message": "x", "recovery": "", "details": {}}, token=token
    )
    assert listen(server.url, job_id, 1) == b"abc"
    assert listen(server.url, job_id, 2) == b""  # a take that never started


def test_appends_stop_without_a_gap_when_the_store_fails(store, server, monkeypatch):
    job_id, token = running_job(store)
    live = LiveTakes(store, job_id, token, 1, 48_000)
    real = store.live_append
    calls = []

    def flaky(*args):
        calls.append(args)
        if len(calls) == 2:
            raise StoreUnavailable("connection", "Redis went away")
        return real(*args)

    monkeypatch.setattr(store, "live_append", flaky)
    for _ in range(6):
        live.on_audio(0, torch.rand(2, 48_000) - 0.5)
    (take,) = live.finish()
    live.end(done=True)
    assert len(calls) == 2  # nothing appended after the failure: the stream is a prefix of the take
    stream = b"".join(c.data for c in store.live_read(job_id, token, 1))
    assert stream and take.startswith(stream) and len(take) > len(stream)


def test_a_piece_of_the_wrong_shape_fails_the_run_not_the_listeners(store):
    job_id, token = running_job(store)
    live = LiveTakes(store, job_id, token, 1, 48_000)
    live.on_audio(0, torch.zeros(3, 100))  # three channels
    with pytest.raises(Exception, match="3 channels"):
        live.finish()
    live.end(done=False)
    assert store.live_read(job_id, token, 1)[-1].end == LIVE_STOPPED
