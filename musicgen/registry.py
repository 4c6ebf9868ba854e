"""The official DiffRhythm models, grouped by family, and everything that differs between them.

A model family (`ModelFamily`: `DR1` for DiffRhythm 1, `DR2` for DiffRhythm 2) says once what its models
share: the pipeline that runs them, how their lyrics are encoded, their sampling defaults, their limits,
the files they need and the tiny seeded stand-in built for tests and demos. A model (`ModelSpec`) adds
its own numbers (repository, durations, window, per-model lyric flags). Code outside this module asks a
spec or its family and never branches on which family it is.

Pipelines, lyrics encoders and tiny builders are named here as "module:attribute" strings and imported
when first asked for: they import this module, so it imports none of them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from musicgen.errors import InvalidParameter
from musicgen.model.dit import DiTConfig
from musicgen.model.dr2_sampler import BlockSamplerSettings
from musicgen.model.loading import DIT_FILE, DR2_DIT_FILES, DR2_FILES, VAE_FILE
from musicgen.model.sampler import SamplerSettings
from musicgen.model.vae import FRAMES_PER_SECOND, SAMPLE_RATE

# DiffRhythm 2: 5 latent frames a second, decoded by BigVGAN to 48 kHz (9600 samples a frame). The
# sample rate is what the model card says, for help texts and limits before a model is loaded; a loaded
# pipeline's audio is at its decoder.json's sampling_rate (DR2Pipeline.sample_rate), and a decoder whose
# rate does not make these 5 frames a second is refused (musicgen.pipelines.dr2.check_decoder_rate).
DR2_FRAMES_PER_SECOND = 5
DR2_SAMPLE_RATE = 48_000
DR2_REPO = "ASLP-lab/DiffRhythm2"

VAE_REPO = "ASLP-lab/DiffRhythm-vae"
MULAN_REPO = "OpenMuQ/MuQ-MuLan-large"

# config/diffrhythm-1b.json of the official repository (the "heads" there is not used: see DiTConfig)
DIFFRHYTHM_1B = dict(
    dim=2048, depth=16, ff_mult=4, text_dim=512, conv_layers=4, mel_dim=64, text_num_embeds=363
)


def _resolve(target: str) -> Any:
    """The attribute named by "module:attribute", imported now."""
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class Defaults:
    """Sampling settings when a request gives none: the official inference defaults."""

    steps: int
    cfg_strength: float

    @classmethod
    def of(cls, settings: type[SamplerSettings] | type[BlockSamplerSettings]) -> Defaults:
        """The defaults of a sampler's settings (which are the official ones)."""
        default = settings()
        return cls(default.steps, default.cfg_strength)


@dataclass(frozen=True)
class Limits:
    min_steps: int  # sampling steps at the least
    frames_per_second: float  # latent frames per second of audio
    sample_rate: int  # of the audio, as the model card says (a loaded DiffRhythm 2 uses decoder.json's)


@dataclass(frozen=True)
class LyricsRules:
    timed: bool  # LRC timestamps place the lines (else section tags guide the model, no timing)
    encoder: str  # "module:function" of (front end, lyrics, spec, seconds) -> LyricsFrames


@dataclass(frozen=True)
class ExecutionRules:
    """How a family's models may run: the plans and compile settings mean this for it
    (musicgen/runtime/plans.py applies the rules; its table says what each plan does)."""

    plans: tuple[str, ...]  # the plans it has besides auto
    auto_plan: tuple[tuple[str, str], ...]  # (device type, plan) that auto picks; other devices: batched
    experimental_plans: tuple[str, ...] = ()  # offered, but not proven equal to eager (a warning says so)
    compile_auto: tuple[str, ...] = ()  # device types where compile auto is on (measured faster there)
    compile_target: str | None = None  # what compile compiles of each transformer block (None: all of it)
    fast_paths: bool = False  # fused projections and packed weights on the CPU
    # the batched plan runs on a continuous-batching engine (musicgen.engine): a server runs each job
    # as it comes, many at once, instead of gathering batches
    engine: bool = False


