"""DiffRhythm 2's pipeline: check inputs -> encode style -> block sampler -> chunked BigVGAN decode ->
stereo. The `Pipeline` interface (generate, generate_many, progress, cancellation, out-of-memory
handling), so the CLI and the service run either family; `Pipeline.from_pretrained` returns this one for
a DiffRhythm 2 model.

Choices (the official script's behaviour where it is not a bug, see musicgen/model/dr2_sampler.py):
- the duration is int(seconds * 5) frames, sampled in whole 10-frame blocks as the official code does,
  decoded in the official chunk layout and cut to the requested length (the official script returns
  the whole last block: a 95 s request gave 96 s);
- the audio is at decoder.json's sampling_rate, `hop` samples (the product of its upsample_rates) a
  latent frame; a decoder whose rate over hop is not the DiT's 5 frames a second is refused at load;
- stereo is the official fake stereo (right = 0.8 x left, 10 ms later) of the decoder's mono; there is
  no normalisation (the decoder clamps to [-1, 1]), as in the official script;
- on the engine (the batched plan), each take's audio is decoded while it is sampled: every block goes
  to the live decoder (`LiveDecode`: a thread of its own on a GPU, between ticks on a CPU), which
  releases the samples no later block can change, to the request's `on_audio` as they come; the
  take's audio is those pieces put together. The other plans decode at the end (and hand `on_audio`
  each take whole);
- takes of one request and requests with the same text length, block count, steps and guidance are
  sampled as one batch; a canceled request leaves its batch at the next step;
- the CFG null branch uses a zero style, as the official code does (DiffRhythm 2 has no negative style).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from musicgen import hub
from musicgen.engine.cache import SlotCache
from musicgen.engine.dr2 import DR2Engine, SongHandle
from musicgen.engine.loop import EngineLoop
from musicgen.errors import CheckpointMismatch, InvalidParameter, ModelNotAvailable, OutOfMemory
from musicgen.model.bigvgan import BigVGAN, DecoderConfig, LiveDecode, LiveStereo, decode_chunked, fake_stereo
from musicgen.model.dr2_dit import COND_DIM, DR2DiT, time_features
from musicgen.model.dr2_sampler import BlockSamplerSettings, block_noise, num_blocks, sample_blocks
from musicgen.model.loading import load_bigvgan, load_dr2
from musicgen.model.style import StyleEncoder, check_prompt
from musicgen.pipelines.base import MAX_TAKES, Pipeline, Progress, ProgressCallback, SongRequest, SongResult
from musicgen.registry import MULAN_REPO, ModelSpec
from musicgen.runtime.device import resolve_device, resolve_dtype
from musicgen.runtime.plans import ExecutionPlan, apply_execution, resolve_execution

log = logging.getLogger(__name__)
# of a GPU's free memory once the model is loaded: the engine's key/value cache budget unless set
ENGINE_CACHE_SHARE = 0.6


def check_decoder_rate(cfg: DecoderConfig, spec: ModelSpec) -> None:
    """The decoder must turn one latent frame into as much audio as the pipeline counts it for: the
    DiT's `spec.frames_per_second` frames a second, each decoded to `cfg.hop` samples (the product of
    decoder.json's upsample_rates) at decoder.json's sampling_rate. Otherwise songs would come out of
    the wrong length; this refuses such a decoder, naming both rates."""
    if cfg.sampling_rate != spec.frames_per_second * cfg.hop:
        raise CheckpointMismatch(
            f"decoder.json does not fit {spec.name}: its sampling_rate {cfg.sampling_rate} over a hop of "
            f"{cfg.hop} samples (the product of its upsample_rates) is {cfg.sampling_rate / cfg.hop:g} "
            f"frames a second, but {spec.name}'s DiT makes {spec.frames_per_second:g} latent frames a second",
            details={"sampling_rate": cfg.sampling_rate, "hop": cfg.hop,
                     "frames_per_second": spec.frames_per_second},
        )  # fmt: skip


def _compile_probe(dit: DR2DiT, device: torch.device):
    """A short forward through the DiT's blocks: what proves a compile at load (see
    musicgen.runtime.compile.compile_or_fall_back)."""

    @torch.inference_mode()
    def probe():
        tokens = torch.zeros(1, 8, dtype=torch.long, device=device)
        dit(dit.text_embed(tokens), time_features(torch.zeros(1, 8, device=device)),
            torch.arange(8, device=device)[None], torch.zeros(1, COND_DIM, device=device))  # fmt: skip

    return probe


@dataclass
class _Item:
    index: int
    req: SongRequest  # its defaults filled in
    report: ProgressCallback
    style: torch.Tensor  # (1, 512)
    frames: int  # requested length in latent frames
    blocks: int
    noise: torch.Tensor  # (takes, blocks, block_size, 64)
    seeds: list[int]
    style_s: float
    t0: float
    error: BaseException | None = None
    live: list[_LiveTake] = field(default_factory=list)  # on the engine: each take's audio so far


class _LiveTake:
    """One take's audio decoded while it is sampled (on the pipeline's decode thread): the pieces
    released so far, each handed to the request's on_audio as it comes."""

    def __init__(self, pipeline: DR2Pipeline, item: _Item, index: int):
        self.decode = LiveDecode(pipeline.decoder, limit_frames=item.frames)
        self.stereo = LiveStereo(pipeline.sample_rate)
        self.on_audio, self.index = item.req.on_audio, index
        self.pieces: list[torch.Tensor] = []  # (2, n) fp32 on the CPU
        self.pending: list[Future] = []

    def add(self, block: torch.Tensor, last: bool, end: int | None) -> None:
        mono = self.decode.finish(block, end) if last else self.decode.push(block)
        if not mono.numel():
            return
        piece = self.stereo.push(mono.cpu())
        self.pieces.append(piece)
        if self.on_audio is not None:
            try:
                self.on_audio(self.index, piece)
            except Exception:  # a listener's failure never fails the song: its live audio stops
                log.warning("the live audio callback of take %d failed; its live audio stops", self.index,
                            exc_info=True)  # fmt: skip
                self.on_audio = None

    def audio(self) -> torch.Tensor:
        for f in self.pending:
            f.result()
        return torch.cat(self.pieces, dim=1) if self.pieces else torch.zeros(2, 0)


