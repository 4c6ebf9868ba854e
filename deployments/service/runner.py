"""Running jobs on a worker: claim them, keep their leases alive, report progress, honour cancellation,
store the takes and record each outcome exactly once. No Ray here: the GPU deployment delegates to this.

Each job of a batch ends on its own: it is recorded, or given back to the queue when the store cannot
take its outcome, or (when the store cannot be reached at all) its lease renewals stop so that the
lease expires and the reconciler re-queues it. No job keeps a live lease once its worker has stopped
working on it, whatever happens to the other jobs of the batch.

Fencing: every write of a run carries its lease token (see store/jobs.py). When the store refuses one, the
job has been requeued, and maybe claimed again, without this run: it stops, records nothing, and
removes the takes it stored. Takes are stored under the run's own folder (`<job id>/attempt-<n>/`),
each through a unique temporary name renamed into place (storage.py), and the record names them only
if the run's fenced `complete` succeeds: a run that lost its lease never writes over the files the
record of another run points at.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from deployments.service.errors import ServiceError
from deployments.service.live import LiveTakes
from deployments.service.params import SongParams
from deployments.service.storage import Storage
from deployments.service.store import JobState, JobStore, StoreUnavailable
from musicgen.audio import write_audio
from musicgen.errors import GenerationCanceled, MusicgenError
from musicgen.pipelines import EditSpec, Pipeline, Progress, SongRequest, SongResult

log = logging.getLogger(__name__)


class _TimedOut(Exception):
    """Raised from the progress callback: the job is past its deadline."""


class _LeaseLost(Exception):
    """The store refused a write of this run: the job was requeued (and maybe claimed again) or ended
    without it."""


class _Lease:
    """This worker's lease on one claimed job: its token, which fences every write of the run, and a
    thread renewing it every lease/3 s until stopped, or until the store refuses (`lost`)."""

    def __init__(self, store: JobStore, job_id: str, token: int):
        self.store, self.job_id, self.token = store, job_id, token
        self.live: LiveTakes | None = None  # the run's live audio (models with live_audio)
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"lease-{job_id[:8]}", daemon=True)

    @property
    def folder(self) -> str:
        """Where this run stores its takes."""
        return f"{self.job_id}/attempt-{self.token}"

    def _loop(self) -> None:
        while not self._stop.wait(self.store.lease_s / 3):
            try:
                if not self.store.heartbeat(self.job_id, token=self.token):
                    self.lost.set()  # requeued, claimed again or finished: stop working on it
                    return
            except Exception:  # Redis briefly away: keep trying, the lease has slack
                log.warning("lease renewal for %s failed", self.job_id, exc_info=True)

    def start(self) -> _Lease:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self.live is not None:  # a run that ended without storing its takes: listeners stop
            self.live.end(done=False)
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)


class JobRunner:
    def __init__(
        self,
        store: JobStore,
        pipeline: Pipeline,
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

    def request_for(self, p: SongParams, files: contextlib.ExitStack, on_audio=None) -> SongRequest:
        """The pipeline request of a job; uploads it needs are fetched into `files` (kept until the
        stack closes); `on_audio` receives its live audio."""
        # the ingress routes by model: a job of another model is a bug or a changed config, never a guess
        serving = self.pipeline.spec.name
        if p.model != serving:
            raise ServiceError(
                "INTERNAL", f"a job for model {p.model} reached a generator of {serving}",
                recovery="submit the song again; if it repeats, report it with the request id",
            )  # fmt: skip
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
            segments = tuple((float(a), float(b)) for a, b in p.edit_segments or ())
            edit = EditSpec(local[p.edit_source_id], segments)
        return SongRequest(
            tokens=torch.tensor(p.tokens, dtype=torch.long), song_duration=p.song_duration,
            style_prompt=p.style_prompt, reference_audio=ref, seed=p.seed, num_takes=p.num_takes,
            steps=p.steps, cfg_strength=p.cfg_strength, edit=edit, duration_s=p.duration_s, on_audio=on_audio,
        )  # fmt: skip

    def run(self, job_id: str) -> JobState | None:
        """Run the job if it can be claimed; returns its final state (None if another worker has it)."""
        return self.run_many([job_id])[0]

    def run_many(self, job_ids: list[str]) -> list[JobState | None]:
        """Run the jobs this worker can claim as one batch (the pipeline samples those of the same
        length together). Returns each job's state as this worker left it: final, QUEUED when it was
        given back, or RUNNING for a job whose takes are still being encoded in the background; None
        for a job another worker has (or a repeated id, or one whose lease this run lost)."""
        states: list[JobState | None] = [None] * len(job_ids)
        leases: dict[str, _Lease] = {}  # claimed and not yet handed over to be recorded
        claimed: list[tuple[int, str, SongParams]] = []
        try:
            for i, job_id in enumerate(job_ids):
                if job_id in job_ids[:i]:
                    continue
                token = self.store.claim(job_id, self.worker)
                if token is None:
                    continue
                leases[job_id] = _Lease(self.store, job_id, token).start()
                job = self.store.get(job_id)
                if job is None:  # deleted right after the claim (its retention ran out): nothing to run
                    leases.pop(job_id).stop()
                    continue
                claimed.append((i, job_id, SongParams.from_dict(job.params)))
            if not claimed:
                return states
            t0 = time.perf_counter()
            outcomes = self._generate(claimed, leases)
            for i, job_id, params in claimed:
                states[i] = self._hand_over(leases[job_id], params, outcomes[job_id], t0)
                del leases[job_id]
        finally:
            # whatever stopped this batch, none of its jobs stays running under a renewed lease
            for lease in leases.values():
                self._give_back(lease)
        return states

    def _generate(self, claimed, leases) -> dict[str, SongResult | Exception]:
        deadline = time.monotonic() + self.timeout_s if self.timeout_s else None
        requests: list[SongRequest] = []
        reports: list[Callable[[Progress], None]] = []
        outcomes: dict[str, SongResult | Exception] = {}
        with contextlib.ExitStack() as files:  # local copies of uploads, for the time of the batch
            for _, job_id, params in claimed:
                try:
                    live = self._live(leases[job_id], params)
                    requests.append(self.request_for(params, files, live.on_audio if live else None))
                    reports.append(self._reporter(leases[job_id], deadline))
                except Exception as exc:  # e.g. an upload that vanished: fails this job only
                    outcomes[job_id] = exc
            runnable = [job_id for _, job_id, _ in claimed if job_id not in outcomes]
            results = self.pipeline.generate_many(requests, reports) if runnable else []
        outcomes.update(zip(runnable, results, strict=True))
        return outcomes

    def _live(self, lease: _Lease, params: SongParams) -> LiveTakes | None:
        """The run's live audio, for a model that writes its songs left to right."""
        if not self.pipeline.spec.live_audio:
            return None
        rate = getattr(self.pipeline, "sample_rate", self.pipeline.spec.sample_rate)
        lease.live = LiveTakes(self.store, lease.job_id, lease.token, params.num_takes, rate)
        return lease.live

    def _hand_over(self, lease: _Lease, params: SongParams, outcome, t0: float) -> JobState | None:
        """Record a job's outcome now, or (a song to encode, with a background encoder) on an encoder
        thread, which returns RUNNING at once."""
        if self.encoder is not None and isinstance(outcome, SongResult):
            self._encode_slots.acquire()  # back-pressure: the next batch waits for a free slot
            try:
                future = self.encoder.submit(self._finish, lease, params, outcome, t0)
            except RuntimeError:  # the encoder is shut down (the replica is stopping): encode here
                self._encode_slots.release()
            else:
                with self._encoding_lock:
                    self._encoding.add(future)
                future.add_done_callback(self._encoded)
                return JobState.RUNNING
        return self._finish(lease, params, outcome, t0)

    def _finish(self, lease: _Lease, params: SongParams, outcome, t0: float) -> JobState | None:
        """Record the outcome, or give the job back when the store cannot take it. Never raises, and
        stops the lease renewals in every case: the other jobs of the batch do not depend on this one."""
        try:
            state = self._record(lease, params, outcome, t0)
        except Exception:  # the store failed (unreachable, timed out): another attempt will do it
            log.warning("could not record job %s: giving it back", lease.job_id, exc_info=True)
            state = self._give_back(lease)
        finally:
            lease.stop()
        if state is not None and state.finished:
            self._after_finish(lease.job_id)
        return state

    def _give_back(self, lease: _Lease) -> JobState | None:
        """Requeue the job for another attempt (or fail it with WORKER_LOST once its attempts are used
        up). When the store cannot be reached either, stopping the renewals is enough: the lease
        expires and the reconciler re-queues the job."""
        try:
            state = self.store.release(lease.job_id, token=lease.token)
        except Exception:
            log.warning("could not give job %s back: its lease will expire", lease.job_id, exc_info=True)
            state = None
        finally:
            lease.stop()
        return state

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

    def _reporter(self, lease: _Lease, deadline: float | None):
        job_id = lease.job_id

        def on_progress(p: Progress) -> None:
            if lease.lost.is_set():
                raise _LeaseLost()
            try:
                canceled = self.store.cancel_requested(job_id)
            # the store briefly away: go on; the lease renewals decide whether the job stays ours
            except StoreUnavailable:
                log.warning("could not read the cancel flag of %s", job_id, exc_info=True)
                canceled = False
            if canceled:
                raise GenerationCanceled("canceled")
            if deadline is not None and time.monotonic() > deadline:
                raise _TimedOut()
            progress = {"stage": p.stage, "fraction": p.fraction, "step": p.step, "total": p.total}
            self._progress(lease, progress, force=p.fraction in (0.0, 1.0))

        return on_progress

    def _progress(self, lease: _Lease, progress: dict, *, force: bool) -> None:
        """A fenced progress write; raises _LeaseLost when the store refuses it. Progress is best
        effort: a store error is logged and the run goes on."""
        try:
            written = self.store.set_progress(lease.job_id, progress, token=lease.token, force=force)
        except StoreUnavailable:
            log.warning("could not write the progress of %s", lease.job_id, exc_info=True)
            return
        if written is False:
            lease.lost.set()
            raise _LeaseLost()

    def _record(self, lease: _Lease, params: SongParams, outcome, t0: float) -> JobState | None:
        """Write the job's outcome to the store; returns the state recorded, or None when the store
        refused it (the lease was lost). Store errors propagate (the caller gives the job back)."""
        state, value = self._outcome(lease, params, outcome, t0)
        job_id, token = lease.job_id, lease.token
        if state == JobState.SUCCEEDED:
            written = self.store.complete(job_id, value, token=token)
        elif state == JobState.CANCELED:
            written = self.store.finish_canceled(job_id, token=token)
        elif state == JobState.FAILED:
            written = self.store.fail(job_id, value, token=token)
        else:
            written = False
        if not written:
            lease.lost.set()
            try:  # takes no record names: this run's own folder
                self.results.delete_prefix(lease.folder)
            except Exception:  # left for the sweeper, which deletes the job's folder at its expiry
                log.warning("could not delete the takes of lost job %s", lease.folder, exc_info=True)
            return None
        return state

    def _outcome(self, lease: _Lease, params: SongParams, outcome, t0: float) -> tuple[JobState | None, dict]:
        """What to record: (SUCCEEDED, result), (FAILED, error), (CANCELED, {}), or (None, {}) when
        the lease was lost and nothing must be recorded."""
        try:
            if isinstance(outcome, BaseException):
                raise outcome
            self._progress(lease, {"stage": "encoding_audio", "fraction": 0.0}, force=True)
            t_enc = time.perf_counter()
            takes = self._store_takes(lease, params, outcome)
            encoding_s = time.perf_counter() - t_enc
            return JobState.SUCCEEDED, {
                "takes": takes,
                "timings": {**outcome.timings, "encoding_s": encoding_s, "wall_s": time.perf_counter() - t0},
                "sample_rate": outcome.sample_rate,
            }
        except _LeaseLost:
            return None, {}
        except _TimedOut:
            message = f"the song took longer than {self.timeout_s:g} s to generate"
            return JobState.FAILED, ServiceError("GENERATION_TIMEOUT", message).to_dict()
        except GenerationCanceled:
            return JobState.CANCELED, {}
        except MusicgenError as exc:
            return JobState.FAILED, ServiceError.from_library(exc).to_dict()
        except ServiceError as exc:
            return JobState.FAILED, exc.to_dict()
        except Exception as exc:
            log.error("job %s failed", lease.job_id, exc_info=exc)
            return JobState.FAILED, ServiceError("INTERNAL", f"{type(exc).__name__}: {exc}").to_dict()

    def _after_finish(self, job_id: str) -> None:
        """After the outcome is recorded: metrics, once, by the worker that recorded it. (The script that
        recorded it also queued the job's webhook, if it asked for one: see webhooks.py.)"""
        try:
            final = self.store.get(job_id)
        except Exception:
            log.warning("could not read job %s back: no metrics for it", job_id, exc_info=True)
            return
        if final is None or not final.state.finished:
            return
        if self.on_finish is not None:
            try:
                self.on_finish(final)
            except Exception:  # metrics must never fail a job
                log.warning("on_finish hook failed", exc_info=True)

    def _store_takes(self, lease: _Lease, p: SongParams, result) -> list[dict]:
        """Each take encoded, then stored under the run's own folder if the run still holds the job
        (a fenced lease renewal just before each write). With live audio, each take's MP3 is the bytes
        its listeners heard (stored as the take when the format is mp3, else next to it, where the
        audio route's conversion to mp3 finds it)."""
        live = lease.live.finish() if lease.live is not None else None
        takes = []
        with tempfile.TemporaryDirectory() as tmp:
            for i, audio in enumerate(result.audio):
                name = f"take-{i + 1}.{p.output_format}"
                local = Path(tmp) / name
                if live is not None and p.output_format == "mp3":
                    local.write_bytes(live[i])
                else:
                    write_audio(local, audio, result.sample_rate, p.output_format)
                if live is not None and p.output_format != "mp3":
                    (Path(tmp) / f"take-{i + 1}.mp3").write_bytes(live[i])
                    self._still_held(lease)
                    self.results.put_file(f"{lease.folder}/take-{i + 1}.mp3", Path(tmp) / f"take-{i + 1}.mp3")
                self._still_held(lease)
                key = self.results.put_file(f"{lease.folder}/{name}", local)
                takes.append(
                    {"n": i + 1, "key": key, "format": p.output_format, "seed": result.seeds[i],
                     "duration_s": audio.shape[-1] / result.sample_rate}
                )  # fmt: skip
        if lease.live is not None:
            lease.live.end(done=True)
        return takes

    def _still_held(self, lease: _Lease) -> None:
        if lease.lost.is_set():
            raise _LeaseLost()
        try:
            held = self.store.heartbeat(lease.job_id, token=lease.token)
        except StoreUnavailable:  # the store briefly away: the file goes to this run's own folder
            log.warning("could not renew the lease of %s before storing a take", lease.job_id, exc_info=True)
            return
        if not held:
            lease.lost.set()
            raise _LeaseLost()
