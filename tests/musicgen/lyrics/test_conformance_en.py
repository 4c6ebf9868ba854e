"""The English front end against the official code's outputs (../shared/conformance/g2p-en)."""

from __future__ import annotations

import json

import pytest

from musicgen.lyrics.frontend import LyricsFrontEnd
from musicgen.lyrics.g2p import PhoneTokenizer
from musicgen.lyrics.g2p_en import espeak_version
from musicgen.registry import MODELS
from tests.conftest import ASSETS

CASE_MODEL = {"base_95s": "diffrhythm-1.2-base", "full_150s": "diffrhythm-1.2-full"}


@pytest.fixture(scope="module")
def expected(shared_dir):
    return json.loads((shared_dir / "conformance/g2p-en/expected.json").read_text())


@pytest.fixture(scope="module")
def frontend():
    return LyricsFrontEnd(PhoneTokenizer(ASSETS / "g2p"))


def test_espeak_is_the_pinned_version(expected):
    assert espeak_version() == expected["espeak_ng"] == "1.51", (
        "install Debian's espeak-ng 1.51 (scripts/setup.sh)"
    )


def test_every_line_matches(expected, frontend, shared_dir):
    lines = (shared_dir / "conformance/g2p-en/lines.txt").read_text().splitlines()
    assert set(lines) == set(expected["lines"])
    for line in lines:
        got = frontend.tokenizer.line(line)
        assert got.phones == expected["lines"][line]["phones"], line
        assert [i + 1 for i in got.ids] == expected["lines"][line]["model_ids"], line


@pytest.mark.parametrize("case", sorted(CASE_MODEL))
def test_lrc_frames_match(expected, frontend, shared_dir, case):
    want = expected["lrc"][case]
    spec = MODELS[CASE_MODEL[case]]
    assert spec.max_frames == want["max_frames"]
    got = frontend.encode(
        (shared_dir / "conformance/g2p-en/song.lrc").read_text(), spec, want["audio_length_s"]
    )
    assert got.end_frame == want["end_frame"]
    assert got.song_duration == want["song_duration"]
    assert got.tokens.tolist() == want["frames"]
