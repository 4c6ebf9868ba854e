"""Lyrics to the model's token input: the front end that every model family shares (the phonemizer, the
per-line checks) and the types it returns. How lines become tokens is the family's lyrics rule, named
in the registry: DiffRhythm 1 places timed lines frame by frame (`musicgen.lyrics.timed`), DiffRhythm 2
reads section tags (`musicgen.lyrics.sections`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from musicgen.errors import InvalidLyrics
from musicgen.lyrics.g2p import LinePhones, PhoneTokenizer, unsupported_letters
from musicgen.lyrics.lrc import LrcLine

if TYPE_CHECKING:
    from musicgen.registry import ModelSpec

MAX_LINE_CHARS = 300  # one sung line; longer ones are pasted paragraphs


@dataclass(frozen=True)
class PlacedLine:
    time_s: float
    text: str
    phones: str
    frame_start: int
    frame_len: int  # 0 when the song ended before the line


@dataclass
class LyricsFrames:
    tokens: torch.Tensor  # (n,) int64 model ids; DiffRhythm 1's: (end_frame,), frame-aligned, 0 = filler
    end_frame: int
    song_duration: float
    # the lyrics used: DiffRhythm 1's timed lines (editable, what auto-timing chose), DiffRhythm 2's as read
    lrc: str
    lines: list[PlacedLine] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class LyricsFrontEnd:
    def __init__(self, tokenizer: PhoneTokenizer):
        self.tokenizer = tokenizer

    @classmethod
    def from_assets(cls) -> LyricsFrontEnd:
        """The official data files: the packaged ones, plus the large optional Mandarin files when
        they are in the cache (`musicgen models pull assets`); never downloads."""
        from musicgen import hub

        for name, asset in hub.ASSETS.items():
            if asset.bundled and name.startswith("g2p/"):
                hub.asset_path(name)  # verified once per process
        return cls(
            PhoneTokenizer(
                hub.bundled_dir() / "g2p",
                lexicon=hub.optional_asset("g2p/chinese_lexicon.txt"),
                polyphone_model=hub.optional_asset("g2p/g2p_chinese_model/poly_bert_model.onnx"),
            )
        )

    def line_phones(self, ln: LrcLine) -> LinePhones:
        if len(ln.text) > MAX_LINE_CHARS:
            raise InvalidLyrics(
                f"line {ln.line_no} has {len(ln.text)} characters; a sung line has at most {MAX_LINE_CHARS}",
                recovery="split it into several lines",
                details={"line": ln.line_no},
            )
        bad = unsupported_letters(ln.text)
        if bad:
            raise InvalidLyrics(
                f"line {ln.line_no}: unsupported script in {ln.text[:40]!r} ({' '.join(bad[:5])})",
                recovery="DiffRhythm sings English and Mandarin: write the line in one of them",
                details={"line": ln.line_no, "characters": bad[:20]},
            )
        lp = self.tokenizer.line(ln.text)
        if not lp.ids:
            raise InvalidLyrics(
                f"line {ln.line_no}: {ln.text[:40]!r} produces no phones",
                recovery="write the line with letters (English or Mandarin), or remove it",
                details={"line": ln.line_no},
            )
        return lp

    def encode(self, lyrics: str, spec: ModelSpec, seconds: float) -> LyricsFrames:
        """The model's lyrics input, by its family's lyrics rule (see `ModelFamily.lyrics`)."""
        return spec.family.encode_lyrics(self, lyrics or "", spec, seconds)
