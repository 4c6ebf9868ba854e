"""Project metrics at the ingress's GET /metrics (Prometheus text), computed at scrape time from the job
store, so that a scrape shows the backlog even when no generator replica is up: queue depth, running
jobs, open event streams. Per-job metrics come from the generators (deployments/serve/metrics.py).
"""

from __future__ import annotations


def queue_metrics_text(queued: int, running: int, *, listeners: int = 0) -> str:
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    registry = CollectorRegistry()
    Gauge("musicgen_queue_depth", "Jobs waiting for a generator", registry=registry).set(queued)
    Gauge("musicgen_jobs_running", "Jobs holding a worker lease", registry=registry).set(running)
    Gauge("musicgen_event_listeners", "Open event streams on this ingress replica", registry=registry).set(
        listeners
    )
    return generate_latest(registry).decode()
