"""The storage backends keep one contract: a local folder, and an S3-compatible bucket (moto's S3
server on loopback, over HTTP)."""

from __future__ import annotations

import uuid

import pytest

from deployments.service.storage import LocalStorage, S3Storage, open_storage


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return LocalStorage(tmp_path / "results")
    _, client, bucket = request.getfixturevalue("s3")
    return S3Storage(bucket, f"run-{uuid.uuid4().hex[:8]}/results", client=client)


def test_put_read_ranges_and_local_copies(storage, tmp_path):
    src = tmp_path / "take.wav"
    data = bytes(range(256)) * 40
    src.write_bytes(data)
    assert storage.put_file("job1/take-1.wav", src) == "job1/take-1.wav"
    assert storage.exists("job1/take-1.wav") and not storage.exists("job1/take-2.wav")
    assert storage.size("job1/take-1.wav") == len(data)
    assert storage.read_range("job1/take-1.wav", 10, 19) == data[10:20]
    assert storage.read_range("job1/take-1.wav", 0, len(data) - 1) == data
    assert b"".join(storage.iter_range("job1/take-1.wav", 5, len(data) - 3)) == data[5:-2]
    with storage.local_copy("job1/take-1.wav") as local:
        assert local.read_bytes() == data and local.name == "take-1.wav"
    src.write_bytes(b"new")  # a second put replaces the object whole
    storage.put_file("job1/take-1.wav", src)
    assert storage.read_range("job1/take-1.wav", 0, 2) == b"new"


def test_missing_keys_and_bad_keys(storage):
    with pytest.raises(FileNotFoundError), storage.local_copy("nope/take-1.wav"):
        pass
    with pytest.raises(FileNotFoundError):
        storage.size("nope/take-1.wav")
    for bad in ("../escape.wav", "/abs.wav", "a/../../b.wav", ""):
        with pytest.raises(ValueError, match="bad storage key"):
            storage.exists(bad)


def test_delete_prefix_removes_one_job_only(storage, tmp_path):
    src = tmp_path / "x.mp3"
    src.write_bytes(b"ID3")
    for key in ("a/take-1.mp3", "a/take-2.mp3", "ab/take-1.mp3"):
        storage.put_file(key, src)
    storage.delete_prefix("a")
    assert [storage.exists(k) for k in ("a/take-1.mp3", "a/take-2.mp3", "ab/take-1.mp3")] == [
        False,
        False,
        True,
    ]


def test_open_storage_picks_the_backend(s3, tmp_path, monkeypatch):
    endpoint, client, bucket = s3
    assert isinstance(open_storage(str(tmp_path), "uploads"), LocalStorage)
    monkeypatch.setenv("MUSICGEN_S3_ENDPOINT_URL", endpoint)
    for name, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):  # fmt: skip
        monkeypatch.setenv(name, value)
    store = open_storage(f"s3://{bucket}/prod", "uploads")
    assert isinstance(store, S3Storage) and store.prefix == "prod/uploads"
    src = tmp_path / "u.flac"
    src.write_bytes(b"fLaC")
    store.put_file("x.flac", src)
    assert client.get_object(Bucket=bucket, Key="prod/uploads/x.flac")["Body"].read() == b"fLaC"
    with pytest.raises(ValueError, match="s3://"):
        open_storage("gs://bucket", "results")


def test_two_writers_of_one_key_leave_a_whole_file(tmp_path):
    """Each writer has its own temporary name: concurrent writes (a conversion twice at once, a worker
    and its successor) never interleave into a corrupt file."""
    from concurrent.futures import ThreadPoolExecutor

    storage = LocalStorage(tmp_path / "results")
    sources = []
    for i in range(8):
        src = tmp_path / f"v{i}.bin"
        src.write_bytes(bytes([i]) * 3_000_000)
        sources.append(src)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda src: storage.put_file("job/take-1.mp3", src), sources))
    data = storage.path("job/take-1.mp3").read_bytes()
    assert len(data) == 3_000_000 and len(set(data)) == 1
    assert [p.name for p in storage.path("job").iterdir()] == ["take-1.mp3"]  # no temporary left behind


@pytest.fixture(params=["local", "s3"])
def areas(request, tmp_path):
    """(results, uploads) on one backend."""
    if request.param == "local":
        return LocalStorage(tmp_path / "results"), LocalStorage(tmp_path / "uploads")
    _, client, bucket = request.getfixturevalue("s3")
    run = f"run-{uuid.uuid4().hex[:8]}"
    return tuple(S3Storage(bucket, f"{run}/{area}", client=client) for area in ("results", "uploads"))


def test_files_are_deleted_when_their_records_expire(areas, server, tmp_path):
    """With a one-second retention: a finished job's takes (every attempt's) and an old upload are
    deleted by the sweep once the record has expired, and only those; a second sweep finds nothing."""
    import asyncio
    import time

    import redis

    from deployments.service.retention import sweep_expired_files
    from deployments.service.store import AsyncJobStore, JobStore

    results, uploads = areas
    client = redis.Redis.from_url(server.url)
    client.flushdb()
    short, long = JobStore(client, retention_s=1), JobStore(client, retention_s=3600)
    src = tmp_path / "take.mp3"
    src.write_bytes(b"ID3" + bytes(1000))

    def finished_job(store: JobStore) -> tuple[str, list[str]]:
        job, _ = store.create({})
        token = store.claim(job.id, "w1")
        keys = [results.put_file(f"{job.id}/attempt-{token}/take-{n}.mp3", src) for n in (1, 2)]
        keys.append(results.put_file(f"{job.id}/attempt-{token}/take-1.flac", src))  # a conversion
        store.complete(job.id, {"takes": keys}, token=token)
        return job.id, keys

    def sweep() -> list[tuple[str, str]]:
        async def run():
            store = AsyncJobStore.from_url(server.url)
            try:
                return await sweep_expired_files(store, results, uploads)
            finally:
                await store.aclose()

        return asyncio.run(run())

    expired, expired_keys = finished_job(short)
    expired_keys.append(results.put_file(f"{expired}/attempt-9/take-1.mp3", src))  # a lost run's leftover
    kept, kept_keys = finished_job(long)
    running, _ = short.create({})
    running_key = results.put_file(f"{running.id}/attempt-{short.claim(running.id, 'w1')}/take-1.mp3", src)
    short.expire_upload("old.mp3")
    uploads.put_file("old.mp3", src)
    short.expire_upload("never-stored.wav")  # its upload failed after the entry was written
    long.expire_upload("new.mp3")
    uploads.put_file("new.mp3", src)
    assert sweep() == []  # nothing is due yet
    assert all(results.exists(k) for k in expired_keys) and uploads.exists("old.mp3")
    time.sleep(1.3)
    assert sorted(sweep()) == [("results", expired), ("uploads", "never-stored.wav"), ("uploads", "old.mp3")]
    assert short.get(expired) is None  # the record expired with its files
    assert not any(results.exists(k) for k in expired_keys) and not uploads.exists("old.mp3")
    assert (
        all(results.exists(k) for k in kept_keys)
        and results.exists(running_key)
        and uploads.exists("new.mp3")
    )
    assert long.get(kept).state.finished and short.get(running.id).state == "running"
    assert sweep() == []
