"""Per-job metrics of the generator replicas, through `ray.serve.metrics` (exported by Ray's metrics
agent next to Ray Serve's own request, latency and replica metrics): finished jobs by state and error
code, seconds per stage, seconds of audio per second of compute (inverse real-time factor), jobs and
takes per batch.
"""

from __future__ import annotations

from deployments.service.store import SongJob


class GeneratorMetrics:
    """Created inside a replica (ray.serve.metrics needs a running Ray worker)."""

    def __init__(self, model: str):
        from ray.serve.metrics import Counter, Gauge, Histogram

        tags = {"model": model}
        # (Ray's annotations say tag_keys is a 1-tuple: any tuple of names is what it takes)
        self.finished = Counter("musicgen_jobs_finished", "Jobs finished, by state and error code",
                                tag_keys=("model", "state", "code"))  # type: ignore[arg-type]  # fmt: skip
        self.stage = Histogram("musicgen_stage_seconds", "Seconds per generation stage",
                               boundaries=[0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600],
                               tag_keys=("model", "stage"))  # type: ignore[arg-type]  # fmt: skip
        self.inverse_rtf = Gauge("musicgen_audio_seconds_per_compute_second",
                                 "Seconds of audio generated per second of model time (last job)",
                                 tag_keys=("model",))  # fmt: skip
        # batch sizes, observed once per job (so a batch of 3 jobs counts 3 times)
        self.takes = Histogram("musicgen_takes_per_batch", "Takes in the sampler batch a job ran in",
                               boundaries=[1, 2, 3, 4, 8, 16], tag_keys=("model",))  # fmt: skip
        self.requests = Histogram("musicgen_requests_per_batch", "Jobs in the sampler batch a job ran in",
                                  boundaries=[1, 2, 3, 4, 8, 16], tag_keys=("model",))  # fmt: skip
        # Serve's metrics carry their own default tags (deployment, replica, ...): pass ours per call
        self.tags = tags

    def record(self, job: SongJob) -> None:
        code = (job.error or {}).get("code", "")
        self.finished.inc(tags={**self.tags, "state": job.state.value, "code": code})
        result = job.result or {}
        timings = result.get("timings", {})
        for key, seconds in timings.items():
            if key.endswith("_s") and key not in ("total_s", "wall_s"):  # style, sampling, decoding
                self.stage.observe(seconds, tags={**self.tags, "stage": key[:-2]})
        takes = result.get("takes", [])
        if takes and timings.get("total_s"):
            audio = sum(t["duration_s"] for t in takes)
            self.inverse_rtf.set(audio / timings["total_s"], tags=self.tags)
            self.takes.observe(timings.get("batch_takes", len(takes)), tags=self.tags)
            self.requests.observe(timings.get("batch_requests", 1), tags=self.tags)
