"""Running one job on a worker: claim it, keep its lease alive, report progress, honour cancellation,
store the takes and record the outcome exactly once. No Ray here: the GPU deployment delegates to this.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from deployments.service.errors import ServiceError
from deployments.service.jobs import JobState, JobStore
from deployments.service.params import SongParams
from deployments.service.storage import Storage
from musicgen.audio import write_audio
from musicgen.errors import GenerationCanceled, MusicgenError
from musicgen.pipeline import EditSpec, Progress, SongPipeline, SongRequest, SongResult

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

    def start(self) -> _Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)


class JobRunner:
    def __init__(
        self,
        store: JobStore,
        pipeline: SongPipeline,
        results: Storage,
        uploads: Storage,
        worker: str,
        on_finish=None,
        timeout_s: float | None = None,
        encode_in_background: bool = False,
        max_pending_encodes: int = 8,
    ):
        self.store, self.pipeline, self.worker = store, pipeline, worker
        self.results, self.uploads = results, uploads
        self.on_finish = on_finish  # called with the finished SongJob (metrics)
        self.timeout_s = timeout_s  # a job running longer fails with GENERATION_TIMEOUT (checked per step)
        # Audio encoding (MP3 runs at ~30x real time on one core) and storage happen on CPU threads
        # while the model starts the next batch; the job holds its lease until its takes are stored.
        self.encoder = ThreadPoolExecutor(2, thread_name_prefix="encode") if encode_in_background else None
        self._encode_slots = threading.BoundedSemaphore(max_pending_encodes)
        self._encoding: set = set()
        self._encoding_lock = threading.Lock()

    def request_for(self, p: SongParams, files: contextlib.ExitStack) -> SongRequest:
        """The pipeline request of a job; uploads it needs are fetched into `files` (kept until the
        stack closes)."""
        local: dict[str, Path] = {}
        for upload_id in (p.reference_audio_id, p.edit_source_id):
            if upload_id:
                try:
                    local[upload_id] = files.enter_context(self.uploads.local_copy(upload_id))
                except FileNotFoundError:
                    raise ServiceError(
                        "NOT_FOUND", f"upload {upload_id} no longer exists",
                        recovery="upload the file again (uploads are kept for the retention period) and resubmit",
                    ) from None  # fmt: skip
        ref = local[p.reference_audio_id] if p.reference_audio_id else None
        edit = None
        if p.edit_source_id:
            edit = EditSpec(local[p.edit_source_id], tuple(tuple(s) for s in p.edit_segments or ()))
        return SongRequest(
            tokens=torch.tensor(p.tokens, dtype=torch.long), song_duration=p.song_duration,
            style_prompt=p.style_prompt, reference_audio=ref, seed=p.seed, num_takes=p.num_takes,
            steps=p.steps, cfg_strength=p.cfg_strength, edit=edit,
        )  # fmt: skip

    def run(self, job_id: str) -> JobState | None:
        """Run the job if it can be claimed; returns its final state (None if another worker has it)."""
        return self.run_many([job_id])[0]

    def run_many(self, job_ids: list[str]) -> list[JobState | None]:
        """Run the jobs this worker can claim as one batch (the pipeline samples those of the same
        length together). Returns each job's state: final, or RUNNING for a job whose takes are still
        being encoded in the background; None for a job another worker has (or a repeated id)."""
        claimed: list[tuple[int, str, SongParams]] = []
        for i, job_id in enumerate(job_ids):
            if job_id in job_ids[:i] or not self.store.claim(job_id, self.worker):
                continue
            claimed.append((i, job_id, SongParams.from_dict(self.store.get(job_id).params)))
        states: list[JobState | None] = [None] * len(job_ids)
        if not claimed:
            return states
        beats = {job_id: _Heartbeat(self.store, job_id, self.worker).start() for _, job_id, _ in claimed}
        t0 = time.perf_counter()
        try:
            outcomes = self._generate(claimed, beats)
        except BaseException:
            for beat in beats.values():
                beat.stop()
            raise
        for i, job_id, params in claimed:
            finish = functools.partial(self._finish, job_id, params, outcomes[job_id], beats[job_id], t0)
            if self.encoder is None or not isinstance(outcomes[job_id], SongResult):
                states[i] = finish()
                continue
            self._encode_slots.acquire()  # back-pressure: the next batch waits for a free slot
            future = self.encoder.submit(finish)
            with self._encoding_lock:
                self._encoding.add(future)
            future.add_done_callback(self._encoded)
            states[i] = JobState.RUNNING
        return states

    def _generate(self, claimed, beats) -> dict[str, SongResult | Exception]:
        deadline = time.monotonic() + self.timeout_s if self.timeout_s else None
        requests, reports, outcomes = [], [], {}
        with contextlib.ExitStack() as files:  # local copies of uploads, for the time of the batch
            for _, job_id, params in claimed:
                try:
                    requests.append(self.request_for(params, files))
                    reports.append(self._reporter(job_id, beats[job_id], deadline))
                except Exception as exc:  # e.g. an upload that vanished: fails this job only
                    outcomes[job_id] = exc
            runnable = [job_id for _, job_id, _ in claimed if job_id not in outcomes]
            results = self.pipeline.generate_many(requests, reports) if runnable else []
        outcomes.update(zip(runnable, results, strict=True))
        return outcomes

    def _finish(
        self, job_id: str, params: SongParams, outcome, beat: _Heartbeat, t0: float
    ) -> JobState | None:
        try:
            recorded = self._record(job_id, params, outcome, beat, t0)
        finally:
            beat.stop()
        return self._finished(job_id, hooks=recorded)

    def _encoded(self, future) -> None:
        with self._encoding_lock:
            self._encoding.discard(future)
        self._encode_slots.release()

    def drain(self, timeout: float | None = None) -> bool:
        """Wait for background encodes to be recorded (shutdown, tests); False if some are still running."""
        from concurrent.futures import wait

        with self._encoding_lock:
            futures = list(self._encoding)
        _, pending = wait(futures, timeout=timeout)
        return not pending

    def _reporter(self, job_id: str, beat: _Heartbeat, deadline: float | None):
        def on_progress(p: Progress) -> None:
            if beat.lost.is_set() or self.store.cancel_requested(job_id):
                raise GenerationCanceled("canceled")
            if deadline is not None and time.monotonic() > deadline:
                raise _TimedOut()
            self.store.set_progress(
                job_id, {"stage": p.stage, "fraction": p.fraction, "step": p.step, "total": p.total},
                force=p.fraction in (0.0, 1.0),
            )  # fmt: skip

        return on_progress

    def _record(self, job_id: str, params: SongParams, outcome, beat: _Heartbeat, t0: float) -> bool:
        """Write the job's outcome to the store; False when the store did not take it (the job was
        canceled, requeued or finished meanwhile: a second completion is a no-op there)."""
        try:
            if isinstance(outcome, BaseException):
                raise outcome
            self.store.set_progress(job_id, {"stage": "encoding_audio", "fraction": 0.0}, force=True)
            t_enc = time.perf_counter()
            takes = self._store_takes(job_id, params, outcome)
            encoding_s = time.perf_counter() - t_enc
            result = {
                "takes": takes,
                "timings": {**outcome.timings, "encoding_s": encoding_s, "wall_s": time.perf_counter() - t0},
                "sample_rate": outcome.sample_rate,
            }
            return self.store.complete(job_id, result)
        except _TimedOut:
            message = f"the song took longer than {self.timeout_s:g} s to generate"
            return self.store.fail(job_id, ServiceError("GENERATION_TIMEOUT", message).to_dict())
        except GenerationCanceled:
            # a lost lease means someone else owns the job now; else the user canceled it
            return not beat.lost.is_set() and self.store.finish_canceled(job_id)
        except MusicgenError as exc:
            return self.store.fail(job_id, ServiceError.from_library(exc).to_dict())
        except ServiceError as exc:
            return self.store.fail(job_id, exc.to_dict())
        except Exception as exc:
            log.error("job %s failed", job_id, exc_info=exc)
            return self.store.fail(job_id, ServiceError("INTERNAL", f"{type(exc).__name__}: {exc}").to_dict())

    def _finished(self, job_id: str, hooks: bool) -> JobState | None:
        """After the outcome is recorded: metrics, once, by the worker that recorded it. (The script
        that recorded it also queued the job's webhook, if it asked for one: see webhooks.py.)"""
        final = self.store.get(job_id)
        if hooks and final is not None and final.state.finished and self.on_finish is not None:
            try:
                self.on_finish(final)
            except Exception:  # metrics must never fail a job
                log.warning("on_finish hook failed", exc_info=True)
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
