"""DiffRhythm 2's lyrics: no timestamps; section tags instead.

The official rules (`parse_lyrics` and `STRUCT_INFO` in ASLP-lab/DiffRhythm2's inference.py): each line
on its own; a line that is a structure tag becomes [tag id, 511]; any other line is phonemized by the
same g2p as DiffRhythm 1 (English through espeak-ng, Mandarin through the official tables), its phone ids
+ 1 (`CNENTokenizer.encode`), then 511 ([stop]). Lines are concatenated.

Where the official front end fails or surprises, this one says so instead:
- a tag is recognised whatever its case or surrounding spaces, and with a number (`[Verse 2]`), as
  DiffRhythm 1 lyrics write them; a bracketed line that is no DiffRhythm 2 tag is dropped with a warning
  (the official code would sing its letters);
- LRC timestamps are removed with a warning (DiffRhythm 2 times lyrics itself);
- blank lines are skipped; a line that makes no phones (the official code crashes on it) is an error
  naming the line, as in DiffRhythm 1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from musicgen.lyrics.frontend import LyricsFrames, LyricsFrontEnd
from musicgen.lyrics.lrc import LrcLine

if TYPE_CHECKING:
    from musicgen.registry import ModelSpec

STOP = 511
SECTION_TAGS = {
    "start": 500, "end": 501, "intro": 502, "verse": 503, "chorus": 504, "outro": 505, "inst": 506,
    "solo": 507, "bridge": 508, "hook": 509, "break": 510, "stop": 511, "space": 512,
}  # fmt: skip
TIMESTAMP = re.compile(r"\[\d+:\d+(?:\.\d+)?\]")
BRACKETED = re.compile(r"^\[([^\]]*)\]$")


@dataclass
class SectionLyrics:
    tokens: list[int]  # model ids: phones 1..363, tags 500..512, 511 after every line
    lines: list[str] = field(default_factory=list)  # the lines as read (tags normalised to [verse] etc.)
    warnings: list[str] = field(default_factory=list)


def tag_id(line: str) -> int | None:
    """The id of a section tag line ([verse], [Verse 2], [CHORUS]), else None."""
    m = BRACKETED.fullmatch(line.strip())
    if not m:
        return None
    name = re.sub(r"[\s\d]+$", "", m.group(1).strip().lower())
    return SECTION_TAGS.get(name)


def encode_sections(front: LyricsFrontEnd, lyrics: str) -> SectionLyrics:
    out = SectionLyrics(tokens=[])
    stamps = 0
    for number, raw in enumerate(lyrics.replace("\r\n", "\n").replace("\r", "\n").split("\n"), start=1):
        line = raw.strip().lstrip("\ufeff")
        if TIMESTAMP.search(line):
            stamps += 1
            line = TIMESTAMP.sub("", line).strip()
        if not line:
            continue
        tag = tag_id(line)
        if tag is not None:
            out.tokens += [tag, STOP]
            out.lines.append(f"[{next(k for k, v in SECTION_TAGS.items() if v == tag)}]")
            continue
        if BRACKETED.fullmatch(line):
            out.warnings.append(
                f"line {number}: {line} is not a DiffRhythm 2 section tag and was dropped "
                f"(tags: {', '.join(f'[{t}]' for t in SECTION_TAGS)})"
            )
            continue
        phones = front.line_phones(LrcLine(0.0, line, number))  # errors name the line
        out.tokens += [i + 1 for i in phones.ids] + [STOP]
        out.lines.append(line)
    if stamps:
        out.warnings.append(
            f"{stamps} LRC timestamps were removed: DiffRhythm 2 places the lyrics itself "
            "(section tags such as [verse] and [chorus] guide it)"
        )
    return out


def encode_section_lyrics(
    front: LyricsFrontEnd, lyrics: str, spec: ModelSpec, seconds: float
) -> LyricsFrames:
    """The model's input (see `LyricsFrontEnd.encode`): the token sequence, not frame-aligned; `lrc` is the
    lines as read."""
    end_frame = spec.frames_for(seconds)
    out = encode_sections(front, lyrics)
    return LyricsFrames(tokens=torch.tensor(out.tokens, dtype=torch.long), end_frame=end_frame,
                        song_duration=end_frame / spec.max_frames, lrc="\n".join(out.lines),
                        warnings=out.warnings)  # fmt: skip
