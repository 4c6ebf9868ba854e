"""Running one job on a worker: claim it, keep its lease alive, report progress, honour cancellation,
store the takes and record the outcome exactly once. No Ray here: the GPU deployment delegates to this.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from pathlib import Path

import torch

from deployments.errors import ServiceError
from deployments.jobs import JobState, JobStore
from deployments.params import SongParams
from deployments.storage import LocalStorage
from musicgen.audio import write_audio
from musicgen.errors import GenerationCanceled, MusicgenError
from musicgen.pipeline import EditSpec, Progress, SongPipeline, SongRequest

log = logging.getLogger(__name__)


class _TimedOut(Exception):
    """Raised from the progress callback: the job is past its deadline."""


class _Heartbeat:
    """Renews the job's lease every lease/3 seconds until stopped or the lease is lost."""

    def __init__(self, store: JobStore, job_id: str, worker: str):
        self.store, self.job_id, self.worker = store, job_id, worker
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{job_id[:8]}", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.store.lease_s / 3):
            try:
                if not self.store.heartbeat(self.job_id, self.worker):
                    self.lost.set()  # requeued elsewhere or finished: stop working on it
                    return
            except Exception:  # Redis briefly away: keep trying, the lease has slack
                log.warning("heartbeat for %s failed", self.job_id, exc_info=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)


class JobRunner:
    def __init__(
        self,
        store: JobStore,
        pipeline: SongPipeline,
        results: LocalStorage,
        uploads: LocalStorage,
        worker: str,
        webhook_secret: str = "",
        webhook_backoff_s: float = 1.0,
        on_finish=None,
        timeout_s: float | None = None,
    ):
        self.store, self.pipeline, self.worker = store, pipeline, worker
        self.results, self.uploads = results, uploads
        self.webhook_secret, self.webhook_backoff_s = webhook_secret, webhook_backoff_s
        self.last_webhook: threading.Thread | None = None  # the latest delivery, for tests and shutdown
        self.on_finish = on_finish  # called with the finished SongJob (metrics)
        self.timeout_s = timeout_s  # a job running longer fails with GENERATION_TIMEOUT (checked per step)

    def _notify(self, job_id: str, url: str) -> threading.Thread:
        """POST the final job to its webhook in the background (retries must not hold the GPU)."""
        from deployments.webhooks import deliver

        job = self.store.get(job_id)
        payload = {"id": job.id, "status": job.state.value, "result": job.result, "error": job.error,
                   "finished_at": job.finished_at}  # fmt: skip

        def send() -> None:
            ok = deliver(url, payload, self.webhook_secret, backoff_s=self.webhook_backoff_s)
            self.store.set_webhook_status(job_id, "delivered" if ok else "failed")

        thread = threading.Thread(target=send, name=f"webhook-{job_id[:8]}", daemon=True)
        thread.start()
        return thread

    def request_for(self, p: SongParams) -> SongRequest:
        ref = self.uploads.path(p.reference_audio_id) if p.reference_audio_id else None
        edit = None
        if p.edit_source_id:
            edit = EditSpec(
                self.uploads.path(p.edit_source_id), tuple(tuple(s) for s in p.edit_segments or ())
            )
        return SongRequest(
            tokens=torch.tensor(p.tokens, dtype=torch.long), song_duration=p.song_duration,
            style_prompt=p.style_prompt, reference_audio=ref, seed=p.seed, num_takes=p.num_takes,
            steps=p.steps, cfg_strength=p.cfg_strength, edit=edit,
        )  # fmt: skip

    def run(self, job_id: str) -> JobState | None:
        """Run the job if it can be claimed; returns its final state (None if another worker has it)."""
        if not self.store.claim(job_id, self.worker):
            return None
        job = self.store.get(job_id)
        params = SongParams.from_dict(job.params)
        deadline = time.monotonic() + self.timeout_s if self.timeout_s else None
        with _Heartbeat(self.store, job_id, self.worker) as beat:

            def on_progress(p: Progress) -> None:
                if beat.lost.is_set() or self.store.cancel_requested(job_id):
                    raise GenerationCanceled("canceled")
                if deadline is not None and time.monotonic() > deadline:
                    raise _TimedOut()
                self.store.set_progress(
                    job_id, {"stage": p.stage, "fraction": p.fraction, "step": p.step, "total": p.total},
                    force=p.fraction in (0.0, 1.0),
                )  # fmt: skip

            try:
                t0 = time.perf_counter()
                result = self.pipeline.generate(self.request_for(params), progress=on_progress)
                self.store.set_progress(job_id, {"stage": "encoding_audio", "fraction": 0.0}, force=True)
                takes = self._store_takes(job_id, params, result)
                outcome = {
                    "takes": takes,
                    "timings": {**result.timings, "wall_s": time.perf_counter() - t0},
                    "sample_rate": result.sample_rate,
                }
                self.store.complete(job_id, outcome)
            except _TimedOut:
                self.store.fail(
                    job_id,
                    ServiceError(
                        "GENERATION_TIMEOUT", f"the song took longer than {self.timeout_s:g} s to generate"
                    ).to_dict(),
                )
            except GenerationCanceled:
                if beat.lost.is_set():
                    return self.store.get(job_id).state  # someone else owns it now
                self.store.finish_canceled(job_id)
            except MusicgenError as exc:
                self.store.fail(job_id, ServiceError.from_library(exc).to_dict())
            except Exception as exc:
                log.exception("job %s failed", job_id)
                self.store.fail(job_id, ServiceError("INTERNAL", f"{type(exc).__name__}: {exc}").to_dict())
        final = self.store.get(job_id)
        if final is not None and final.state.finished:
            if self.on_finish is not None:
                try:
                    self.on_finish(final)
                except Exception:  # metrics must never fail a job
                    log.warning("on_finish hook failed", exc_info=True)
            if params.webhook_url:
                self.last_webhook = self._notify(job_id, params.webhook_url)
        return final.state if final else None

    def _store_takes(self, job_id: str, p: SongParams, result) -> list[dict]:
        takes = []
        with tempfile.TemporaryDirectory() as tmp:
            for i, audio in enumerate(result.audio):
                name = f"take-{i + 1}.{p.output_format}"
                local = write_audio(Path(tmp) / name, audio, result.sample_rate, p.output_format)
                key = self.results.put_file(f"{job_id}/{name}", local)
                takes.append(
                    {"n": i + 1, "key": key, "format": p.output_format, "seed": result.seeds[i],
                     "duration_s": audio.shape[-1] / result.sample_rate}
                )  # fmt: skip
        return takes
