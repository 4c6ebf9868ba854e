"""DiffRhythm 1's lyrics: timed lines placed frame by frame, as the official `get_lrc_token` does.

Placement rules (official): every line's phone ids (model ids = vocabulary id + 1) with periods
turned into commas, then a period; a line starts at frame int(t * 44100 / 2048), or at the end of
the previous line if that is later; it is cut at the song's last frame; lines starting at or after
the song's end are not sung; the base (2048-frame) models also drop the last line (the per-model flags
`ModelSpec.lrc_drop_last_line` and `lrc_window_cutoff`). Plain lines without timestamps are timed first
(`musicgen.lyrics.timing`). `song_duration` = end_frame / max_frames, rounded to fp16 as the official
code hands it to the model.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from musicgen.errors import InvalidLyrics
from musicgen.lyrics.frontend import LyricsFrames, LyricsFrontEnd, PlacedLine
from musicgen.lyrics.g2p import has_mandarin
from musicgen.lyrics.lrc import LrcLine, format_time, parse_lrc, to_lrc
from musicgen.lyrics.timing import auto_time
from musicgen.model.vae import LATENT_HOP, SAMPLE_RATE

if TYPE_CHECKING:
    from musicgen.registry import ModelSpec

COMMA_ID, PERIOD_ID = 1, 2  # model ids of "," and "."


def place_lines(
    lines: list[tuple[float, list[int]]], end_frame: int
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Official placement of (start time, model ids) lines on `end_frame` frames."""
    frames = torch.zeros(end_frame, dtype=torch.long)
    spans = []
    last_end = 0
    for time_s, ids in lines:
        tokens = [COMMA_ID if t == PERIOD_ID else t for t in ids] + [PERIOD_ID]
        start = max(int(time_s * SAMPLE_RATE / LATENT_HOP), last_end)
        length = max(0, min(len(tokens), end_frame - start))
        frames[start : start + length] = torch.tensor(tokens[:length], dtype=torch.long)
        spans.append((start, length))
        last_end = start + length
    return frames, spans


def fp16_round(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float16))


def auto_time_lines(
    front: LyricsFrontEnd, lines: list[LrcLine], spec: ModelSpec, seconds: float
) -> list[LrcLine]:
    """Timestamps for plain lyrics (see timing.py); the base models get an empty end marker so
    that their drop-the-last-line rule drops the marker, not the last sung line."""
    counts = [len(front.line_phones(ln).ids) + 1 for ln in lines]  # + the line's period
    layout = auto_time(counts, [ln.section for ln in lines], spec.lyrics_cutoff_s(seconds))
    timed = [replace(ln, time_s=t) for ln, t in zip(lines, layout.times, strict=True)]
    if spec.lrc_drop_last_line:
        end = round(spec.lyrics_cutoff_s(seconds) - layout.outro_s, 2)
        end = min(max(end, timed[-1].time_s + 0.01), spec.lyrics_cutoff_s(seconds) - 0.01)
        timed.append(LrcLine(round(end, 2), "", lines[-1].line_no + 1, None))
    return timed


def encode_timed(front: LyricsFrontEnd, lyrics: str, spec: ModelSpec, seconds: float) -> LyricsFrames:
    """Frame-aligned tokens of timed (or auto-timed) lines; `lrc` is the timed lyrics used."""
    end_frame = spec.frames_for(seconds)
    parsed = parse_lrc(lyrics)
    warnings = list(parsed.warnings)
    lines = parsed.lines
    if lines and not parsed.timed:
        lines = auto_time_lines(front, lines, spec, seconds)
    cutoff = spec.lyrics_cutoff_s(seconds)
    late = [ln for ln in lines if ln.time_s >= cutoff and ln.text]
    if late:
        raise InvalidLyrics(
            f"line {late[0].line_no} starts at {format_time(late[0].time_s)}, at or after the end of the "
            f"{seconds:g} s song" + (f" ({len(late)} lines do)" if len(late) > 1 else ""),
            recovery="choose a longer duration (diffrhythm-1.2-full sings up to 285 s) or remove those lines",
            details={"line": late[0].line_no, "lines": [ln.line_no for ln in late]},
        )
    # every line is checked, the one a base model drops included
    phones = {ln.line_no: front.line_phones(ln) for ln in lines if ln.text}
    sung = list(lines)
    if spec.lrc_drop_last_line and sung:
        last = sung.pop()
        if last.text:
            warnings.append(
                f"line {last.line_no} ({last.text[:30]!r}) is the last line: {spec.name} does not sing it; "
                "end the lyrics with an empty timestamp line such as [01:34.00] to keep it"
            )
    if any(has_mandarin(ln.text) for ln in lines):
        warnings += [f"Mandarin: {reason}" for reason in front.tokenizer.mandarin.fallback_reasons]
    placed_input, kept = [], []
    for ln in sung:
        if not ln.text:  # an instrumental break or end marker: nothing to place
            continue
        lp = phones[ln.line_no]
        if lp.dropped:
            warnings.append(
                f"line {ln.line_no}: phones not in the vocabulary were skipped: {' '.join(lp.dropped)}"
            )
        placed_input.append((ln.time_s, [i + 1 for i in lp.ids]))
        kept.append((ln, lp.phones))
    needed = sum(len(ids) + 1 for _, ids in placed_input)
    if needed > end_frame:
        raise InvalidLyrics(
            f"the lyrics have {needed} phones, more than the {end_frame} frames of a {seconds:g} s song can hold",
            recovery="shorten the lyrics or choose a longer duration",
            details={"phones": needed, "frames": end_frame},
        )
    tokens, spans = place_lines(placed_input, end_frame)
    placed = []
    for (ln, ph), (start, length), (_, ids) in zip(kept, spans, placed_input, strict=True):
        placed.append(PlacedLine(ln.time_s, ln.text, ph, start, length))
        if length == 0:
            warnings.append(
                f"line {ln.line_no} ({ln.text[:30]!r}) does not fit before the song's end: not sung"
            )
        elif length < len(ids) + 1:
            warnings.append(f"line {ln.line_no} ({ln.text[:30]!r}) is cut at the song's end")
        elif ln.time_s * SAMPLE_RATE / LATENT_HOP < start - 1:
            warnings.append(
                f"line {ln.line_no} starts late, at {start * LATENT_HOP / SAMPLE_RATE:.2f} s: "
                "the line before it is longer than the gap between their timestamps"
            )
    return LyricsFrames(
        tokens=tokens,
        end_frame=end_frame,
        song_duration=fp16_round(end_frame / spec.max_frames),
        lrc=to_lrc([(ln.time_s, ln.text) for ln in lines]),
        lines=placed,
        warnings=warnings,
    )
