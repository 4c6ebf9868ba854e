"""The song pipeline: check inputs -> encode style -> prepare latents -> sample -> decode.

`SongPipeline.from_pretrained(name)` resolves a model from the registry, fetches what is missing
(unless offline), loads every file strictly and keeps the modules on one device. `generate()` takes
frame-aligned lyric tokens (see `musicgen.lyrics`) and returns audio for every take.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from musicgen import hub
from musicgen.audio import read_audio, resample
from musicgen.errors import InvalidParameter, ModelNotAvailable, OutOfMemory
from musicgen.model.dit import COND_DIM, DiT
from musicgen.model.loading import load_dit, load_vae
from musicgen.model.sampler import SamplerSettings, SongConditions, sample_many, take_noise
from musicgen.model.style import StyleEncoder, load_negative_style
from musicgen.model.vae import SongVAE, peak_normalize, posterior_sample
from musicgen.registry import (
    LATENT_HOP,
    MULAN_REPO,
    SAMPLE_RATE,
    VAE_FILE,
    VAE_REPO,
    ModelSpec,
    get_model_spec,
)
from musicgen.runtime.device import resolve_device, resolve_dtype
from musicgen.runtime.plans import ExecutionPlan, apply_execution, resolve_execution

log = logging.getLogger(__name__)


def _compile_probe(dit: DiT, device: torch.device):
    """A short forward through the DiT's blocks: what proves a compile at load (see
    musicgen.runtime.compile.compile_or_fall_back)."""

    @torch.inference_mode()
    def probe():
        frames = 32
        pre = dit.prepare(
            torch.zeros(1, frames, dit.cfg.mel_dim, device=device),
            dit.null_text_embedding(frames, device),
            torch.zeros(1, COND_DIM, device=device),
            torch.zeros(1, device=device),
            torch.ones(1, device=device) if dit.duration_time_embed is not None else None,
        )
        dit.velocity(
            torch.zeros(1, frames, dit.cfg.mel_dim, device=device), torch.tensor(0.5, device=device), pre
        )

    return probe


MAX_TAKES = 4
MAX_SEED = 2**63 - 1 - MAX_TAKES


@dataclass(frozen=True)
class Progress:
    stage: str  # "encoding_style" | "sampling" | "decoding"
    fraction: float  # of this stage, 0..1
    step: int = 0
    total: int = 0


ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class EditSpec:
    """Regenerate `segments` (seconds; -1 means the song's start or end) of an existing song."""

    source_audio: Path
    segments: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class SongRequest:
    tokens: torch.Tensor  # (frames,) frame-aligned model token ids (0 = filler)
    song_duration: float  # frames / max_frames, as the official get_lrc_token returns it
    style_prompt: str | None = None
    reference_audio: Path | None = None
    style_embedding: torch.Tensor | None = None  # (1, 512), e.g. from a cache; wins over the two above
    seed: int = 0
    num_takes: int = 1
    steps: int = 31
    cfg_strength: float = 4.0
    edit: EditSpec | None = None
    duration_s: float | None = None  # DiffRhythm 2 (its tokens are not frame-aligned): the song's length


def encode_style(encoder: StyleEncoder | None, req: SongRequest) -> torch.Tensor:
    """(1, 512): the request's own embedding, else its reference clip's or its text prompt's."""
    if req.style_embedding is not None:
        return req.style_embedding.float().reshape(1, -1)
    if req.reference_audio is not None:
        return encoder.embed_audio_file(req.reference_audio)
    return encoder.embed_text(req.style_prompt)


@dataclass
class SongResult:
    audio: torch.Tensor  # (takes, 2, samples) fp32 in [-1, 1], peak-normalised per take
    latents: torch.Tensor  # (takes, frames, 64)
    seeds: list[int]
    sample_rate: int = SAMPLE_RATE
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.audio.shape[-1] / self.sample_rate


def edit_mask(segments, frames: int, max_frames: int) -> torch.Tensor:
    """(frames,) bool, True on the frames to regenerate (official rounding: int(s * 44100 / 2048))."""
    mask = torch.zeros(frames, dtype=torch.bool)
    for start, end in segments:
        sf = 0 if start == -1 else int(start * SAMPLE_RATE / LATENT_HOP)
        ef = max_frames if end == -1 else int(end * SAMPLE_RATE / LATENT_HOP)
        if (start != -1 and start < 0) or (end != -1 and end < 0) or sf >= ef:
            raise InvalidParameter(
                f"edit segment [{start}, {end}] is empty or negative",
                recovery="give segments as [start, end] seconds with start < end (-1 for the song's start/end)",
            )
        mask[sf:ef] = True
    return mask


def _no_report(progress: Progress) -> None:
    pass


@dataclass
class _Prepared:
    """A request with its conditions and noise, ready to join a sampler batch."""

    index: int
    req: SongRequest
    report: ProgressCallback
    cond: SongConditions
    noise: torch.Tensor
    settings: SamplerSettings
    seeds: list[int]
    style_s: float
    t0: float


class BatchedGeneration:
    """What both generations' pipelines share: `generate` / `generate_many` prepare each request (a
    bad one fails alone), group the compatible ones (equal `_batch_key`) into batches of at most
    `max_batch_takes` takes, and run each batch; a batch that runs out of memory is retried one request
    at a time, and a single request that does gets `OutOfMemory`. Subclasses give `_prepare`,
    `_batch_key`, `_sample_and_decode` and `_as_error`; prepared items carry `index`, `req`."""

    max_batch_takes = 8  # takes sampled together at most (memory grows with takes x frames)
    # Testing aid for the out-of-memory paths without filling a device: a batch of more takes than
    # this fails as a full device would
    fault_oom_takes: int | None = None
    device: torch.device

    def generate(self, req: SongRequest, progress: ProgressCallback | None = None) -> SongResult:
        (out,) = self.generate_many([req], [progress])
        if isinstance(out, BaseException):
            raise out
        return out

    def generate_many(
        self, reqs: list[SongRequest], progress: list[ProgressCallback | None] | None = None
    ) -> list[SongResult | Exception]:
        """Generate several songs; compatible requests run as one sampler batch (and one decoder batch).
        Returns per request its result or the exception that ended it, so that one bad, canceled or
        timed-out request never costs the others theirs."""
        reports = list(progress) if progress is not None else [None] * len(reqs)
        results: list[SongResult | Exception | None] = [None] * len(reqs)
        ready = []
        for i, req in enumerate(reqs):
            try:
                ready.append(self._prepare(i, req, reports[i] or _no_report))
            except Exception as exc:
                results[i] = self._as_error(exc, req)
        for batch in self._batches(ready):
            self._run_batch(batch, results)
        return results

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


class SongPipeline(BatchedGeneration):
    def __init__(
        self,
        spec: ModelSpec,
        dit: DiT,
        vae: SongVAE,
        style_encoder: StyleEncoder | None,
        negative_style: torch.Tensor,
        device: torch.device,
        plan: ExecutionPlan | None = None,
    ):
        self.spec, self.dit, self.vae, self.style_encoder = spec, dit, vae, style_encoder
        self.negative_style = negative_style
        self.device = device
        self.plan = plan if plan is not None else ExecutionPlan.resolve("auto", device)

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
    ) -> BatchedGeneration:
        """The pipeline of model `name`: this class for DiffRhythm 1, `DR2Pipeline` for DiffRhythm 2 (the
        same interface). `plan`: how a sampling step's rows run (see `ExecutionPlan`: auto, batched, sequential,
        parallel, graphs). `compile`: `torch.compile` the DiT's blocks: on, off, or auto = on CUDA only, where it
        is measured faster (a probe compiles at load, the first song once more with dynamic shapes).
        What each value means per model family: musicgen/runtime/plans.py."""
        spec = get_model_spec(name)
        if spec.family == "dr2":  # the same interface
            from musicgen.dr2_pipeline import DR2Pipeline

            return DR2Pipeline.from_pretrained(
                name, device=device, dtype=dtype, download=download, with_style_encoder=with_style_encoder,
                plan=plan, compile=compile,
            )  # fmt: skip
        dev = resolve_device(device)
        dt = resolve_dtype(dev, dtype)
        execution = resolve_execution("dr1", dev, dt, plan=plan, compile=compile)
        if spec.untrained:
            from musicgen.tiny import ensure_tiny_model

            paths = ensure_tiny_model(hub.cache_dir() / spec.name)
            dit_path, vae_path, mulan_source = paths["dit"], paths["vae"], str(paths["mulan"])
            negative_path = paths["negative"]
        else:
            if not download or hub.hub_offline():
                hub.check_cached(spec)
            dit_path = hub.hub_file(spec.repo_id, spec.checkpoint_file, download=download, pull_target=name)
            vae_path = hub.hub_file(VAE_REPO, VAE_FILE, download=download, pull_target=name)
            mulan_source = MULAN_REPO
            negative_path = hub.asset_path("negative_style_vocal.npy", download=download)
        negative = load_negative_style(negative_path)
        dit = load_dit(dit_path, spec.dit, device=dev, dtype=dt, model_name=name)
        apply_execution(dit, execution, _compile_probe(dit, dev))
        vae = load_vae(vae_path, device=dev)
        style = (
            StyleEncoder.from_pretrained(mulan_source, dev, cache_dir=hub.cache_dir(), download=download)
            if with_style_encoder
            else None
        )
        return cls(spec, dit, vae, style, negative, dev, execution.plan)

    # -------------------------------------------------------------------------------------------
    # stages

    def check_inputs(self, req: SongRequest) -> None:
        frames = req.tokens.shape[-1]
        if req.tokens.ndim != 1 or not 1 <= frames <= self.spec.max_frames:
            raise InvalidParameter(
                f"tokens must be a 1-d sequence of 1..{self.spec.max_frames} frames, got shape {tuple(req.tokens.shape)}"
            )
        vocab = self.spec.dit.text_num_embeds
        if int(req.tokens.min()) < 0 or int(req.tokens.max()) > vocab:
            raise InvalidParameter(f"token ids must be in 0..{vocab}")
        if not 1 <= req.num_takes <= MAX_TAKES:
            raise InvalidParameter(
                f"num_takes must be 1..{MAX_TAKES}, got {req.num_takes}",
                recovery=f"ask for at most {MAX_TAKES} takes per song",
                details={"parameter": "num_takes", "value": req.num_takes},
            )
        if not 0 <= req.seed <= MAX_SEED:
            raise InvalidParameter(
                f"seed must be in 0..{MAX_SEED}", details={"parameter": "seed", "value": req.seed}
            )
        if not 0 < req.song_duration <= 1:
            raise InvalidParameter(f"song_duration must be in (0, 1], got {req.song_duration}")
        try:
            SamplerSettings(req.steps, req.cfg_strength)
        except ValueError as exc:
            raise InvalidParameter(str(exc), recovery="use steps 1..1000 and cfg_strength 0..50") from None
        given = sum(x is not None for x in (req.style_prompt, req.reference_audio, req.style_embedding))
        if given == 0:
            raise InvalidParameter(
                "no style given", recovery="give a style prompt or a reference audio clip of at least 10 s"
            )
        if req.style_embedding is None and self.style_encoder is None:
            raise ModelNotAvailable("this pipeline was loaded without its style encoder")

    def encode_style(self, req: SongRequest) -> torch.Tensor:
        return encode_style(self.style_encoder, req)

    def latent_prompt(self, edit: EditSpec, frames: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, frames, 64) latents of the song to edit and the (frames,) mask of frames to regenerate."""
        audio, sr = read_audio(edit.source_audio)
        audio = resample(audio, sr, SAMPLE_RATE)
        audio = audio[:2] if audio.shape[0] >= 2 else audio.repeat(2, 1)
        peak = audio.abs().max()
        if peak > 0:  # official: peak-normalise to -6 dBFS before encoding
            audio = audio * (10 ** (-6 / 20) / peak)
        src_frames = min(audio.shape[-1] // LATENT_HOP, frames)
        if src_frames < 1:
            raise InvalidParameter("the song to edit is shorter than one latent frame (46 ms)")
        moments = self.vae.encode(audio[None, :, : src_frames * LATENT_HOP])
        latents = posterior_sample(moments.cpu(), torch.Generator().manual_seed(seed))
        prompt = torch.zeros(1, frames, latents.shape[-1])
        prompt[:, :src_frames] = latents
        mask = edit_mask(edit.segments, frames, self.spec.max_frames)
        mask[src_frames:] = True  # past the end of the source there is nothing to keep
        return prompt, mask

    def _prepare(self, index: int, req: SongRequest, report: ProgressCallback) -> _Prepared:
        self.check_inputs(req)
        t0 = time.perf_counter()
        try:
            report(Progress("encoding_style", 0.0))
            style = self.encode_style(req)
            frames = req.tokens.shape[0]
            prompt = mask = None
            if req.edit is not None:
                prompt, mask = self.latent_prompt(req.edit, frames, req.seed)
        except torch.OutOfMemoryError:
            self._free()
            raise
        cond = SongConditions(
            text=req.tokens[None].long(),
            style=style,
            negative_style=self.negative_style,
            song_duration=torch.tensor([req.song_duration], dtype=torch.float32),
            latent_prompt=prompt,
            generate_mask=mask,
        )
        seeds = [req.seed + i for i in range(req.num_takes)]
        return _Prepared(
            index, req, report, cond, take_noise(seeds, frames, self.spec.dit.mel_dim),
            SamplerSettings(req.steps, req.cfg_strength), seeds, time.perf_counter() - t0, t0,
        )  # fmt: skip

    def _as_error(self, exc: Exception, req: SongRequest) -> Exception:
        if isinstance(exc, torch.OutOfMemoryError):
            return OutOfMemory(
                f"out of memory generating {req.num_takes} take(s) of {req.tokens.shape[0]} frames"
            )
        return exc

    def _batch_key(self, item: _Prepared) -> tuple:
        return item.cond.frames, item.settings.steps

    def _sample_and_decode(self, batch: list[_Prepared]) -> list[SongResult | Exception]:
        takes = sum(item.req.num_takes for item in batch)
        self._check_fault_oom(takes)

        def on_step(item: _Prepared):
            return lambda k, n: item.report(Progress("sampling", k / n, k, n))

        t1 = time.perf_counter()
        latents = sample_many(
            self.dit, [i.cond for i in batch], [i.noise for i in batch], [i.settings for i in batch],
            [on_step(i) for i in batch], plan=self.plan,
        )  # fmt: skip
        self._sync()
        sampling_s = time.perf_counter() - t1
        outs: list[SongResult | Exception] = list(latents)
        alive = []
        for j, item in enumerate(batch):
            if isinstance(outs[j], torch.Tensor):
                try:
                    item.report(Progress("decoding", 0.0))
                    alive.append(j)
                except Exception as exc:  # canceled or timed out between sampling and decoding
                    outs[j] = exc
        if not alive:
            return outs
        t2 = time.perf_counter()
        audio = peak_normalize(self.vae.decode(torch.cat([outs[j] for j in alive]))).cpu()
        self._sync()
        decoding_s = time.perf_counter() - t2
        offset = 0
        for j in alive:
            item, lat = batch[j], outs[j]
            k = lat.shape[0]
            timings = {
                "style_s": item.style_s, "sampling_s": sampling_s, "decoding_s": decoding_s,
                "total_s": time.perf_counter() - item.t0, "batch_requests": len(batch), "batch_takes": takes,
            }  # fmt: skip
            outs[j] = SongResult(
                audio=audio[offset : offset + k], latents=lat.cpu(), seeds=item.seeds, timings=timings
            )
            offset += k
            try:
                item.report(Progress("decoding", 1.0))
            except Exception as exc:
                outs[j] = exc
        return outs
