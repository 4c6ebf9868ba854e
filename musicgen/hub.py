"""Where weights and data files come from, and where they are cached.

- Model weights: Hugging Face Hub repositories, through `huggingface_hub` into the cache folder
  (`models/cache` by default), with resume and progress bars; `HF_HUB_OFFLINE=1` is honoured.
- Data files of the official repository: the small tables the front end always needs (phone
  vocabulary, Mandarin tables; ~150 KB) ship inside the package (`musicgen/data/`) and are checked
  against their pinned SHA-256 before use; the sampler's negative style embedding (pinned too) and the
  large optional files (Mandarin lexicon, polyphone model) are fetched from the official GitHub
  repository at a pinned commit into the cache, or copied from a local folder with the same layout
  (`MUSICGEN_ASSETS_DIR`).
- What each model needs comes from its family in the registry (`ModelFamily.files`, `.assets`).

The environment variables are declared and read in `musicgen.env`.

A file that is missing and cannot be fetched raises `ModelNotAvailable` naming the files and the
command that fetches them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from musicgen import env
from musicgen.errors import ModelNotAvailable

PULL_HINT = "musicgen models pull"


def cache_dir() -> Path:
    return env.cache_dir()


def hub_offline() -> bool:
    return env.hub_offline()


# ------------------------------------------------------------------------------------------------
# Hugging Face Hub files


def hub_file(repo_id: str, filename: str, *, download: bool = True, pull_target: str = "") -> Path:
    """Path of `filename` of `repo_id` in the cache, downloading it when allowed and needed."""
    from huggingface_hub import hf_hub_download

    cached = hub_file_cached(repo_id, filename)
    if cached is not None:
        return cached
    if not download or hub_offline():
        raise _missing([f"{repo_id}/{filename}"], pull_target, offline=hub_offline())
    try:
        return Path(hf_hub_download(repo_id, filename, cache_dir=str(cache_dir())))
    except Exception as exc:  # network, auth, missing repo: all end the same way for the user
        raise _missing([f"{repo_id}/{filename}"], pull_target, reason=f"{type(exc).__name__}: {exc}") from exc


def hub_snapshot(repo_id: str, *, download: bool = True, allow_patterns=None, pull_target: str = "") -> Path:
    """Local folder of a whole repository snapshot (used for MuQ-MuLan and its sub-models)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo_id,
                cache_dir=str(cache_dir()),
                allow_patterns=allow_patterns,
                local_files_only=not download or hub_offline(),
            )
        )
    except Exception as exc:
        raise _missing([repo_id], pull_target, offline=hub_offline() or not download) from exc


def hub_file_cached(repo_id: str, filename: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, filename, cache_dir=str(cache_dir()))
    return Path(cached) if isinstance(cached, str) and Path(cached).is_file() else None


def _missing(
    what: list[str], pull_target: str, *, offline: bool = False, reason: str = ""
) -> ModelNotAvailable:
    command = f"{PULL_HINT} {pull_target}".strip()
    why = " (HF_HUB_OFFLINE is set)" if offline else (f" ({reason})" if reason else "")
    return ModelNotAvailable(
        f"missing from {cache_dir()}: {', '.join(what)}{why}",
        recovery=f"fetch them with `{command}` on a machine with internet access"
        + (", or unset HF_HUB_OFFLINE" if offline else ""),
        details={"missing": what, "cache_dir": str(cache_dir())},
    )


# ------------------------------------------------------------------------------------------------
# data files of the official repository

OFFICIAL_REPO_RAW = "https://raw.githubusercontent.com/ASLP-lab/DiffRhythm"
OFFICIAL_COMMIT = "28ad63c0f096fe2ee258bcabbcf081d5d9366afd"


@dataclass(frozen=True)
class Asset:
    path: str  # inside the assets folder (the layout of ../shared/diffrhythm-assets and musicgen/data)
    source: str  # path in the official repository
    sha256: str | None  # None: not pinned (large optional files, checked for presence only)
    optional: bool = False  # the front end works without it, with a documented fallback
    bundled: bool = True  # shipped inside the package (musicgen/data); the others are fetched


