"""Mandarin and mixed lines on the official example files, with and without the polyphone model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from musicgen.lyrics.frontend import LyricsFrontEnd
from musicgen.lyrics.g2p import PhoneTokenizer, split_scripts
from musicgen.lyrics.lrc import parse_lrc
from musicgen.registry import MODELS
from tests.conftest import ASSETS

EXAMPLES = ["eg_cn.lrc", "eg_cn_full.lrc", "edit_cn.lrc", "eg_en.lrc", "eg_en_full.lrc", "edit_en.lrc"]


@pytest.fixture(scope="module")
def tokenizer():
    return PhoneTokenizer(ASSETS / "g2p")


@pytest.mark.parametrize("name", EXAMPLES)
def test_official_examples_map_to_the_official_vocabulary(tokenizer, name):
    lines = [
        ln for ln in parse_lrc((ASSETS / "examples" / name).read_text(encoding="utf-8")).lines if ln.text
    ]
    assert lines
    for ln in lines:
        got = tokenizer.line(ln.text)
        assert got.ids, ln.text
        # the official 3-3-3 sandhi appends a second tone mark, which the vocabulary lacks and the official
        # code drops silently; we drop it too (same ids) and report it
        assert set(got.dropped) <= {"↑"}, (ln.text, got.dropped)
        assert all(0 <= i < len(tokenizer.phone2id) for i in got.ids)
        phones = [tokenizer.id2phone[i] for i in got.ids]
        if any("\u4e00" <= ch <= "\u9fa5" for ch in ln.text):  # Mandarin syllables carry tones
            assert any(mark in p for p in phones for mark in "→↑↓"), ln.text
        else:
            assert not any(mark in p for p in phones for mark in "→↑↓")  # English has no tone phones


def test_mandarin_phones_have_tones_and_initials(tokenizer):
    got = tokenizer.line("你好")
    # 3-3 sandhi: ni3 hao3 -> ni2 hao3
    assert got.phones == "n|i↑|x|ɑʊ↓↑|"
    assert tokenizer.line("一二三").phones == "i→|əɹ↓|s|an→|"  # 一 in numbers keeps tone 1
    assert tokenizer.line("不要").phones.startswith("p⁼|u↑|")  # 不 before tone 4 becomes tone 2


def test_mixed_lines_split_by_script(tokenizer):
    assert split_scripts("我爱你 baby, 一起走") == [("我爱你 ", "zh"), ("baby, ", "en"), ("一起走", "zh")]
    assert split_scripts("...hello") == [("...hello", "en")]
    mixed = tokenizer.line("我爱你 baby")
    assert mixed.phones.startswith("uo↓↑|aɪ↓|n|i↓↑|") and mixed.phones.endswith("b|eɪ|b|i|")


def test_frontend_warns_about_the_fallback(tokenizer):
    fe = LyricsFrontEnd(tokenizer)
    out = fe.encode(
        (ASSETS / "examples" / "eg_cn.lrc").read_text(encoding="utf-8"), MODELS["diffrhythm-1.2-base"], 95
    )
    assert any("polyphone model is missing" in w for w in out.warnings)
    assert any("lexicon is missing" in w for w in out.warnings)
    assert int((out.tokens > 0).sum()) > 100


def _writable_copy(src: Path, dst: Path) -> None:
    """Copy src so that this user can write into it: shared/ is laid without write bits, and copytree
    keeps the folders' modes (root writes anyway; a developer's user does not)."""
    shutil.copytree(src, dst, copy_function=shutil.copyfile)
    for folder in [dst, *dst.rglob("*")]:
        if folder.is_dir():
            folder.chmod(0o755)


def _tiny_polyphone_model(folder, label: int, num_labels: int):
    """An ONNX model with the official interface (input_ids int32 [1, 1+n] -> outputs [1, n, labels])
    that always predicts `label` (1-based, as polydict.json counts)."""

    class Constant(torch.nn.Module):
        def forward(self, input_ids):
            logits = torch.zeros(num_labels)
            logits[label - 1] = 1.0
            chars = input_ids[:, 1:].to(torch.float32)
            return chars.unsqueeze(-1) * 0.0 + logits

    torch.onnx.export(
        Constant(),
        (torch.zeros(1, 3, dtype=torch.int32),),
        str(folder / "poly_bert_model.onnx"),
        input_names=["input_ids"],
        output_names=["outputs"],
        dynamic_axes={"input_ids": {1: "n"}},
        dynamo=False,
    )


def test_polyphone_model_is_used_when_present(tmp_path):
    g2p = tmp_path / "g2p"
    _writable_copy(ASSETS / "g2p", g2p)
    polydict = json.loads((g2p / "g2p_chinese_model" / "polydict.json").read_text(encoding="utf-8"))
    wei2 = int(next(k for k, v in polydict.items() if v == "为{wei2}"))
    _tiny_polyphone_model(g2p / "g2p_chinese_model", wei2, len(polydict))

    with_model = PhoneTokenizer(g2p)
    assert with_model.mandarin.bert is not None
    assert not any("polyphone" in r for r in with_model.mandarin.fallback_reasons)
    without = PhoneTokenizer(ASSETS / "g2p")
    # pypinyin reads 为 in 为你 as wei4; the (constant) model says wei2
    assert "|ueɪ↓|" in "|" + without.line("为你").phones
    assert "|ueɪ↑|" in "|" + with_model.line("为你").phones


def test_front_end_uses_the_optional_files_pulled_into_the_cache(tmp_path, monkeypatch):
    """The packaged tables plus a polyphone model that `musicgen models pull assets` put in the cache."""
    from musicgen.lyrics.frontend import LyricsFrontEnd

    monkeypatch.setenv("MUSICGEN_CACHE_DIR", str(tmp_path))
    assert LyricsFrontEnd.from_assets().tokenizer.mandarin.bert is None
    model_dir = tmp_path / "diffrhythm-assets" / "g2p" / "g2p_chinese_model"
    model_dir.mkdir(parents=True)
    polydict = json.loads(
        (ASSETS / "g2p" / "g2p_chinese_model" / "polydict.json").read_text(encoding="utf-8")
    )
    wei2 = int(next(k for k, v in polydict.items() if v == "为{wei2}"))
    _tiny_polyphone_model(model_dir, wei2, len(polydict))
    front = LyricsFrontEnd.from_assets()
    assert front.tokenizer.mandarin.bert is not None
    assert "|ueɪ↑|" in "|" + front.tokenizer.line("为你").phones


def test_broken_polyphone_model_falls_back(tmp_path):
    g2p = tmp_path / "g2p"
    _writable_copy(ASSETS / "g2p", g2p)
    (g2p / "g2p_chinese_model" / "poly_bert_model.onnx").write_text(
        "version https://git-lfs.github.com/spec/v1\n"
    )
    tok = PhoneTokenizer(g2p)
    assert tok.mandarin.bert is None and any("cannot be loaded" in r for r in tok.mandarin.fallback_reasons)
    assert tok.line("为你").ids