class _Inline:
    """An executor that runs each task at once on the caller's thread (its outcome in the future)."""

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:
            future.set_exception(exc)
        return future


def engine_cache_budget(
    device: torch.device, budget_bytes: int | None = None, share: float | None = None
) -> int:
    """Bytes the engine's key/value cache may hold: `budget_bytes` when given, else `share` (default
    ENGINE_CACHE_SHARE) of the GPU's free memory, read once the model is loaded; on a CPU a quarter of
    the machine's memory."""
    if budget_bytes is not None:
        return budget_bytes
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int((ENGINE_CACHE_SHARE if share is None else share) * free)
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4


class DR2Pipeline(Pipeline):
    def __init__(self, spec: ModelSpec, dit: DR2DiT, decoder: BigVGAN, style_encoder: StyleEncoder | None,
                 device: torch.device, plan: ExecutionPlan | None = None):  # fmt: skip
        self.spec, self.dit, self.decoder, self.style_encoder = spec, dit, decoder, style_encoder
        self.device = device
        check_decoder_rate(decoder.cfg, spec)
        self.sample_rate = decoder.cfg.sampling_rate  # decoder.json's: the audio's rate
        self.plan = plan if plan is not None else ExecutionPlan.resolve("auto", device, spec.family)
        self.round_pass_time = True  # the official fp16 +-1 time features (see BlockSamplerSettings)
        self._loop: EngineLoop | None = None
        self._loop_lock = threading.Lock()
        self._live_decoder: ThreadPoolExecutor | _Inline | None = None  # decodes the engine's blocks

    @property
    def continuous(self) -> bool:
        """The batched plan runs on the engine (musicgen.engine): takes of any text length, length,
        step count and guidance sample together, and a request joins those running at the next tick,
        whichever thread calls generate; the graphs plan too, its ticks CUDA graphs (DR2Engine's
        `graphs`). The sequential plan runs sample_blocks per batch."""
        return self.spec.family.execution.engine and self.plan.batched

    def cache_budget(self) -> int:
        """Bytes the engine's key/value cache may hold (see `engine_cache_budget`)."""
        return engine_cache_budget(self.device, self.engine_budget_bytes, self.engine_cache_share)

    def engine_loop(self) -> EngineLoop:
        """The engine thread every generate call of this pipeline shares (started at the first)."""
        with self._loop_lock:
            if self._loop is None:
                budget = self.cache_budget()
                if self.engine_budget_bytes is not None and self.device.type == "cuda":
                    free, _ = torch.cuda.mem_get_info(self.device)
                    if budget > free:  # the cache grows as takes join: it would run out of memory
                        log.warning(
                            "the engine's cache budget (%.1f GiB) is more than the GPU's free memory "
                            "(%.1f GiB): songs may fail with OUT_OF_MEMORY as the cache fills it",
                            budget / 2**30, free / 2**30,
                        )  # fmt: skip
                self._loop = EngineLoop(
                    lambda: DR2Engine(
                        self.dit,
                        device=self.device,
                        memory_budget_bytes=budget,
                        round_pass_time=self.round_pass_time,
                        graphs=self.plan.cuda_graph,
                    )  # fmt: skip
                )
            return self._loop

    def live_decoder(self) -> ThreadPoolExecutor | _Inline:
        """What decodes the engine's finished blocks, in order: on a GPU one thread of its own, so that
        sampling never waits for audio; on a CPU the engine's thread itself, between ticks (both would
        share the same cores, and two threads computing at once make the floats of a seed differ from
        one run to the next by thread scheduling, ~1e-6)."""
        with self._loop_lock:
            if self._live_decoder is None:
                self._live_decoder = (
                    ThreadPoolExecutor(1, thread_name_prefix="dr2-live-decode")
                    if self.device.type == "cuda"
                    else _Inline()
                )
            return self._live_decoder

    def load(self) -> dict[str, int]:
        """Takes running and waiting on the engine and the cache bytes it holds (zeros before it starts),
        with what a server needs to refuse a song that could never fit: the cache budget, the bytes of
        one token of one guidance branch and the block size (see musicgen.engine.cache_bytes_alone)."""
        loop = self._loop
        held = loop.load() if loop is not None else {"running": 0, "waiting": 0, "cache_bytes": 0}
        cfg = self.dit.cfg
        token_bytes = SlotCache(
            cfg.depth, cfg.heads, cfg.head_dim, dtype=self.dit.dtype, device=self.device
        ).bytes_per_token
        budget = loop.engine.memory_budget_bytes if loop is not None else self.cache_budget()
        return {**held, "budget_bytes": budget or 0, "token_bytes": token_bytes, "block_size": cfg.block_size}

    @classmethod
    def _load(
        cls, spec: ModelSpec, *, device: str, dtype: str, download: bool, with_style_encoder: bool,
        plan: str, compile: str,
    ) -> DR2Pipeline:  # fmt: skip
        """See `Pipeline.from_pretrained`; what `plan` and `compile` mean for DiffRhythm 2:
        musicgen/runtime/plans.py."""
        dev = resolve_device(device)
        dt = resolve_dtype(dev, dtype)
        execution = resolve_execution(spec.family, dev, dt, plan=plan, compile=compile)
        if spec.untrained:
            paths = spec.family.build_tiny(hub.cache_dir() / spec.name)
            folder, mulan_source = paths["folder"], str(paths["mulan"])
        else:
            if not download or hub.hub_offline():
                hub.check_cached(spec)
            files = [hub.hub_file(repo, f, download=download, pull_target=spec.name)
                     for repo, f in spec.files["checkpoint"]]  # fmt: skip
            folder, mulan_source = Path(files[0]).parent, MULAN_REPO
        dit = load_dr2(folder, device=dev, dtype=dt)
        apply_execution(dit, execution, _compile_probe(dit, dev))
        decoder = load_bigvgan(folder, device=dev, dtype=dt)
        style = (
            StyleEncoder.from_pretrained(mulan_source, dev, cache_dir=hub.cache_dir(), download=download)
            if with_style_encoder
            else None
        )
        return cls(spec, dit, decoder, style, dev, execution.plan)

    # -- stages ------------------------------------------------------------------------------------

    def check_inputs(self, req: SongRequest) -> None:
        req = self.with_defaults(req)
        if req.tokens.ndim != 1:
            raise InvalidParameter(f"tokens must be a 1-d sequence, got shape {tuple(req.tokens.shape)}")
        vocab = self.dit.cfg.text_num_embeds
        if req.tokens.numel() and not 0 <= int(req.tokens.min()) <= int(req.tokens.max()) <= vocab:
            raise InvalidParameter(f"token ids must be in 0..{vocab}")
        if req.duration_s is None:
            raise InvalidParameter("a DiffRhythm 2 song needs its duration", recovery="pass duration_s")
        self.spec.check_duration(req.duration_s)
        self.spec.check_generation(steps=req.steps, edit=req.edit is not None)
        if not 1 <= req.num_takes <= MAX_TAKES:
            raise InvalidParameter(f"num_takes must be 1..{MAX_TAKES}")
        if req.style_embedding is None and req.reference_audio is None:
            check_prompt(req.style_prompt)
        if self.style_encoder is None and req.style_embedding is None:
            raise ModelNotAvailable("this pipeline was loaded without its style encoder")

    def _prepare(self, index: int, req: SongRequest, report: ProgressCallback) -> _Item:
        self.check_inputs(req)
        t0 = time.perf_counter()
        report(Progress("encoding_style", 0.0))
        style = self.encode_style(req)
        frames = self.spec.frames_for(req.duration_s)
        bs = self.dit.cfg.block_size
        blocks = num_blocks(frames, bs)
        seeds = [req.seed + k for k in range(req.num_takes)]
        noise = torch.stack([block_noise(s, blocks, bs, self.dit.cfg.mel_dim) for s in seeds])
        return _Item(index, req, report, style, frames, blocks, noise, seeds, time.perf_counter() - t0, t0)

    def _batch_key(self, item: _Item) -> tuple:
        if self.continuous:  # the engine samples any takes together
            return ()
        r = item.req
        return r.tokens.shape[0], item.blocks, r.steps, float(r.cfg_strength)

    def _as_error(self, exc: Exception, req: SongRequest) -> Exception:
        if isinstance(exc, torch.OutOfMemoryError):
            return OutOfMemory(f"out of memory generating {req.num_takes} take(s) of {req.duration_s:g} s")
        return exc

    def _sample_and_decode(self, batch: list[_Item]) -> list[SongResult | Exception]:
        takes = sum(i.req.num_takes for i in batch)
        self._check_fault_oom(takes)
        rows_of: list[list[int]] = []
        for item in batch:
            start = sum(len(r) for r in rows_of)
            rows_of.append(list(range(start, start + item.req.num_takes)))
        owner = {row: j for j, rows in enumerate(rows_of) for row in rows}
        t1 = time.perf_counter()
        streams = (
            self._sample_on_engine(batch, rows_of) if self.continuous else self._sample_grouped(batch, owner)
        )
        self._sync()
        sampling_s = time.perf_counter() - t1
        outs: list[SongResult | Exception] = []
        for j, item in enumerate(batch):
            if item.error is not None:
                outs.append(item.error)
                continue
            try:
                item.report(Progress("decoding", 0.0))
            except Exception as exc:
                outs.append(exc)
                continue
            t2 = time.perf_counter()
            rows = [streams[r] for r in rows_of[j]]
            try:
                audio = self._take_audio(item, rows)
            except Exception as exc:
                outs.append(self._as_error(exc, item.req))
                continue
            self._sync()
            latents = torch.nn.utils.rnn.pad_sequence([r.float().cpu() for r in rows], batch_first=True)
            timings = {
                "style_s": item.style_s, "sampling_s": sampling_s, "decoding_s": time.perf_counter() - t2,
                "total_s": time.perf_counter() - item.t0, "batch_requests": len(batch), "batch_takes": takes,
            }  # fmt: skip
            result = SongResult(audio=audio, latents=latents, seeds=item.seeds, sample_rate=self.sample_rate,
                                timings=timings)  # fmt: skip
            try:
                item.report(Progress("decoding", 1.0))
                outs.append(result)
            except Exception as exc:
                outs.append(exc)
        return outs

    def _take_audio(self, item: _Item, rows: list[torch.Tensor]) -> torch.Tensor:
        """(takes, 2, samples) on the CPU: on the engine, the pieces its decode thread released (waited
        for); else each take decoded now (and handed whole to on_audio)."""
        if item.live:
            takes = [live.audio() for live in item.live]
            return torch.nn.utils.rnn.pad_sequence([a.T for a in takes], batch_first=True).transpose(1, 2)
        hop = self.decoder.cfg.hop
        lengths = {r.shape[0] for r in rows}
        if len(lengths) == 1:
            mono = decode_chunked(self.decoder, torch.stack(rows))
        else:  # an end of song came at different frames in different takes
            mono = torch.nn.utils.rnn.pad_sequence(
                [decode_chunked(self.decoder, r[None])[0] for r in rows], batch_first=True
            )
        mono = mono[:, : item.frames * hop]  # the requested length (the sampler fills whole blocks)
        audio = fake_stereo(mono, self.sample_rate).cpu()
        if item.req.on_audio is not None:
            for k, take in enumerate(audio):
                item.req.on_audio(k, take)
        return audio

    def _sample_grouped(self, batch: list[_Item], owner: dict[int, int]) -> list[torch.Tensor | None]:
        """One sample_blocks call over the batch's rows (their text length, blocks, steps and guidance
        are equal: `_batch_key`)."""
        text = torch.cat([item.req.tokens[None].long().repeat(item.req.num_takes, 1) for item in batch]).to(
            self.device
        )
        style = torch.cat([item.style.reshape(1, -1).repeat(item.req.num_takes, 1) for item in batch])
        noise = torch.cat([item.noise for item in batch])
        first = batch[0].req
        settings = BlockSamplerSettings(first.steps, first.cfg_strength, self.round_pass_time)
        total = batch[0].blocks * (settings.steps - 1)

        def prune(blk: int, k: int, alive: list[int]) -> list[int] | None:
            done = blk * (settings.steps - 1) + k
            for j, item in enumerate(batch):
                if item.error is None and any(owner[r] == j for r in alive):
                    try:
                        item.report(Progress("sampling", done / total, done, total))
                    except Exception as exc:  # canceled or timed out: this request leaves the batch
                        item.error = exc
            keep = [r for r in alive if batch[owner[r]].error is None]
            return keep if keep != alive else None

        return sample_blocks(
            self.dit, text, style, noise, settings, prune=prune, batch_branches=self.plan.batched
        )

    def _sample_on_engine(self, batch: list[_Item], rows_of: list[list[int]]) -> list[torch.Tensor | None]:
        """Each take submitted to the shared engine; returns when this batch's takes are done. Progress
        is reported per block; a report that raises (canceled, timed out) cancels the request's takes."""
        loop, decoder = self.engine_loop(), self.live_decoder()
        handles: list[list[SongHandle]] = []
        for item in batch:
            settings = BlockSamplerSettings(item.req.steps, item.req.cfg_strength, self.round_pass_time)
            mine: list[SongHandle] = []
            handles.append(mine)
            item.live = [_LiveTake(self, item, k) for k in range(item.req.num_takes)]

            def on_block(h, _blk, x, live, item=item, mine=mine, per_block=settings.steps - 1) -> None:
                live.pending.append(decoder.submit(live.add, x, h.done, h.end))
                if item.error is not None:
                    return
                total = item.blocks * per_block
                done = min(h.blocks_done for h in mine) * per_block
                try:
                    item.report(Progress("sampling", done / total, done, total))
                except Exception as exc:  # canceled or timed out: this request's takes leave the engine
                    item.error = exc
                    for h in mine:
                        h.cancel()

            try:
                item.report(Progress("sampling", 0.0, 0, item.blocks * (settings.steps - 1)))
                for k in range(item.req.num_takes):
                    mine.append(loop.submit(item.req.tokens.long(), item.style.reshape(-1), item.noise[k],
                                            settings, functools.partial(on_block, live=item.live[k])))  # fmt: skip
            except Exception as exc:  # canceled already, or refused (too big for the cache budget alone)
                item.error = exc
                for h in mine:
                    h.cancel()
        loop.wait([h for mine in handles for h in mine])
        streams: list[torch.Tensor | None] = [None] * sum(len(rows) for rows in rows_of)
        for item, rows, mine in zip(batch, rows_of, handles, strict=True):
            for row, handle in zip(rows, mine, strict=False):
                failed = loop.error(handle)
                if failed is not None and item.error is None:
                    item.error = self._as_error(failed, item.req)
                if handle.done:
                    streams[row] = handle.result()
        return streams