_ZH = "g2p/g2p_chinese_model"
ASSETS: dict[str, Asset] = {
    a.path: a
    for a in (
        Asset("negative_style_vocal.npy", "infer/example/vocal.npy",
              "6cb7d74eb7a8eda12acb8247b21d373928301db8a8cb0db480d341799fed3ce5", bundled=False),
        Asset("g2p/vocab.json", "g2p/g2p/vocab.json",
              "0f5c44e05f79df8ae4fd77d7772950436a8bacc83d134fdf0ae3c72412b5676a"),
        Asset("g2p/pinyin_2_bpmf.txt", "g2p/sources/pinyin_2_bpmf.txt",
              "dc8b048a20cf61d04b5a36bc6939db74095719b8099269a1269023ee3e6535b4"),
        Asset(f"{_ZH}/polychar.txt", "g2p/sources/g2p_chinese_model/polychar.txt",
              "9df819e371415c23e26a2907236a0228ef93772cc698d93dc0c18844956d1011"),
        Asset(f"{_ZH}/polydict.json", "g2p/sources/g2p_chinese_model/polydict.json",
              "ec6c8bd6d223205f48a17a07720bc594c20b3eab5460175414f7ebee1e66b6b9"),
        Asset(f"{_ZH}/vocab.txt", "g2p/sources/g2p_chinese_model/vocab.txt",
              "366fe2b1318c774fd28bdea58dbcfbd6d6aeae313fdcd9063d170cdc602fd51a"),
        Asset("g2p/chinese_lexicon.txt", "g2p/sources/chinese_lexicon.txt", None, optional=True, bundled=False),
        Asset(f"{_ZH}/poly_bert_model.onnx", "g2p/sources/g2p_chinese_model/poly_bert_model.onnx",
              None, optional=True, bundled=False),
    )
}  # fmt: skip


def bundled_dir() -> Path:
    """The data files shipped inside the package (see musicgen/data/NOTICE)."""
    return Path(__file__).resolve().parent / "data"


def assets_dir() -> Path:
    """Where fetched data files go (those not shipped in the package)."""
    return cache_dir() / "diffrhythm-assets"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_verified: set[Path] = set()


def _bundled_path(asset: Asset) -> Path:
    path = bundled_dir() / asset.path
    if path not in _verified:  # a damaged install must not give silently different phones
        digest = file_sha256(path) if path.is_file() else "missing"
        if digest != asset.sha256:
            raise ModelNotAvailable(
                f"{path}: the packaged data file is {digest if digest == 'missing' else 'damaged'}"
                f" (expected SHA-256 {asset.sha256[:12]}…)",
                recovery="reinstall musicgen (scripts/setup.sh, or pip install --force-reinstall)",
            )
        _verified.add(path)
    return path


def asset_path(name: str, *, download: bool = True) -> Path:
    """Local path of an official data file: the packaged copy (verified), or for the others the
    cached copy, fetched (and verified where pinned) if needed."""
    asset = ASSETS[name]
    if asset.bundled:
        return _bundled_path(asset)
    target = assets_dir() / asset.path
    if target.is_file():
        return target
    local_source = env.assets_source()
    if local_source:
        src = local_source / asset.path
        if not src.is_file():
            raise _missing([f"{env.ASSETS_DIR.name}/{asset.path}"], "assets", reason=f"{src} does not exist")
        _install(src, target, asset)
        return target
    if not download or hub_offline():
        raise _missing([f"assets/{asset.path}"], "assets", offline=hub_offline())
    _download(f"{OFFICIAL_REPO_RAW}/{OFFICIAL_COMMIT}/{asset.source}", target, asset)
    return target


def _install(src: Path, target: Path, asset: Asset) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    shutil.copyfile(src, tmp)
    _verify_and_move(tmp, target, asset)


def _verify_and_move(tmp: Path, target: Path, asset: Asset) -> None:
    if asset.sha256 is None:
        if tmp.stat().st_size == 0:
            tmp.unlink(missing_ok=True)
            raise ModelNotAvailable(
                f"{asset.path}: the file is empty", recovery=f"run `{PULL_HINT} assets` again"
            )
    else:
        digest = file_sha256(tmp)
        if digest != asset.sha256:
            tmp.unlink(missing_ok=True)
            raise ModelNotAvailable(
                f"{asset.path}: checksum mismatch (got {digest[:12]}…, expected {asset.sha256[:12]}…)",
                recovery=f"delete it and run `{PULL_HINT} assets` again",
            )
    os.replace(tmp, target)


