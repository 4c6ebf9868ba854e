"""LRC parsing and the official placement rules."""

from __future__ import annotations

import pytest

from musicgen.errors import InvalidLyrics
from musicgen.lyrics.lrc import format_time, parse_lrc
from musicgen.lyrics.timed import COMMA_ID, PERIOD_ID, place_lines


def test_timestamp_forms_and_tags():
    text = (
        "\ufeff[ar:Someone]\n[ti:Title]\n[offset:+500]\n\n[Verse 1]\n[0:10]one\n[00:12.5]two\n"
        "[00:14.25]three\n[01:02.125]four\n[Chorus]\n[00:20.00][00:40.00]again\n"
    )
    p = parse_lrc(text)
    assert p.timed and p.metadata == {"ar": "Someone", "ti": "Title", "offset": "+500"}
    got = [(round(ln.time_s, 3), ln.text, ln.section) for ln in p.lines]
    assert got == [
        (9.5, "one", "Verse 1"),
        (12.0, "two", "Verse 1"),
        (13.75, "three", "Verse 1"),
        (19.5, "again", "Chorus"),
        (39.5, "again", "Chorus"),
        (61.625, "four", "Verse 1"),
    ]


def test_same_arithmetic_as_official_parser():
    # official: int(mins) * 60 + float("ss.xx")
    assert parse_lrc("[01:05.20]x").lines[0].time_s == 1 * 60 + float("05.20")


@pytest.mark.parametrize(
    "text, match",
    [
        ("[00:75.00]x", "line 1: bad timestamp"),
        ("[00:10.00]a\n[00:05.00]b", "line 2: timestamp"),
        ("[00:10.00]a\nno stamp here", "line 2"),
        ("[abc]def", "line 1: cannot read the tag"),
    ],
)
def test_bad_lrc_names_the_line(text, match):
    with pytest.raises(InvalidLyrics, match=match):
        parse_lrc(text)


def test_plain_lyrics_are_untimed():
    p = parse_lrc("[Verse]\nfirst line\nsecond line\n")
    assert not p.timed and [ln.text for ln in p.lines] == ["first line", "second line"]


def test_placement_rules():
    lines = [(0.5, [10, 11, PERIOD_ID, 12]), (0.6, [20, 21]), (3.0, [30] * 50)]
    frames, spans = place_lines(lines, end_frame=100)
    # periods inside a line become commas, and every line ends with a period
    assert frames[10:15].tolist() == [10, 11, COMMA_ID, 12, PERIOD_ID]
    # the second line starts where the first ended (overlap pushed)
    assert spans[1] == (15, 3) and frames[15:18].tolist() == [20, 21, PERIOD_ID]
    # the last line is cut at the last frame
    assert spans[2] == (64, 36) and frames[-1].item() == 30


def test_format_time_roundtrip():
    for t in (0.0, 9.99, 61.5, 3599.99):
        assert abs(parse_lrc(format_time(t) + "x").lines[0].time_s - t) < 1e-9