@dataclass(frozen=True, eq=False)
class ModelFamily:
    """What the models of one family share. One subclass (its rules) and one instance (its numbers) per
    family; compared and hashed by identity."""

    name: str  # short key, as in FAMILIES
    title: str  # for people: "DiffRhythm 1"
    pipeline: str  # "module:Class" of its `Pipeline` subclass
    lyrics: LyricsRules
    defaults: Defaults
    limits: Limits
    edits: bool  # can regenerate segments of an existing song
    # writes a song left to right with final blocks on the way: its audio can be heard while sampled
    # (SongRequest.on_audio); a whole-song sampler has nothing final before the end
    live_audio: bool
    execution: ExecutionRules
    assets: tuple[str, ...]  # data files of the official repository it needs (names in hub.ASSETS)
    tiny_builder: str  # "module:function" building the tiny model's files under a folder: (root) -> paths

    def max_frames(self, spec: ModelSpec) -> int:
        raise NotImplementedError

    def frames_for(self, spec: ModelSpec, seconds: float) -> int:
        """Latent frames generated for a song of `seconds` (already checked against the spec's range)."""
        raise NotImplementedError

    def files(self, spec: ModelSpec) -> dict[str, list[tuple[str, str]]]:
        """(repository, file name) of every hub file a model needs besides the style encoder, by kind."""
        raise NotImplementedError

    def pipeline_class(self) -> type:
        return _resolve(self.pipeline)

    def encode_lyrics(self, front: Any, lyrics: str, spec: ModelSpec, seconds: float) -> Any:
        return _resolve(self.lyrics.encoder)(front, lyrics, spec, seconds)

    def build_tiny(self, root: Path) -> dict[str, Path]:
        return _resolve(self.tiny_builder)(root)

    def __repr__(self) -> str:
        return f"<model family {self.title}>"


class DiffRhythm1(ModelFamily):
    """Timed lyrics placed frame by frame, one Euler integration of the whole song, a 44.1 kHz VAE."""

    def max_frames(self, spec: ModelSpec) -> int:
        return spec.dit.max_frames

    def frames_for(self, spec: ModelSpec, seconds: float) -> int:
        if spec.min_seconds == spec.max_seconds:  # fixed-length models always fill their window
            return spec.max_frames
        return min(int(seconds * self.limits.frames_per_second), spec.max_frames)

    def files(self, spec: ModelSpec) -> dict[str, list[tuple[str, str]]]:
        return {"checkpoint": [(spec.repo_id, spec.checkpoint_file)], "vae": [(VAE_REPO, VAE_FILE)]}


class DiffRhythm2(ModelFamily):
    """Section tags instead of timestamps, a block sampler, a 48 kHz BigVGAN decoder."""

    def max_frames(self, spec: ModelSpec) -> int:
        return int(spec.max_seconds * self.limits.frames_per_second)

    def frames_for(self, spec: ModelSpec, seconds: float) -> int:
        # int(max_secs * 5), as the official script; the sampler rounds up to whole blocks
        return int(seconds * self.limits.frames_per_second)

    def files(self, spec: ModelSpec) -> dict[str, list[tuple[str, str]]]:
        return {"checkpoint": [(spec.repo_id, f) for f in DR2_FILES]}  # one repository, no VAE


# The defaults are the samplers' (SamplerSettings: the official script's 32 grid points = 31 Euler steps,
# guidance 4; BlockSamplerSettings: --steps 16 of the official command line, grid points, so 15 Euler
# steps a block, guidance 2), and so are the least steps.
DR1 = DiffRhythm1(
    "dr1", "DiffRhythm 1", pipeline="musicgen.pipelines.dr1:DR1Pipeline",
    lyrics=LyricsRules(timed=True, encoder="musicgen.lyrics.timed:encode_timed"),
    defaults=Defaults.of(SamplerSettings), limits=Limits(SamplerSettings.MIN_STEPS, FRAMES_PER_SECOND, SAMPLE_RATE),
    edits=True, live_audio=False, assets=("negative_style_vocal.npy",),  # the null branch's style
    # auto: rows in parallel on the CPU, batched with a CUDA graph on CUDA (measured: runtime/plans.py)
    execution=ExecutionRules(
        plans=("batched", "sequential", "parallel", "graphs"), auto_plan=(("cpu", "parallel"), ("cuda", "graphs")),
        compile_auto=("cuda",), fast_paths=True,
    ),
    tiny_builder="musicgen.tiny:ensure_tiny_model",
)  # fmt: skip
DR2 = DiffRhythm2(
    "dr2", "DiffRhythm 2", pipeline="musicgen.pipelines.dr2:DR2Pipeline",
    lyrics=LyricsRules(timed=False, encoder="musicgen.lyrics.sections:encode_section_lyrics"),
    defaults=Defaults.of(BlockSamplerSettings),
    limits=Limits(BlockSamplerSettings.MIN_STEPS, DR2_FRAMES_PER_SECOND, DR2_SAMPLE_RATE),
    edits=False, live_audio=True, assets=(),  # no official edit mode; the null branch's style is zeros
    # one forward over both guidance branches; the attention writes the key/value cache, so only the
    # blocks' MLPs compile; auto is off: on the CPU the engine measured 1.16x faster compiled, but each
    # replica would compile before its first song (README); not measured on a GPU
    execution=ExecutionRules(
        plans=("batched", "sequential", "graphs"), auto_plan=(), experimental_plans=("graphs",),
        compile_target="mlp", engine=True,
    ),
    tiny_builder="musicgen.tiny:ensure_tiny_dr2",
)  # fmt: skip
FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (DR1, DR2)}