def _download(url: str, target: Path, asset: Asset) -> None:
    """HTTP download with resume (Range on the .part file) and a progress bar."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    have = tmp.stat().st_size if tmp.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            if have and resp.status != 206:  # server ignored the range: start over
                have = 0
            total = int(resp.headers.get("Content-Length") or 0) + have
            with (
                open(tmp, "ab" if have else "wb") as out,
                tqdm(total=total or None, initial=have, unit="B", unit_scale=True, desc=asset.path) as bar,
            ):
                for block in iter(lambda: resp.read(1 << 16), b""):
                    out.write(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError) as exc:
        raise _missing([f"assets/{asset.path}"], "assets", reason=f"download failed: {exc}") from exc
    _verify_and_move(tmp, target, asset)


# ------------------------------------------------------------------------------------------------
# what each model needs, fetched together (`musicgen models pull`) and reported (`musicgen models list`)

# MuQ-MuLan's config names its two towers, which it loads by name at construction time
_TOWER_PATTERNS = {
    "xlm-roberta": ["*.json", "*.safetensors", "*.model"],
    "muq": ["*.json", "*.safetensors"],
}


def pull_mulan(repo_id: str) -> Path:
    import json

    folder = hub_snapshot(repo_id, allow_patterns=["*.json", "*.safetensors", "*.bin"], pull_target="mulan")
    cfg = json.loads((folder / "config.json").read_text())
    for tower in (cfg["text_model"]["name"], cfg["audio_model"]["name"]):
        kind = "xlm-roberta" if "xlm-roberta" in tower else "muq"
        hub_snapshot(tower, allow_patterns=_TOWER_PATTERNS[kind], pull_target="mulan")
    return folder


def pull_assets(include_optional: bool = True) -> list[Path]:
    """Fetch the data files that do not ship with the package. A required one that cannot be had
    raises; an optional one is reported, not fatal."""
    got = []
    for name, asset in ASSETS.items():
        if asset.bundled or (asset.optional and not include_optional):
            continue
        if not asset.optional:
            got.append(asset_path(name))
            continue
        try:
            got.append(asset_path(name))
        except ModelNotAvailable as exc:
            print(
                f"warning: optional {name} not fetched ({exc.message}); the front end falls back without it"
            )
    return got


def _asset_at_hand(name: str) -> bool:
    """In the cache or the local source: usable without a download."""
    local_source = env.assets_source()
    return (assets_dir() / ASSETS[name].path).is_file() or bool(
        local_source and (local_source / ASSETS[name].path).is_file()
    )


def optional_asset(name: str) -> Path | None:
    """An optional data file if it is in the cache or the local source; never downloads."""
    return asset_path(name) if _asset_at_hand(name) else None


def _requirements(spec) -> list[tuple[str, str, bool]]:
    """(kind, what, cached now) for every file a model needs, as its family lists them; no network."""
    from musicgen.registry import MULAN_REPO

    if spec.untrained:  # built locally with all it needs, its own negative style embedding included
        return [("built locally", "tiny model", (cache_dir() / spec.name / "tiny.json").is_file())]
    needed = [("assets", f"assets/{name}", _asset_at_hand(name)) for name in spec.family.assets]
    for kind, files in spec.files.items():
        needed += [(kind, f"{repo}/{f}", hub_file_cached(repo, f) is not None) for repo, f in files]
    return [*needed, ("mulan", MULAN_REPO, hub_file_cached(MULAN_REPO, "config.json") is not None)]


def model_status(spec) -> dict[str, bool]:
    status: dict[str, bool] = {}
    for kind, _, cached in _requirements(spec):
        status[kind] = status.get(kind, True) and cached
    return status


def check_cached(spec) -> None:
    """Raise one error naming every missing file of `spec` (assets with a local source count as present).
    An untrained tiny model needs nothing: it is built locally when it is loaded."""
    if spec.untrained:
        return
    missing = [what for _, what, cached in _requirements(spec) if not cached]
    if missing:
        raise _missing(missing, spec.name, offline=hub_offline())
