"""What every song pipeline shares: requests, results, progress, and `Pipeline`, the base class that
loads a model by name and batches requests.

`Pipeline.from_pretrained(name)` looks the model up in the registry and returns its family's pipeline
(`DR1Pipeline`, `DR2Pipeline`); `generate()` and `generate_many()` take `SongRequest`s whose tokens come
from the lyrics front end (`musicgen.lyrics`) and return audio for every take.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from musicgen.errors import InvalidParameter
from musicgen.model.style import StyleEncoder
from musicgen.model.vae import SAMPLE_RATE
from musicgen.registry import ModelSpec, get_model_spec

log = logging.getLogger(__name__)

MAX_TAKES = 4  # takes of one song
MAX_SEED = 2**63 - 1 - MAX_TAKES  # take i uses seed + i


@dataclass(frozen=True)
class Progress:
    stage: str  # "encoding_style" | "sampling" | "decoding"
    fraction: float  # of this stage, 0..1
    step: int = 0
    total: int = 0


ProgressCallback = Callable[[Progress], None]
# (take index, (2, n) fp32 stereo on the CPU): a take's next samples, as soon as no later block can change
# them (DiffRhythm 2); the pieces of a take put together are its audio in the result
AudioCallback = Callable[[int, torch.Tensor], None]


@dataclass(frozen=True)
class EditSpec:
    """Regenerate `segments` (seconds; -1 means the song's start or end) of an existing song."""

    source_audio: Path
    segments: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class SongRequest:
    tokens: torch.Tensor  # (n,) model token ids: DiffRhythm 1's are frame-aligned (0 = filler)
    song_duration: float  # DiffRhythm 1: frames / max_frames, as the official get_lrc_token returns it
    style_prompt: str | None = None
    reference_audio: Path | None = None
    style_embedding: torch.Tensor | None = None  # (1, 512), e.g. from a cache; wins over the two above
    seed: int = 0
    num_takes: int = 1
    steps: int | None = None  # None: the model's default (ModelSpec.default_steps)
    cfg_strength: float | None = None  # None: the model's default (ModelSpec.default_cfg)
    edit: EditSpec | None = None
    duration_s: float | None = None  # DiffRhythm 2 (its tokens are not frame-aligned): the song's length
    on_audio: AudioCallback | None = None  # live audio (models whose family has live_audio)


def encode_style(encoder: StyleEncoder | None, req: SongRequest) -> torch.Tensor:
    """(1, 512): the request's own embedding, else its reference clip's or its text prompt's."""
    if req.style_embedding is not None:
        return req.style_embedding.float().reshape(1, -1)
    if req.reference_audio is not None:
        return encoder.embed_audio_file(req.reference_audio)
    return encoder.embed_text(req.style_prompt)


@dataclass
class SongResult:
    audio: torch.Tensor  # (takes, 2, samples) fp32 in [-1, 1]
    latents: torch.Tensor  # (takes, frames, 64)
    seeds: list[int]
    sample_rate: int = SAMPLE_RATE  # each pipeline gives its model's (ModelSpec.sample_rate)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.audio.shape[-1] / self.sample_rate


def _no_report(progress: Progress) -> None:
    pass


class Pipeline:
    """A loaded model and what every family's pipeline shares: `generate` / `generate_many` fill in the
    model's defaults, prepare each request (a bad one fails alone), group the compatible ones (equal
    `_batch_key`) into batches of at most `max_batch_takes` takes, and run each batch; a batch that runs
    out of memory is retried one request at a time, and a single request that does gets `OutOfMemory`.
    Subclasses give `_load`, `check_inputs`, `_prepare`, `_batch_key`, `_sample_and_decode` and
    `_as_error`; prepared items carry `index` and `req`."""

    max_batch_takes = 8  # takes sampled together at most (memory grows with takes x frames)
    # requests of any shape join those running, on threads of their own (DR2Pipeline's engine): a
    # server runs each job as it comes instead of gathering batches
    continuous = False
    # a continuous pipeline's key/value cache budget: bytes, or else a share of the GPU's free memory
    # once loaded (None: the pipeline's default; see DR2Pipeline.cache_budget). Read when its engine
    # starts, at the first song.
    engine_budget_bytes: int | None = None
    engine_cache_share: float | None = None

    def load(self) -> dict[str, int] | None:
        """What a continuous pipeline is sampling now (see DR2Pipeline.load); None for the others."""
        return None

    # Testing aid for the out-of-memory paths without filling a device: a batch of more takes than
    # this fails as a full device would
    fault_oom_takes: int | None = None
    spec: ModelSpec
    device: torch.device
    style_encoder: StyleEncoder | None

    # -------------------------------------------------------------------------------------------
    # loading

    @classmethod
    def from_pretrained(
        cls,
        name: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        download: bool = True,
        with_style_encoder: bool = True,
        plan: str = "auto",
        compile: str = "auto",
    ) -> Pipeline:
        """The pipeline of model `name`, as its family in the registry names it. Fetches what is missing
        (unless `download` is False or the hub is offline), loads every file strictly and keeps the
        modules on one device. `plan`: how a DiffRhythm 1 sampling step's rows run (see `ExecutionPlan`:
        auto, batched, sequential, parallel, graphs). `compile`: `torch.compile` DiffRhythm 1's DiT
        blocks: on, off, or auto = on CUDA only. DiffRhythm 2's block sampler runs eagerly, whatever
        these say (a warning says so when they ask for more)."""
        if compile not in ("auto", "on", "off"):
            raise InvalidParameter(f"unknown compile setting {compile!r}", recovery="use auto, on or off")
        spec = get_model_spec(name)
        target = spec.family.pipeline_class()
        if not issubclass(target, cls):
            raise InvalidParameter(
                f"{name} is a {spec.family.title} model, which {cls.__name__} does not run",
                recovery=f"load it with Pipeline.from_pretrained or {target.__name__}.from_pretrained",
                details={"parameter": "model", "value": name},
            )
        return target._load(
            spec, device=device, dtype=dtype, download=download, with_style_encoder=with_style_encoder,
            plan=plan, compile=compile,
        )  # fmt: skip

    @classmethod
    def _load(
        cls, spec: ModelSpec, *, device: str, dtype: str, download: bool, with_style_encoder: bool,
        plan: str, compile: str,
    ) -> Pipeline:  # fmt: skip
        raise NotImplementedError

    # -------------------------------------------------------------------------------------------
    # requests

    def with_defaults(self, req: SongRequest) -> SongRequest:
        """`req` with the model's default steps and guidance where it gives none."""
        if req.steps is not None and req.cfg_strength is not None:
            return req
        return dataclasses.replace(
            req,
            steps=self.spec.default_steps if req.steps is None else req.steps,
            cfg_strength=self.spec.default_cfg if req.cfg_strength is None else req.cfg_strength,
        )

    def check_inputs(self, req: SongRequest) -> None:
        raise NotImplementedError

    def encode_style(self, req: SongRequest) -> torch.Tensor:
        return encode_style(self.style_encoder, req)

    def generate(self, req: SongRequest, progress: ProgressCallback | None = None) -> SongResult:
        (out,) = self.generate_many([req], [progress])
        if isinstance(out, BaseException):
            raise out
        return out

    def generate_many(
        self, reqs: Sequence[SongRequest], progress: Sequence[ProgressCallback | None] | None = None
    ) -> list[SongResult | Exception]:
        """Generate several songs; compatible requests run as one sampler batch (and one decoder batch).
        Returns per request its result or the exception that ended it, so that one bad, canceled or
        timed-out request never costs the others theirs."""
        reports = list(progress) if progress is not None else [None] * len(reqs)
        results: list[SongResult | Exception | None] = [None] * len(reqs)
        ready = []
        for i, req in enumerate(reqs):
            try:
                ready.append(self._prepare(i, self.with_defaults(req), reports[i] or _no_report))
            except Exception as exc:
                results[i] = self._as_error(exc, req)
        for batch in self._batches(ready):
            self._run_batch(batch, results)
        return results

    # -------------------------------------------------------------------------------------------
    # what each family's pipeline gives

    def _prepare(self, index: int, req: SongRequest, report: ProgressCallback):
        """The request checked, its style encoded and its noise drawn: an item of a sampler batch."""
        raise NotImplementedError

    def _batch_key(self, item) -> tuple:
        """Items with equal keys can be sampled as one batch."""
        raise NotImplementedError

    def _sample_and_decode(self, batch: list) -> list[SongResult | Exception]:
        raise NotImplementedError

    def _as_error(self, exc: Exception, req: SongRequest) -> Exception:
        raise NotImplementedError

    # -------------------------------------------------------------------------------------------
    # batching

    def _batches(self, ready: list) -> list[list]:
        groups: dict[tuple, list[list]] = {}
        for item in ready:
            chunks = groups.setdefault(self._batch_key(item), [[]])
            if (
                chunks[-1]
                and sum(x.req.num_takes for x in chunks[-1]) + item.req.num_takes > self.max_batch_takes
            ):
                chunks.append([])
            chunks[-1].append(item)
        return [chunk for chunks in groups.values() for chunk in chunks if chunk]

    def _run_batch(self, batch: list, results: list) -> None:
        try:
            for item, out in zip(batch, self._sample_and_decode(batch), strict=True):
                results[item.index] = out
        except torch.OutOfMemoryError as exc:
            self._free()
            if len(batch) == 1:
                results[batch[0].index] = self._as_error(exc, batch[0].req)
                return
            log.warning("out of memory on a batch of %d requests: running them one at a time", len(batch))
            for item in batch:
                self._run_batch([item], results)

    def _check_fault_oom(self, takes: int) -> None:
        if self.fault_oom_takes is not None and takes > self.fault_oom_takes:
            raise torch.OutOfMemoryError(f"simulated: {takes} takes > fault_oom_takes={self.fault_oom_takes}")

    def _free(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
