"""Style embeddings: MuQ-MuLan (through the `muq` package) for text prompts and reference audio, and
the official negative style embedding used by the CFG null branch.

Text prompts go through MuQ-MuLan one at a time: its text tower averages over padding positions, so
batching prompts of different lengths would change their embeddings.
"""

from __future__ import annotations

import contextlib
import io
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from musicgen.audio import audio_info, read_audio, resample
from musicgen.errors import InvalidPrompt, ModelNotAvailable
from musicgen.hub import file_sha256

MULAN_SAMPLE_RATE = 24_000
CLIP_SECONDS = 10.0
MAX_PROMPT_CHARS = 512


class StyleEncoder:
    """MuQ-MuLan with an LRU cache of embeddings, keyed by the prompt text or by the SHA-256 of the
    reference file's bytes (the same clip under another name is a hit, an edited file is a miss)."""

    def __init__(self, mulan, device: torch.device, cache_size: int = 256):
        self.mulan = mulan.to(device).eval()
        self.device = device
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def _cached(self, key: tuple[str, str], compute) -> torch.Tensor:
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return hit.clone()
            self.misses += 1
        emb = compute()
        with self._lock:
            self._cache[key] = emb
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return emb.clone()

    @classmethod
    def from_pretrained(
        cls, source: str, device: torch.device, *, cache_dir: Path, download: bool
    ) -> StyleEncoder:
        """`source`: a hub repo id (OpenMuQ/MuQ-MuLan-large) or a folder written by `save_pretrained`."""
        from muq import MuQMuLan

        try:
            # huggingface_hub prints a line to stdout when loading from a folder; keep stdout clean
            with contextlib.redirect_stdout(io.StringIO()):
                mulan = MuQMuLan.from_pretrained(
                    source, cache_dir=str(cache_dir), local_files_only=not download, strict=True
                )
        except Exception as exc:
            raise ModelNotAvailable(
                f"cannot load the MuQ-MuLan style encoder from {source}: {type(exc).__name__}: {exc}",
                recovery="fetch it with `musicgen models pull mulan`",
            ) from exc
        return cls(mulan, device)

    def embed_text(self, prompt: str) -> torch.Tensor:
        """(1, 512) fp32 embedding of one text prompt (prompts are never batched: see module doc)."""
        prompt = check_prompt(prompt)
        return self._cached(("text", prompt), lambda: self._text(prompt))

    @torch.inference_mode()
    def _text(self, prompt: str) -> torch.Tensor:
        return self.mulan(texts=[prompt]).float().cpu()

    @torch.inference_mode()
    def embed_clip(self, wav: torch.Tensor) -> torch.Tensor:
        """(1, 512) from a (samples,) mono 24 kHz clip."""
        return self.mulan(wavs=wav[None].to(self.device)).float().cpu()

    def embed_audio_file(self, path: str | Path) -> torch.Tensor:
        audio_info(path)  # a clear error for a missing or unreadable file before hashing it
        key = ("audio", file_sha256(path))
        return self._cached(key, lambda: self.embed_clip(load_reference_clip(path)))


def check_prompt(prompt: str) -> str:
    prompt = (prompt or "").strip()
    if not prompt:
        raise InvalidPrompt(
            "the style prompt is empty", recovery="describe the style, e.g. 'upbeat pop, female vocals'"
        )
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidPrompt(
            f"the style prompt has {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are allowed",
            recovery="shorten the style prompt",
        )
    return prompt


def check_reference_audio(path: str | Path) -> float:
    """The file's length in seconds, from its header only; a clear error if it cannot be a reference."""
    seconds, _, _ = audio_info(path)
    if seconds < CLIP_SECONDS:
        raise InvalidPrompt(
            f"reference audio {Path(path).name} is {seconds:.2f} s long; at least {CLIP_SECONDS:g} s are needed",
            recovery="use a reference clip of at least 10 seconds",
        )
    return seconds


def load_reference_clip(path: str | Path) -> torch.Tensor:
    """The middle 10 s of a reference song as (samples,) mono 24 kHz, as the official code picks it."""
    seconds = check_reference_audio(path)
    start = seconds // 2 - CLIP_SECONDS / 2  # official: mid = len // 2, start = mid - 5
    audio, sr = read_audio(path, offset_s=start, duration_s=CLIP_SECONDS)
    mono = resample(audio.mean(dim=0), sr, MULAN_SAMPLE_RATE)
    n = int(CLIP_SECONDS * MULAN_SAMPLE_RATE)
    return torch.nn.functional.pad(mono, (0, max(0, n - mono.shape[0])))[:n]


def load_negative_style(path: str | Path) -> torch.Tensor:
    """The official negative style embedding (infer/example/vocal.npy): (1, 512) fp32."""
    emb = torch.from_numpy(np.load(path)).float()
    if emb.shape != (1, 512):
        raise ModelNotAvailable(f"{path}: expected a (1, 512) embedding, got {tuple(emb.shape)}")
    return emb