def family_defaults(setting: str) -> str:
    """Each family's default of `setting` ("steps" or "cfg_strength"), for help texts:
    "31 for DiffRhythm 1, 16 for DiffRhythm 2"."""
    return ", ".join(f"{getattr(f.defaults, setting):g} for {f.title}" for f in FAMILIES.values())


@dataclass(frozen=True)
class ModelSpec:
    name: str
    repo_id: str
    dit: DiTConfig | None  # DiffRhythm 1's built-in configuration; DiffRhythm 2 reads model.json
    min_seconds: int
    max_seconds: int
    description: str
    checkpoint_file: str = DIT_FILE
    licence: str = "Apache-2.0"
    family: ModelFamily = DR1
    # seeded random weights built locally (musicgen.tiny) instead of downloaded: not a music model
    untrained: bool = False
    # lyric placement rules of the official get_lrc_token: the base (2048-frame) models ignore the
    # last LRC line; v1.0 drops lines at or past its whole window, v1.2 at or past the chosen duration
    lrc_drop_last_line: bool = False
    lrc_window_cutoff: bool = False

    @property
    def max_frames(self) -> int:
        return self.family.max_frames(self)

    @property
    def default_steps(self) -> int:
        """Sampling steps when none are given: the family's official inference default."""
        return self.family.defaults.steps

    @property
    def default_cfg(self) -> float:
        return self.family.defaults.cfg_strength

    @property
    def timed_lyrics(self) -> bool:
        """LRC timestamps place the lines (DiffRhythm 1); DiffRhythm 2 reads section tags only."""
        return self.family.lyrics.timed

    @property
    def edits(self) -> bool:
        """Regenerating segments of a song: DiffRhythm 1 only (DiffRhythm 2's code has no edit mode)."""
        return self.family.edits

    @property
    def live_audio(self) -> bool:
        """Its songs can be heard while they are written (DiffRhythm 2's blocks); DiffRhythm 1 samples
        the whole song at once."""
        return self.family.live_audio

    @property
    def min_steps(self) -> int:
        """DiffRhythm 2's steps are grid points of each block's integration: two at least."""
        return self.family.limits.min_steps

    @property
    def frames_per_second(self) -> float:
        return self.family.limits.frames_per_second

    @property
    def files(self) -> dict[str, list[tuple[str, str]]]:
        """The hub files it needs besides the style encoder (see ModelFamily.files); none when untrained."""
        return {} if self.untrained else self.family.files(self)

    def check_generation(self, *, steps: int, edit: bool) -> None:
        if edit and not self.edits:
            raise InvalidParameter(
                f"{self.name} cannot edit songs (its official code has no edit mode)",
                recovery="edit with a DiffRhythm 1.2 model, or generate the whole song again",
                details={"parameter": "edit"},
            )
        if steps < self.min_steps:
            raise InvalidParameter(
                f"{self.name} needs at least {self.min_steps} steps (grid points of each block's integration)",
                recovery=f"use steps >= {self.min_steps} (its default is {self.default_steps})",
                details={"parameter": "steps"},
            )

    @property
    def sample_rate(self) -> int:
        """The audio's rate as the model card gives it (a result's own `sample_rate` is what it is)."""
        return self.family.limits.sample_rate

    def check_duration(self, seconds: float) -> None:
        if not self.min_seconds <= seconds <= self.max_seconds:
            allowed = (
                f"exactly {self.min_seconds} s"
                if self.min_seconds == self.max_seconds
                else f"{self.min_seconds} to {self.max_seconds} s"
            )
            hint = (
                " (diffrhythm-1.2-full makes 96 to 285 s)"
                if seconds > self.max_seconds and self.max_seconds < 96
                else ""
            )
            raise InvalidParameter(
                f"duration {seconds:g} s is out of range for {self.name}: it generates {allowed}",
                recovery=f"choose a duration of {allowed}{hint}",
                details={
                    "parameter": "duration_s",
                    "value": seconds,
                    "min": self.min_seconds,
                    "max": self.max_seconds,
                },
            )

    def lyrics_cutoff_s(self, seconds: float) -> float:
        """Lines starting at or after this time are not sung."""
        return self.max_frames / self.frames_per_second if self.lrc_window_cutoff else seconds

    def frames_for(self, seconds: float) -> int:
        """Latent frames generated for a song of `seconds`, as the official inference does it."""
        self.check_duration(seconds)
        return self.family.frames_for(self, seconds)


