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


def test_small_data_files_ship_with_the_package_verified(tmp_path, monkeypatch, shared_dir):
    """The packaged copies are the official files (pinned SHA-256, equal to ../shared's) and need no
    cache, network or MUSICGEN_ASSETS_DIR."""
    monkeypatch.setenv("MUSICGEN_CACHE_DIR", str(tmp_path / "empty"))
    bundled = [name for name, asset in hub.ASSETS.items() if asset.bundled]
    assert len(bundled) == 5
    total = 0
    for name in bundled:
        path = hub.asset_path(name)
        assert path.is_relative_to(hub.bundled_dir())
        assert hub.file_sha256(path) == hub.ASSETS[name].sha256
        assert path.read_bytes() == (shared_dir / "diffrhythm-assets" / name).read_bytes()
        total += path.stat().st_size
    assert total < 1_000_000
    assert not (tmp_path / "empty").exists()  # nothing was copied or downloaded


def test_a_damaged_packaged_file_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / "data"
    (fake / "g2p").mkdir(parents=True)
    (fake / "g2p" / "vocab.json").write_text("{}")
    monkeypatch.setattr(hub, "bundled_dir", lambda: fake)
    with pytest.raises(ModelNotAvailable, match="damaged") as exc:
        hub.asset_path("g2p/vocab.json")
    assert "reinstall" in exc.value.recovery
    with pytest.raises(ModelNotAvailable, match="missing"):
        hub.asset_path("g2p/pinyin_2_bpmf.txt")


def test_the_negative_style_embedding_is_fetched_pinned(tmp_path, monkeypatch, shared_dir):
    """Not shipped: copied from the local source (here ../shared's, by path) into the cache and checked
    against its pinned SHA-256; a different file is refused; offline without a source, the error names
    what to pull."""
    monkeypatch.setenv("MUSICGEN_CACHE_DIR", str(tmp_path / "cache"))
    name = "negative_style_vocal.npy"
    path = hub.asset_path(name)
    assert path.is_relative_to(tmp_path / "cache")
    assert path.read_bytes() == (shared_dir / "diffrhythm-assets" / name).read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / name).write_bytes(b"not the embedding")
    monkeypatch.setenv("MUSICGEN_CACHE_DIR", str(tmp_path / "cache2"))
    monkeypatch.setenv("MUSICGEN_ASSETS_DIR", str(bad))
    with pytest.raises(ModelNotAvailable):
        hub.asset_path(name)
    monkeypatch.delenv("MUSICGEN_ASSETS_DIR")
    with pytest.raises(ModelNotAvailable) as exc:
        hub.asset_path(name)
    assert "musicgen models pull" in exc.value.recovery


def test_optional_assets_copied_from_local_source(tmp_path, monkeypatch):
    monkeypatch.setenv("MUSICGEN_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "src"
    (src / "g2p").mkdir(parents=True)
    (src / "g2p" / "chinese_lexicon.txt").write_text("你好\tni3 hao3\n")
    assert hub.optional_asset("g2p/chinese_lexicon.txt") is None
    monkeypatch.setenv("MUSICGEN_ASSETS_DIR", str(src))
    path = hub.optional_asset("g2p/chinese_lexicon.txt")
    assert path is not None and path.is_relative_to(tmp_path / "cache")
    (src / "g2p" / "chinese_lexicon.txt").write_text("")
    path.unlink()
    with pytest.raises(ModelNotAvailable, match="empty"):
        hub.asset_path("g2p/chinese_lexicon.txt")


def test_optional_assets_offline_without_source(tmp_path, monkeypatch):
    monkeypatch.setenv("MUSICGEN_CACHE_DIR", str(tmp_path))
    required = hub.asset_path("negative_style_vocal.npy")  # cached from the suite's local source
    monkeypatch.delenv("MUSICGEN_ASSETS_DIR", raising=False)
    with pytest.raises(ModelNotAvailable, match="HF_HUB_OFFLINE"):
        hub.asset_path("g2p/chinese_lexicon.txt")
    assert hub.pull_assets() == [required]  # the optional ones: reported, not fatal
    (tmp_path / "diffrhythm-assets" / "negative_style_vocal.npy").unlink()
    with pytest.raises(ModelNotAvailable, match="HF_HUB_OFFLINE"):
        hub.pull_assets()  # a required one is fatal


def test_check_cached_lists_everything_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("MUSICGEN_CACHE_DIR", str(tmp_path))
    with pytest.raises(ModelNotAvailable) as exc:
        hub.check_cached(MODELS["diffrhythm-1.2-base"])
    assert exc.value.details["missing"] == [
        "ASLP-lab/DiffRhythm-1_2/cfm_model.pt",
        "ASLP-lab/DiffRhythm-vae/vae_model.pt",
        "OpenMuQ/MuQ-MuLan-large",
    ]
