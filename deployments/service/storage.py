"""Where finished audio and uploads live: a local folder by default (one machine, or a volume every
node mounts), or an S3-compatible bucket (`MUSICGEN_STORAGE_URL=s3://bucket/prefix`), which replicas
on several nodes need.

Keys are relative paths such as `<job id>/take-1.mp3`. Audio is served from here by the ingress,
never passed through Ray handles (large responses through the proxy are retained in memory). Both
backends have the same small interface; code that must read a file with a library that wants a
path (audio decoding) asks for `local_copy(key)`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from deployments.service.settings import env

CHUNK = 256 * 1024  # what a streamed download reads at a time


class Storage(Protocol):
    @property
    def location(self) -> str: ...
    def put_file(self, key: str, src: str | Path) -> str: ...
    def exists(self, key: str) -> bool: ...
    def size(self, key: str) -> int: ...
    def read_range(self, key: str, start: int, end: int) -> bytes: ...
    def iter_range(self, key: str, start: int, end: int) -> Iterator[bytes]: ...
    def local_copy(self, key: str) -> contextlib.AbstractContextManager[Path]: ...
    def delete(self, key: str) -> None: ...
    def delete_prefix(self, prefix: str) -> None: ...


def _check_key(key: str) -> str:
    parts = Path(key).parts
    if not key or key.startswith("/") or ".." in parts or "\\" in key:
        raise ValueError(f"bad storage key {key!r}")
    return key


class LocalStorage:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def location(self) -> str:
        """Where the files are, for messages: a folder of this machine's disk."""
        return f"the folder {self.root.resolve()} (a local disk)"

    def path(self, key: str) -> Path:
        p = (self.root / _check_key(key)).resolve()
        if not p.is_relative_to(self.root.resolve()):
            raise ValueError(f"bad storage key {key!r}")
        return p

    def put_file(self, key: str, src: str | Path) -> str:
        """Atomic: readers never see a half-written file, and two writers of one key (each with its
        own temporary name) leave one of their whole files."""
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return key

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def size(self, key: str) -> int:
        return self.path(key).stat().st_size

    def read_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes [start, end] inclusive, as an HTTP range."""
        with open(self.path(key), "rb") as f:
            f.seek(start)
            return f.read(end - start + 1)

    def iter_range(self, key: str, start: int, end: int) -> Iterator[bytes]:
        """Bytes [start, end] inclusive in chunks: a download never holds the file in memory."""
        with open(self.path(key), "rb") as f:
            f.seek(start)
            left = end - start + 1
            while left > 0:
                block = f.read(min(CHUNK, left))
                if not block:
                    return
                left -= len(block)
                yield block

    @contextlib.contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        path = self.path(key)
        if not path.is_file():
            raise FileNotFoundError(key)
        yield path

    def delete(self, key: str) -> None:
        """Gone afterwards; no error when it was not there."""
        self.path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        """The folder `prefix` and everything under it (temporary files of interrupted writes too)."""
        shutil.rmtree(self.path(prefix), ignore_errors=True)


class S3Storage:
    """An S3-compatible bucket (AWS, MinIO, R2, GCS's XML API, ...) under a key prefix.

    Credentials and the endpoint come from boto3's usual sources (AWS_ACCESS_KEY_ID, AWS_PROFILE,
    instance roles, AWS_ENDPOINT_URL for non-AWS services); `endpoint_url` overrides the endpoint.
    Objects are written whole by one PUT (or a multipart upload), so readers never see half a file.
    """

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, client=None):
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.client = client or boto3.client(
            "s3", endpoint_url=endpoint_url, config=Config(retries={"max_attempts": 5, "mode": "standard"})
        )

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_file(self, key: str, src: str | Path) -> str:
        self.client.upload_file(str(src), self.bucket, self._key(key))
        return key

    def _head(self, key: str) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def size(self, key: str) -> int:
        head = self._head(key)
        if head is None:
            raise FileNotFoundError(key)
        return int(head["ContentLength"])

    def read_range(self, key: str, start: int, end: int) -> bytes:
        got = self.client.get_object(Bucket=self.bucket, Key=self._key(key), Range=f"bytes={start}-{end}")
        return got["Body"].read()

    def iter_range(self, key: str, start: int, end: int) -> Iterator[bytes]:
        got = self.client.get_object(Bucket=self.bucket, Key=self._key(key), Range=f"bytes={start}-{end}")
        yield from got["Body"].iter_chunks(CHUNK)

    @contextlib.contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        from botocore.exceptions import ClientError

        with tempfile.TemporaryDirectory(prefix="musicgen-") as tmp:
            path = Path(tmp) / Path(key).name
            try:
                self.client.download_file(self.bucket, self._key(key), str(path))
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    raise FileNotFoundError(key) from None
                raise
            yield path

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))  # no error for a missing key

    def delete_prefix(self, prefix: str) -> None:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._key(prefix).rstrip("/") + "/"
        )
        for page in pages:
            objects = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if objects:
                done = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": objects})
                if done.get("Errors"):  # reported per object, not raised: the caller must retry
                    first = done["Errors"][0]
                    raise OSError(f"{len(done['Errors'])} objects under {prefix!r} not deleted: {first}")


PROBES = "_probes"  # the folder of the probe files generators write (never a job id: those are hex)


def write_probe(storage: Storage, writer: str, about: dict) -> str:
    """Write a small file that names `writer` and return its key: a reader that finds it sees the same
    storage as the writer (readiness checks that the ingress can read what each generator writes)."""
    import json
    import re

    key = f"{PROBES}/{re.sub(r'[^A-Za-z0-9._-]', '-', writer)}.json"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.json"
        src.write_text(json.dumps({"writer": writer, **about}))
        storage.put_file(key, src)
    return key


def open_storage(location: str, area: str) -> Storage:
    """`area` ("results" or "uploads") of a storage location: a folder path or s3://bucket/prefix."""
    if location.startswith("s3://"):
        url = urlparse(location)
        prefix = "/".join(p for p in (url.path.strip("/"), area) if p)
        return S3Storage(url.netloc, prefix, endpoint_url=env("MUSICGEN_S3_ENDPOINT_URL") or None)
    if "://" in location:
        raise ValueError(f"storage location {location!r}: use a folder path or s3://bucket/prefix")
    return LocalStorage(Path(location) / area)
