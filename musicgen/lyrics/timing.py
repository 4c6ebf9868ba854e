"""Automatic timing for lyrics written without timestamps.

Deterministic: the same lines, phone counts and duration always give the same times. The song is laid
out as an instrumental intro, the lines at a singing pace proportional to their phone counts (plus a
breath per line), a gap at every section change ([Verse] -> [Chorus]) and an instrumental outro.
When the lyrics need less time than the song has, the pace stays natural and the spare time goes to
the section gaps and the outro; when they need more, the pace quickens up to a limit past which the
lyrics are refused as too long for the duration.
"""

from __future__ import annotations

from dataclasses import dataclass

from musicgen.errors import InvalidLyrics

NATURAL_PACE = 5.0  # phones per second of a relaxed sung line (typical DiffRhythm LRC files)
MAX_PACE = 12.0  # faster than this is rap at best: refuse rather than produce a garbled song
BREATH_PHONES = 6.0  # a line's time includes a pause, counted in phones
SECTION_GAP_S = 2.0
TIME_STEP = 0.01  # LRC resolution


@dataclass(frozen=True)
class TimedLayout:
    times: list[float]  # one start time per line, strictly increasing, inside [0, duration)
    intro_s: float
    outro_s: float
    pace: float  # phones per second used


def intro_length(duration_s: float) -> float:
    return min(12.0, 0.08 * duration_s)


def min_outro_length(duration_s: float) -> float:
    return min(10.0, 0.06 * duration_s)


def auto_time(phone_counts: list[int], sections: list[str | None], duration_s: float) -> TimedLayout:
    """Start times for lines with these phone counts; `sections[i]` is line i's section tag."""
    n = len(phone_counts)
    if n == 0:
        return TimedLayout([], 0.0, duration_s, NATURAL_PACE)
    if len(sections) != n:
        raise ValueError("one section entry per line")
    intro, outro = intro_length(duration_s), min_outro_length(duration_s)
    changes = [i for i in range(1, n) if sections[i] != sections[i - 1]]
    weights = [max(1, c) + BREATH_PHONES for c in phone_counts]
    total = sum(weights)
    available = duration_s - intro - outro
    gaps = SECTION_GAP_S * len(changes)
    singing = total / NATURAL_PACE
    pace = NATURAL_PACE
    extra_gap = 0.0
    if singing + gaps <= available:
        # natural pace; half of the spare time opens up the sections, the rest lengthens the outro
        spare = available - singing - gaps
        extra_gap = 0.5 * spare / len(changes) if changes else 0.0
    else:
        gaps = min(gaps, 0.25 * max(0.0, available))  # squeeze the gaps before quickening the pace
        usable = available - gaps
        pace = total / usable if usable > 0 else float("inf")
        if pace > MAX_PACE:
            need = total / MAX_PACE + intro + outro
            raise InvalidLyrics(
                f"{n} lines with {sum(phone_counts)} phones do not fit in {duration_s:g} s "
                f"(they need about {need:.0f} s at the fastest singing pace)",
                recovery="shorten the lyrics or choose a longer duration",
                details={"lines": n, "phones": sum(phone_counts), "needed_s": round(need, 1)},
            )
    gap_each = (gaps / len(changes) if changes else 0.0) + extra_gap

    times, t = [], intro
    change_set = set(changes)
    for i, w in enumerate(weights):
        if i in change_set:
            t += gap_each
        times.append(t)
        t += w / pace
    # LRC resolution, strictly increasing, inside the song
    out, last = [], -TIME_STEP
    for t in times:
        q = max(round(t / TIME_STEP) * TIME_STEP, last + TIME_STEP)
        out.append(round(q, 2))
        last = q
    if out[-1] >= duration_s:
        raise InvalidLyrics(
            f"{n} lines do not fit in {duration_s:g} s",
            recovery="shorten the lyrics or choose a longer duration",
        )
    end = t
    return TimedLayout(out, intro, max(0.0, duration_s - end), pace)
