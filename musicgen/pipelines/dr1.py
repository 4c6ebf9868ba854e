"""DiffRhythm 1's pipeline: check inputs -> encode style -> prepare latents -> sample -> decode.

The lyrics front end places the lyrics frame by frame (`musicgen.lyrics.timed`); the sampler integrates
the whole song at once (`musicgen.model.sampler`) and the VAE decodes it to 44.1 kHz stereo. An edit
regenerates segments of an existing song, keeping the rest of its latents.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from musicgen import hub
from musicgen.audio import read_audio, resample
from musicgen.errors import InvalidParameter, ModelNotAvailable, OutOfMemory
from musicgen.model.dit import COND_DIM, DiT
from musicgen.model.loading import load_dit, load_vae
from musicgen.model.sampler import SamplerSettings, SongConditions, sample_many, take_noise
from musicgen.model.style import StyleEncoder, load_negative_style
from musicgen.model.vae import LATENT_HOP, SAMPLE_RATE, SongVAE, peak_normalize, posterior_sample
from musicgen.pipelines.base import MAX_SEED, MAX_TAKES, Pipeline, Progress, SongResult
from musicgen.registry import MULAN_REPO, ModelSpec
from musicgen.runtime.device import resolve_device, resolve_dtype
from musicgen.runtime.plans import ExecutionPlan, apply_execution, resolve_execution

if TYPE_CHECKING:
    from musicgen.pipelines.base import EditSpec, ProgressCallback, SongRequest

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


@dataclass
class _Prepared:
    """A request (its defaults filled in) with its conditions and noise, ready to join a sampler batch."""

    index: int
    req: SongRequest
    report: ProgressCallback
    cond: SongConditions
    noise: torch.Tensor
    settings: SamplerSettings
    seeds: list[int]
    style_s: float
    t0: float


class DR1Pipeline(Pipeline):
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
        self.plan = plan if plan is not None else ExecutionPlan.resolve("auto", device, spec.family)

    # -------------------------------------------------------------------------------------------
    # loading

    @classmethod
    def _load(
        cls, spec: ModelSpec, *, device: str, dtype: str, download: bool, with_style_encoder: bool,
        plan: str, compile: str,
    ) -> DR1Pipeline:  # fmt: skip
        """See `Pipeline.from_pretrained`; what `plan` and `compile` mean for DiffRhythm 1:
        musicgen/runtime/plans.py (compile auto is on CUDA only, where it is measured faster: a probe
        compiles at load, the first song once more with dynamic shapes)."""
        dev = resolve_device(device)
        dt = resolve_dtype(dev, dtype)
        execution = resolve_execution(spec.family, dev, dt, plan=plan, compile=compile)
        if spec.untrained:
            paths = spec.family.build_tiny(hub.cache_dir() / spec.name)
            dit_path, vae_path, mulan_source = paths["dit"], paths["vae"], str(paths["mulan"])
            negative_path = paths["negative"]
        else:
            if not download or hub.hub_offline():
                hub.check_cached(spec)
            files = spec.files  # one checkpoint, one VAE
            dit_path = hub.hub_file(*files["checkpoint"][0], download=download, pull_target=spec.name)
            vae_path = hub.hub_file(*files["vae"][0], download=download, pull_target=spec.name)
            mulan_source = MULAN_REPO
            (negative_file,) = spec.family.assets  # the null branch's style
            negative_path = hub.asset_path(negative_file, download=download)
        negative = load_negative_style(negative_path)
        dit = load_dit(dit_path, spec.dit, device=dev, dtype=dt, model_name=spec.name)
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
        req = self.with_defaults(req)
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
                audio=audio[offset : offset + k], latents=lat.cpu(), seeds=item.seeds,
                sample_rate=self.spec.sample_rate, timings=timings,
            )  # fmt: skip
            offset += k
            try:
                item.report(Progress("decoding", 1.0))
            except Exception as exc:
                outs[j] = exc
        return outs
