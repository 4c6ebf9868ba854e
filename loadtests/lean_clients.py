"""Latency that many concurrent clients see, measured by clients too lean to add their own tail.

    .venv/bin/python loadtests/lean_clients.py --clients 100 --path /healthz
    .venv/bin/python loadtests/lean_clients.py --clients 100 --path /v1/songs/<id> --seconds 60
    .venv/bin/python loadtests/lean_clients.py --clients 100 --path /healthz --client httpx   # compare

Each client holds one keep-alive HTTP/1.1 connection and sends one GET a second (first request at a
random offset within a second), for --seconds. `--client raw` writes the request bytes on an asyncio
stream and reads the head and the Content-Length body: a few microseconds of Python per request.
`--client httpx` runs the same loop with one httpx.AsyncClient per client, as a typical Python client
(and Locust's users, in their own way) would: on this 2-core machine, 100 such clients add tens to
hundreds of milliseconds of their own to the tail (see the README). Loopback addresses only; bounded
by --seconds. Prints one table row: clients, requests, non-2xx, p50/p95/p99/max in ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import loopback_only  # noqa: E402


async def raw_client(host: str, port: int, path: str, headers: str, until: float, out: list, bad: list):
    reader, writer = await asyncio.open_connection(host, port)
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}\r\n".encode()
    await asyncio.sleep(random.random())
    try:
        while time.monotonic() < until:
            start = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
            out.append((time.perf_counter() - start) * 1000)
            if not 200 <= status < 300:
                bad.append(status)
            await asyncio.sleep(1.0)
    finally:
        writer.close()


async def httpx_client(base: str, path: str, headers: dict, until: float, out: list, bad: list):
    import httpx

    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as http:
        await asyncio.sleep(random.random())
        while time.monotonic() < until:
            start = time.perf_counter()
            response = await http.get(path)
            out.append((time.perf_counter() - start) * 1000)
            if not response.is_success:
                bad.append(response.status_code)
            await asyncio.sleep(1.0)


async def measure(args) -> tuple[list[float], list[int]]:
    url = urlparse(args.host)
    key = os.environ.get("MUSICGEN_LOAD_API_KEY")
    until = time.monotonic() + args.seconds
    out: list[float] = []
    bad: list[int] = []
    if args.client == "raw":
        extra = f"Authorization: Bearer {key}\r\n" if key else ""
        clients = [raw_client(url.hostname, url.port or 80, args.path, extra, until, out, bad)
                   for _ in range(args.clients)]  # fmt: skip
    else:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        clients = [httpx_client(args.host, args.path, headers, until, out, bad) for _ in range(args.clients)]
    await asyncio.gather(*clients)
    return out, bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="http://127.0.0.1:8000")
    ap.add_argument("--path", default="/healthz")
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--client", choices=["raw", "httpx"], default="raw")
    args = ap.parse_args(argv)
    if not 1 <= args.clients <= 5000 or not 0 < args.seconds <= 3600:
        ap.error("--clients 1..5000, --seconds up to 3600")
    loopback_only(args.host)
    import numpy as np

    out, bad = asyncio.run(measure(args))
    if not out:
        print("no request completed", file=sys.stderr)
        return 1
    p50, p95, p99 = np.percentile(out, [50, 95, 99])
    print("| client | clients | requests | non-2xx | p50 ms | p95 ms | p99 ms | max ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {args.client} | {args.clients} | {len(out)} | {len(bad)} | {p50:.1f} | {p95:.1f} | {p99:.1f} "
          f"| {max(out):.0f} |")  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
