"""LRC parsing that accepts what people actually write.

- timestamps `[mm:ss]`, `[mm:ss.x]`, `[mm:ss.xx]`, `[mm:ss.xxx]`, several on one line (a repeated
  chorus), minutes of any length;
- metadata tags (`[ar:...]`, `[ti:...]`, `[al:...]`, `[by:...]`, `[length:...]`, `[offset:+/-ms]`;
  a positive offset makes every line earlier, as in the LRC convention);
- section tags on their own line (`[Verse]`, `[Chorus 2]`, `[Intro]`, ...), kept for timing;
- blank lines; a timestamp with no text (an instrumental break or the song's end marker).

The official parser slices fixed character positions (`line[1:9]`), so it drops `[0:10.00]`, loses a
third decimal and silently skips anything else; for the `[mm:ss.xx]` lines it understands, the
times here are the same numbers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from musicgen.errors import InvalidLyrics

_TIMESTAMP = re.compile(r"\[\s*(\d{1,3})\s*:\s*(\d{1,2})(?:[.:](\d{1,3}))?\s*\]")
_META = re.compile(r"^\[\s*([A-Za-z#]+)\s*:(.*)\]\s*$")
_SECTION = re.compile(r"^\[\s*([^\]\[:]{1,40}?)\s*\]\s*$")
_BRACKETED = re.compile(r"^\[[^\]]*\]")


@dataclass(frozen=True)
class LrcLine:
    time_s: float | None  # None in plain lyrics
    text: str
    line_no: int  # 1-based, in the input
    section: str | None = None  # the last section tag above this line


@dataclass
class ParsedLyrics:
    lines: list[LrcLine]
    metadata: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    timed: bool = False  # True when the lyrics carry timestamps


def _time(m: re.Match, line_no: int) -> float:
    minutes, seconds, frac = int(m.group(1)), int(m.group(2)), m.group(3)
    if seconds >= 60:
        raise InvalidLyrics(
            f"line {line_no}: bad timestamp {m.group(0)}: seconds must be below 60",
            recovery="write timestamps as [mm:ss.xx], e.g. [01:05.20]",
            details={"line": line_no, "timestamp": m.group(0)},
        )
    # the same arithmetic as the official parser: int(mins) * 60 + float("ss.xx")
    secs = float(f"{m.group(2)}.{frac}") if frac else float(seconds)
    return minutes * 60 + secs


def parse_lrc(text: str) -> ParsedLyrics:
    result = ParsedLyrics(lines=[])
    offset_s = 0.0
    section: str | None = None
    untimed: list[LrcLine] = []
    for line_no, raw in enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), start=1):
        line = raw.strip().lstrip("\ufeff")
        if not line:
            continue
        stamps = []
        rest = line
        while True:
            m = _TIMESTAMP.match(rest)
            if not m:
                break
            stamps.append(_time(m, line_no))
            rest = rest[m.end() :].lstrip()
        if stamps:
            body = rest.strip()
            for t in stamps:
                result.lines.append(LrcLine(t, body, line_no, section))
            continue
        meta = _META.match(line)
        if meta:
            key, value = meta.group(1).lower(), meta.group(2).strip()
            result.metadata[key] = value
            if key == "offset":
                try:
                    offset_s = int(value) / 1000.0
                except ValueError:
                    result.warnings.append(
                        f"line {line_no}: ignored [offset:{value}]: not a whole number of ms"
                    )
            continue
        sec = _SECTION.match(line)
        if sec:
            section = sec.group(1)
            continue
        if _BRACKETED.match(line):
            raise InvalidLyrics(
                f"line {line_no}: cannot read the tag at the start of {line[:40]!r}",
                recovery="write timestamps as [mm:ss.xx] and section tags as [Verse] on their own line",
                details={"line": line_no},
            )
        untimed.append(LrcLine(None, line, line_no, section))

    if result.lines:
        result.timed = True
        if untimed:
            first = untimed[0]
            raise InvalidLyrics(
                f"line {first.line_no}: {first.text[:40]!r} has no timestamp, but other lines have one",
                recovery="give every lyric line a timestamp, or remove them all to let the service time the song",
                details={"line": first.line_no},
            )
        _check_order(result.lines)
        if offset_s:
            result.lines = [
                LrcLine(max(0.0, ln.time_s - offset_s), ln.text, ln.line_no, ln.section)
                for ln in result.lines
            ]
        result.lines.sort(key=lambda ln: ln.time_s)  # stable: same-time lines keep file order
    else:
        result.lines = untimed
    return result


def _check_order(lines: list[LrcLine]) -> None:
    """Lines with one timestamp must go forward in time; a line with several (a repeated chorus) may
    reach back or ahead."""
    per_line: dict[int, list[float]] = {}
    for ln in lines:
        per_line.setdefault(ln.line_no, []).append(ln.time_s)
    last_t, last_no = -1.0, 0
    for no, times in per_line.items():
        if len(times) != 1:
            continue
        if times[0] < last_t:
            raise InvalidLyrics(
                f"line {no}: timestamp {format_time(times[0])} comes before line {last_no}'s {format_time(last_t)}",
                recovery="put the lines in time order (or fix the timestamp)",
                details={"line": no},
            )
        last_t, last_no = times[0], no


def format_time(seconds: float) -> str:
    """[mm:ss.xx] as the official parser reads it."""
    centis = int(round(seconds * 100))
    return f"[{centis // 6000:02d}:{(centis // 100) % 60:02d}.{centis % 100:02d}]"


def to_lrc(lines: list[tuple[float, str]]) -> str:
    return "\n".join(f"{format_time(t)}{text}" for t, text in lines)
