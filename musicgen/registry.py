"""The official DiffRhythm models and their built-in hyperparameters.

Everything that differs between checkpoints lives here, per model, so that loading and sampling code
never branches on a model's name.
"""

from __future__ import annotations

from dataclasses import dataclass

from musicgen.errors import InvalidParameter
from musicgen.model.dit import DiTConfig

SAMPLE_RATE = 44_100  # VAE output, stereo
LATENT_HOP = 2048  # audio samples per latent frame
LATENT_CHANNELS = 64
FRAMES_PER_SECOND = SAMPLE_RATE / LATENT_HOP  # ~21.53

# DiffRhythm 2: 5 latent frames a second, decoded by BigVGAN to 48 kHz (9600 samples a frame)
DR2_FRAMES_PER_SECOND = 5
DR2_SAMPLE_RATE = 48_000
DR2_REPO = "ASLP-lab/DiffRhythm2"
DR2_DIT_FILES = ("model.json", "model.safetensors")  # the DiT: its configuration and weights
DR2_DECODER_FILES = ("decoder.json", "decoder.bin")  # the BigVGAN decoder: its configuration and weights
DR2_FILES = DR2_DIT_FILES + DR2_DECODER_FILES  # what `musicgen models pull diffrhythm-2` downloads

VAE_REPO = "ASLP-lab/DiffRhythm-vae"
VAE_FILE = "vae_model.pt"
MULAN_REPO = "OpenMuQ/MuQ-MuLan-large"

# config/diffrhythm-1b.json of the official repository (the "heads" there is not used: see DiTConfig)
DIFFRHYTHM_1B = dict(
    dim=2048, depth=16, ff_mult=4, text_dim=512, conv_layers=4, mel_dim=64, text_num_embeds=363
)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    repo_id: str
    dit: DiTConfig | None  # DiffRhythm 1's built-in configuration; DiffRhythm 2 reads model.json
    min_seconds: int
    max_seconds: int
    description: str
    checkpoint_file: str = "cfm_model.pt"
    licence: str = "Apache-2.0"
    # "dr1": timed lyrics, 44.1 kHz VAE; "dr2": section tags, block sampler, 48 kHz BigVGAN (DR2_* below)
    family: str = "dr1"
    # seeded random weights built locally (musicgen.tiny) instead of downloaded: not a music model
    untrained: bool = False
    # lyric placement rules of the official get_lrc_token: the base (2048-frame) models ignore the
    # last LRC line; v1.0 drops lines at or past its whole window, v1.2 at or past the chosen duration
    lrc_drop_last_line: bool = False
    lrc_window_cutoff: bool = False

    @property
    def max_frames(self) -> int:
        if self.family == "dr2":
            return int(self.max_seconds * DR2_FRAMES_PER_SECOND)
        return self.dit.max_frames

    @property
    def default_steps(self) -> int:
        """Sampling steps when none are given: the official inference defaults (DiffRhythm 1: 32 grid
        points = 31 Euler steps; DiffRhythm 2: --steps 16, grid points, so 15 per block)."""
        return 16 if self.family == "dr2" else 31

    @property
    def default_cfg(self) -> float:
        return 2.0 if self.family == "dr2" else 4.0

    @property
    def timed_lyrics(self) -> bool:
        """LRC timestamps place the lines (DiffRhythm 1); DiffRhythm 2 reads section tags only."""
        return self.family == "dr1"

    @property
    def edits(self) -> bool:
        """Regenerating segments of a song: DiffRhythm 1 only (DiffRhythm 2's code has no edit mode)."""
        return self.family == "dr1"

    @property
    def min_steps(self) -> int:
        """DiffRhythm 2's steps are grid points of each block's integration: two at least."""
        return 2 if self.family == "dr2" else 1

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
        return DR2_SAMPLE_RATE if self.family == "dr2" else SAMPLE_RATE

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
        return self.max_frames / FRAMES_PER_SECOND if self.lrc_window_cutoff else seconds

    def frames_for(self, seconds: float) -> int:
        """Latent frames generated for a song of `seconds`, as the official inference does it."""
        self.check_duration(seconds)
        if self.family == "dr2":  # int(max_secs * 5); the sampler rounds up to whole blocks
            return int(seconds * DR2_FRAMES_PER_SECOND)
        if self.min_seconds == self.max_seconds:  # fixed-length models always fill their window
            return self.max_frames
        return min(int(seconds * FRAMES_PER_SECOND), self.max_frames)


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
    checkpoint_file="model.safetensors",
    family="dr2",
)
MODELS["tiny-2"] = ModelSpec(
    "tiny-2",
    "",
    None,
    4,
    60,
    "UNTRAINED tiny DiffRhythm 2 with seeded random weights, for offline demos and tests",
    untrained=True,
    family="dr2",
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
