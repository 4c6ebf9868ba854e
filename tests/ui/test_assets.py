"""The web UI's files: the official example lyrics and style keywords shipped unchanged (pinned, and equal
to the official copies in ../shared), no resource from another site (no CDN at run time), and every
file the page and its modules load present."""

from __future__ import annotations

import hashlib
import re

import pytest

from tests.conftest import ASSETS, ROOT

UI = ROOT / "ui"
PINNED = {
    "eg_cn.lrc": "9eb1f1ccccc3845d01bfbcc7f2eb5298879d870501cfe12e9da5894e893ef108",
    "eg_cn_full.lrc": "802cb5704398395d97e105f110bdeac606eb2cacad60fedf0ec16ed838beb858",
    "eg_en.lrc": "d25bd2cfd19a0288e6a6cc2831ae587349cc4cffc7582c35f31dab5d4becd3f9",
    "eg_en_full.lrc": "e4ebf45efc7f7cbca282220a774a01c8d9d6843822bb7efaaf2958dce5b28215",
    "music_prompt_keywords.json": "93fce3de62cf6fadeb15e81fc9481d09ca983e74113b2d9828ed349996b0adfc",
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_official_files_are_shipped_unchanged(name, shared_dir):
    shipped = (UI / "official" / name).read_bytes()
    assert hashlib.sha256(shipped).hexdigest() == PINNED[name]
    assert shipped == (ASSETS / "examples" / name).read_bytes()


def test_the_page_loads_nothing_from_other_sites_and_every_file_it_names_exists():
    sources = [UI / "index.html", UI / "style.css", *sorted((UI / "js").glob("*.js"))]
    for path in sources:
        text = path.read_text()
        assert not re.search(r"https?://", text), f"{path.name} names another site"
    index = (UI / "index.html").read_text()
    for ref in re.findall(r'(?:src|href)="(/ui/[^"]+)"', index):
        assert (UI / ref.removeprefix("/ui/")).is_file(), ref
    for js in (UI / "js").glob("*.js"):
        for ref in re.findall(r'from "\./([^"]+)"', js.read_text()):
            assert (UI / "js" / ref).is_file(), (js.name, ref)
        for ref in re.findall(r"/ui/official/(\$\{[^}]+\}|[\w.]+)", js.read_text()):
            assert ref.startswith("${") or (UI / "official" / ref).is_file(), ref
    examples = re.findall(r'<option value="([\w.]+\.lrc)"', index)
    assert examples and all((UI / "official" / e).is_file() for e in examples)
