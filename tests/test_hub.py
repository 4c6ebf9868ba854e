"""Weights and data files: cache resolution, offline behaviour, verified assets."""

from __future__ import annotations

import pytest

from musicgen import hub
from musicgen.errors import ModelNotAvailable
from musicgen.registry import MODELS


def test_offline_missing_file_names_file_and_command(tmp_path, monkeypatch):
    monkeypatch.setenv("MUSICGEN_CACHE_DIR", str(tmp_path))
    with pytest.raises(ModelNotAvailable) as exc:
        hub.hub_file("ASLP-lab/DiffRhythm-1_2", "cfm_model.pt", pull_target="diffrhythm-1.2-base")
    assert "ASLP-lab/DiffRhythm-1_2/cfm_model.pt" in exc.value.message
    assert "musicgen models pull diffrhythm-1.2-base" in exc.value.recovery
    assert exc.value.code == "MODEL_NOT_LOADED"


def test_cached_hub_file_is_found_offline(tmp_path, monkeypatch):
    """A file laid out as huggingface_hub caches it is used without any network access."""
    monkeypatch.setenv("MUSICGEN_CACHE_DIR", str(tmp_path))
    snap = tmp_path / "models--ASLP-lab--DiffRhythm-vae" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "vae_model.pt").write_bytes(b"x")
    (tmp_path / "models--ASLP-lab--DiffRhythm-vae" / "refs").mkdir()
    (tmp_path / "models--ASLP-lab--DiffRhythm-vae" / "refs" / "main").write_text("a" * 40)
    assert hub.hub_file("ASLP-lab/DiffRhythm-vae", "vae_model.pt") == snap / "vae_model.pt"
    assert hub.model_status(MODELS["diffrhythm-1.2-base"])["vae"] is True


def test_assets_copied_from_local_source_and_verified(tmp_path, monkeypatch):
    monkeypatch.setenv("MUSICGEN_CACHE_DIR", str(tmp_path / "cache"))
    path = hub.asset_path("negative_style_vocal.npy")
    assert path.is_file() and path.is_relative_to(tmp_path / "cache")

    bad_src = tmp_path / "bad"
    (bad_src / "g2p").mkdir(parents=True)
    (bad_src / "g2p" / "vocab.json").write_text("{}")
    monkeypatch.setenv("MUSICGEN_ASSETS_DIR", str(bad_src))
    with pytest.raises(ModelNotAvailable, match="checksum mismatch"):
        hub.asset_path("g2p/vocab.json")
    assert not (tmp_path / "cache" / "diffrhythm-assets" / "g2p" / "vocab.json").exists()


def test_assets_offline_without_source(tmp_path, monkeypatch):
    monkeypatch.setenv("MUSICGEN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MUSICGEN_ASSETS_DIR")
    with pytest.raises(ModelNotAvailable, match="HF_HUB_OFFLINE"):
        hub.asset_path("g2p/vocab.json")


def test_check_cached_lists_everything_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("MUSICGEN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MUSICGEN_ASSETS_DIR")
    with pytest.raises(ModelNotAvailable) as exc:
        hub.check_cached(MODELS["diffrhythm-1.2-base"])
    assert exc.value.details["missing"] == [
        "ASLP-lab/DiffRhythm-1_2/cfm_model.pt",
        "ASLP-lab/DiffRhythm-vae/vae_model.pt",
        "OpenMuQ/MuQ-MuLan-large",
        "assets/negative_style_vocal.npy",
        "assets/g2p/vocab.json",
        "assets/g2p/pinyin_2_bpmf.txt",
        "assets/g2p/g2p_chinese_model/polychar.txt",
        "assets/g2p/g2p_chinese_model/polydict.json",
        "assets/g2p/g2p_chinese_model/vocab.txt",
    ]
