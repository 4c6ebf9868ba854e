"""Automatic timing of plain lyrics, and the front end's validation of what users type."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from musicgen.errors import InvalidLyrics
from musicgen.lyrics.frontend import LyricsFrontEnd
from musicgen.lyrics.g2p import PhoneTokenizer
from musicgen.lyrics.lrc import parse_lrc
from musicgen.lyrics.timing import MAX_PACE, auto_time
from musicgen.registry import MODELS
from tests.conftest import ASSETS

BASE, FULL, TINY = MODELS["diffrhythm-1.2-base"], MODELS["diffrhythm-1.2-full"], MODELS["tiny"]
PLAIN = """[Verse]
Wake up to the morning light
Coffee on the window sill
[Chorus]
Sing it loud, sing it clear
All the ones we love are here
"""


@pytest.fixture(scope="module")
def frontend():
    return LyricsFrontEnd(PhoneTokenizer(ASSETS / "g2p"))


def test_plain_lyrics_get_timed_and_the_lrc_is_returned(frontend):
    out = frontend.encode(PLAIN, BASE, 95)
    timed = parse_lrc(out.lrc)
    assert timed.timed
    texts = [ln.text for ln in timed.lines]
    assert texts[:4] == [
        "Wake up to the morning light",
        "Coffee on the window sill",
        "Sing it loud, sing it clear",
        "All the ones we love are here",
    ]
    times = [ln.time_s for ln in timed.lines]
    assert times == sorted(times) and times[0] >= 2.0 and times[-1] < 95
    # the base model drops the last line: an empty end marker takes that role, so all four are sung
    assert texts[-1] == "" and len(out.lines) == 4 and all(p.frame_len > 0 for p in out.lines)
    # a section change leaves a bigger gap than a line change within the section
    assert times[2] - times[1] > times[1] - times[0]
    # deterministic, and re-encoding the returned LRC gives the same tokens
    again = frontend.encode(PLAIN, BASE, 95)
    assert again.lrc == out.lrc and again.tokens.equal(out.tokens)
    assert frontend.encode(out.lrc, BASE, 95).tokens.equal(out.tokens)


def test_too_many_lyrics_for_the_duration(frontend):
    with pytest.raises(InvalidLyrics, match="do not fit in 10 s"):
        frontend.encode("\n".join(["a long line of lyrics that goes on and on"] * 12), TINY, 10)


@pytest.mark.parametrize(
    "lyrics, match",
    [
        ("[00:10.00]привет мир", "line 1: unsupported script"),
        ("[00:10.00]ok\n[00:12.00]こんにちは", "line 2: unsupported script"),
        ("[00:10.00]!!! ???", "line 1: .* produces no phones"),
        (
            "[00:10.00]fine\n[01:40.00]too late",
            "line 2 starts at \\[01:40.00\\], at or after the end of the 95 s",
        ),
    ],
)
def test_precise_errors(frontend, lyrics, match):
    with pytest.raises(InvalidLyrics, match=match) as exc:
        frontend.encode(lyrics, BASE, 95)
    assert exc.value.details["line"] >= 1


def test_too_long_lines_and_too_many_phones(frontend):
    with pytest.raises(InvalidLyrics, match="line 1 has 301 characters"):
        frontend.encode("[00:01.00]" + "a" * 301, FULL, 120)
    dense = "\n".join(
        f"[00:{i * 0.9:05.2f}]one two three four five six seven eight nine ten eleven" for i in range(1, 12)
    )
    with pytest.raises(InvalidLyrics, match="more than the 215 frames of a 10 s song"):
        frontend.encode(dense, TINY, 10)


def test_warnings_not_errors(frontend):
    out = frontend.encode(
        "[00:10.00]one two three four five six seven eight\n[00:10.50]second\n[00:20.00]\n", BASE, 95
    )
    assert any("starts late" in w for w in out.warnings)
    out = frontend.encode("[00:10.00]first\n[00:20.00]second\n", BASE, 95)
    assert any("is the last line" in w for w in out.warnings)


def test_instrumental_is_all_fillers(frontend):
    out = frontend.encode("", FULL, 120)
    assert out.tokens.shape == (FULL.frames_for(120),) and int(out.tokens.abs().sum()) == 0


@settings(max_examples=200, deadline=None)
@given(
    counts=st.lists(st.integers(min_value=0, max_value=80), min_size=1, max_size=40),
    section_ids=st.lists(st.integers(min_value=0, max_value=3), min_size=40, max_size=40),
    duration=st.floats(min_value=5, max_value=285),
)
def test_auto_time_is_increasing_and_inside_the_song(counts, section_ids, duration):
    sections = [f"s{section_ids[i]}" for i in range(len(counts))]
    try:
        layout = auto_time(counts, sections, duration)
    except InvalidLyrics as exc:
        assert "do not fit" in exc.message
        # refused only when even the fastest pace needs most of the song (intro, outro, squeezed gaps aside)
        assert sum(max(1, c) + 6 for c in counts) / MAX_PACE > 0.64 * duration
        return
    assert len(layout.times) == len(counts)
    assert all(b > a for a, b in zip(layout.times, layout.times[1:], strict=False))
    assert layout.times[0] >= 0 and layout.times[-1] < duration
    assert layout.pace <= MAX_PACE + 1e-9


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.sampled_from(list("[]:.0123456789 abcXYZ\n\t,'-#+") + ["ar", "offset", "Verse", "00:"]),
        max_size=80,
    )
)
def test_lrc_parser_raises_only_invalid_lyrics(pieces):
    text = "".join(pieces)
    try:
        parsed = parse_lrc(text)
    except InvalidLyrics as exc:
        assert exc.code == "INVALID_LYRICS" and "line" in exc.message
        return
    if parsed.timed:
        times = [ln.time_s for ln in parsed.lines]
        assert times == sorted(times) and all(t >= 0 for t in times)


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=80))
def test_frontend_raises_only_documented_errors(frontend, text):
    try:
        out = frontend.encode(text, FULL, 150)
    except InvalidLyrics:
        return
    assert out.tokens.shape == (FULL.frames_for(150),)