def _spec(name, repo, max_frames, seconds, description, *, duration_embed: bool, v1_0: bool) -> ModelSpec:
    # v1.0 differs from v1.2 in two ways: its attention is causal (see DiTConfig.causal), and its
    # get_lrc_token drops lines at or past the whole window rather than the chosen duration
    cfg = DiTConfig(**DIFFRHYTHM_1B, max_frames=max_frames, duration_embed=duration_embed, causal=v1_0)
    return ModelSpec(
        name,
        repo,
        cfg,
        seconds[0],
        seconds[1],
        description,
        lrc_drop_last_line=max_frames == 2048,
        lrc_window_cutoff=v1_0,
    )


MODELS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        _spec(
            "diffrhythm-1.2-base",
            "ASLP-lab/DiffRhythm-1_2",
            2048,
            (95, 95),
            "DiffRhythm v1.2, 95 s songs (2048 frames)",
            duration_embed=False,
            v1_0=False,
        ),
        _spec(
            "diffrhythm-1.2-full",
            "ASLP-lab/DiffRhythm-1_2-full",
            6144,
            (96, 285),
            "DiffRhythm v1.2 full, 96 to 285 s songs (up to 6144 frames)",
            duration_embed=True,
            v1_0=False,
        ),
        _spec(
            "diffrhythm-1.0-base",
            "ASLP-lab/DiffRhythm-base",
            2048,
            (95, 95),
            "DiffRhythm v1.0, 95 s songs (causal attention, no duration embedding)",
            duration_embed=False,
            v1_0=True,
        ),
        _spec(
            "diffrhythm-1.0-full",
            "ASLP-lab/DiffRhythm-full",
            6144,
            (285, 285),
            "DiffRhythm v1.0 full, 285 s songs (causal attention, no duration embedding)",
            duration_embed=False,
            v1_0=True,
        ),
    )
}
TINY_DIT = DiTConfig(dim=64, depth=2, heads=4, ff_mult=2, conv_layers=1, max_frames=2048, duration_embed=True)
MODELS["tiny"] = ModelSpec(
    "tiny",
    "",
    TINY_DIT,
    5,
    95,
    "UNTRAINED tiny model with seeded random weights, for offline demos and tests",
    untrained=True,
)
MODELS["diffrhythm-2"] = ModelSpec(
    "diffrhythm-2",
    DR2_REPO,
    None,
    10,
    210,
    "DiffRhythm 2, 10 to 210 s songs from lyrics with section tags (no timestamps), 48 kHz",
    checkpoint_file=DR2_DIT_FILES[1],
    family=DR2,
)
MODELS["tiny-2"] = ModelSpec(
    "tiny-2",
    "",
    None,
    4,
    60,
    "UNTRAINED tiny DiffRhythm 2 with seeded random weights, for offline demos and tests",
    untrained=True,
    family=DR2,
)
DEFAULT_MODEL = "diffrhythm-1.2-base"


def get_model_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise InvalidParameter(
            f"unknown model {name!r}",
            recovery=f"choose one of: {', '.join(MODELS)}",
            details={"parameter": "model", "value": name},
        ) from None
