"""The `musicgen` CLI on the tiny model: files, sidecar, and one-line errors without tracebacks."""

from __future__ import annotations

import json

import pytest
import soundfile as sf

from musicgen.cli import main

LRC = "[ti:test]\n[Verse]\n[00:01.00]Hello world, this is a test.\n[00:04.50]Sing it loud\n[00:09.00]\n"


@pytest.fixture()
def lyrics(tmp_path):
    path = tmp_path / "song.lrc"
    path.write_text(LRC)
    return path


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3"])
def test_generate_writes_takes_and_sidecar(tiny_model_paths, tmp_path, lyrics, fmt, capsys):
    out = tmp_path / "out"
    rc = main(
        [
            "generate",
            "--model",
            "tiny",
            "--lyrics",
            str(lyrics),
            "--style",
            "happy pop",
            "--duration",
            "10",
            "--takes",
            "2",
            "--steps",
            "2",
            "--seed",
            "7",
            "--format",
            fmt,
            "--out",
            str(out),
            "--name",
            "t",
            "--quiet",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    meta = json.loads((out / "t.json").read_text())
    assert meta["seeds"] == [7, 8] and meta["model"] == "tiny" and meta["untrained_model"] is True
    assert meta["parameters"]["frames"] == 215 and meta["lrc"].startswith("[00:01.00]Hello world")
    assert set(meta["timings"]) >= {"load_s", "sampling_s", "decoding_s", "write_s"}
    for i in (1, 2):
        info = sf.info(str(out / f"t-take{i}.{fmt}"))
        assert info.samplerate == 44100 and info.channels == 2
        extra = info.frames - 215 * 2048  # MP3: LAME's 1105-sample delay and the last frames' padding
        assert (0 <= extra <= 1105 + 2 * 1152) if fmt == "mp3" else extra == 0


@pytest.mark.parametrize(
    "args, code, text",
    [
        (["--model", "tiny", "--duration", "200"], "INVALID_PARAMETER", "out of range"),
        (["--model", "tiny", "--lyrics", "/nonexistent.lrc"], "INVALID_PARAMETER", "cannot read lyrics"),
        (["--model", "tiny", "--ref-audio", "/nonexistent.wav"], "UNSUPPORTED_MEDIA", "does not exist"),
        (["--model", "tiny", "--edit-audio", "x.wav"], "INVALID_PARAMETER", "go together"),
        (
            ["--model", "tiny", "--edit-audio", "x.wav", "--edit-segments", "[[1,"],
            "INVALID_PARAMETER",
            "edit-segments",
        ),
        (["--model", "diffrhythm-1.2-base"], "MODEL_NOT_LOADED", "ASLP-lab/DiffRhythm-1_2/cfm_model.pt"),
    ],
)
def test_errors_are_one_clear_line(tiny_model_paths, args, code, text, capsys):
    if "--ref-audio" not in args:
        args = [*args, "--style", "pop"]
    rc = main(["generate", *args, "--quiet"])
    err = capsys.readouterr().err
    assert rc != 0
    assert f"error [{code}]" in err and text in err and "hint:" in err
    assert "Traceback" not in err


def test_missing_weights_error_names_every_file_and_the_command(tiny_model_paths, capsys):
    assert main(["generate", "--model", "diffrhythm-1.2-full", "--duration", "120", "--style", "pop"]) != 0
    err = capsys.readouterr().err
    for name in (
        "ASLP-lab/DiffRhythm-1_2-full/cfm_model.pt",
        "ASLP-lab/DiffRhythm-vae/vae_model.pt",
        "OpenMuQ/MuQ-MuLan-large",
        "musicgen models pull diffrhythm-1.2-full",
    ):
        assert name in err


def test_bad_lyrics_line_is_named(tiny_model_paths, tmp_path, capsys):
    bad = tmp_path / "bad.lrc"
    bad.write_text("[00:01.00]fine line\n[00:75.00]bad time\n")
    assert (
        main(["generate", "--model", "tiny", "--lyrics", str(bad), "--style", "pop", "--duration", "10"]) == 2
    )
    err = capsys.readouterr().err
    assert "error [INVALID_LYRICS]: line 2" in err


def test_models_list(tiny_model_paths, capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "diffrhythm-1.2-base" in out and "tiny" in out and "ready" in out


def test_generate_with_the_tiny_diffrhythm_2(offline_hub, tmp_path, capsys):
    lyrics = tmp_path / "song.txt"
    lyrics.write_text("[verse]\n[00:01.00]Hello world\n[chorus]\nSing it loud\n")
    out = tmp_path / "out"
    rc = main(["generate", "--model", "tiny-2", "--lyrics", str(lyrics), "--style", "happy pop", "--duration", "4",
               "--steps", "3", "--seed", "5", "--format", "wav", "--out", str(out), "--name", "t", "--quiet"])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "timestamps were removed" in captured.err  # LRC timestamps are dropped, with a warning
    meta = json.loads((out / "t.json").read_text())
    assert meta["model"] == "tiny-2" and meta["sample_rate"] == 48000 and meta["parameters"]["steps"] == 3
    assert meta["lrc"].splitlines() == ["[verse]", "Hello world", "[chorus]", "Sing it loud"]
    info = sf.info(str(out / "t-take1.wav"))
    assert info.samplerate == 48000 and info.channels == 2 and info.frames == 4 * 48000


def test_diffrhythm_2_missing_files_are_named_with_the_pull_command(offline_hub, capsys):
    assert main(["generate", "--model", "diffrhythm-2", "--duration", "30", "--style", "pop"]) != 0
    err = capsys.readouterr().err
    for name in ("ASLP-lab/DiffRhythm2/model.json", "ASLP-lab/DiffRhythm2/model.safetensors",
                 "ASLP-lab/DiffRhythm2/decoder.json", "ASLP-lab/DiffRhythm2/decoder.bin",
                 "OpenMuQ/MuQ-MuLan-large", "musicgen models pull diffrhythm-2"):  # fmt: skip
        assert name in err
    assert "vae_model.pt" not in err
