"""Mandarin lyrics to phones, with the official DiffRhythm front end's semantics.

Pipeline (official `chinese_to_ipa`): Arabic numerals to Chinese numerals (cn2an); punctuation
normalised and everything but ideographs and kept punctuation removed; jieba word segmentation with
the official merges (A一A, 不+word, word+儿); per word, pinyin from the official lexicon
(`chinese_lexicon.txt`) or, for the 159 polyphonic characters, from the polyphone BERT
(`poly_bert_model.onnx`); pinyin to bopomofo with tone marks (`pinyin_2_bpmf.txt`); tone sandhi (3-3,
不, 一, 儿); bopomofo to the phone set of the vocabulary.

The lexicon and the BERT are large downloads. When they are missing, pypinyin (phrase-aware) supplies
the pinyin instead, and `MandarinG2P.fallback_reasons` says so, so that callers can warn: tokens may
then differ from the official ones for some words.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

from musicgen.lyrics.g2p_en import ascii_punctuation

_CJK = re.compile("[\u4e00-\u9fff]")
TONE_MARK = {"0": "˙", "5": "˙", "1": "", "2": "ˊ", "3": "ˇ", "4": "ˋ"}
_NO_ER_SANDHI = {"女儿", "老儿", "男儿", "少儿", "小儿"}
_CHINESE_DIGITS = set("零一二三四五六七八九十")
_YI_PUNCT = "：，；。？！“”‘’':,;.?!()（）{}【】[]-~`、 "

# bopomofo -> phones, longest patterns first (order matters)
_BOPOMOFO_TO_PHONES = [
    ("ㄅㄛ", "p⁼wo"), ("ㄆㄛ", "pʰwo"), ("ㄇㄛ", "mwo"), ("ㄈㄛ", "fwo"),
    ("ㄧㄢ", "|jɛn"), ("ㄩㄢ", "|ɥæn"), ("ㄧㄣ", "|in"), ("ㄩㄣ", "|ɥn"), ("ㄧㄥ", "|iŋ"), ("ㄨㄥ", "|ʊŋ"),
    ("ㄩㄥ", "|jʊŋ"), ("ㄧㄚ", "|ia"), ("ㄧㄝ", "|iɛ"), ("ㄧㄠ", "|iɑʊ"), ("ㄧㄡ", "|ioʊ"), ("ㄧㄤ", "|iɑŋ"),
    ("ㄨㄚ", "|ua"), ("ㄨㄛ", "|uo"), ("ㄨㄞ", "|uaɪ"), ("ㄨㄟ", "|ueɪ"), ("ㄨㄢ", "|uan"), ("ㄨㄣ", "|uən"),
    ("ㄨㄤ", "|uɑŋ"), ("ㄩㄝ", "|ɥɛ"),
    ("ㄅ", "p⁼"), ("ㄆ", "pʰ"), ("ㄇ", "m"), ("ㄈ", "f"), ("ㄉ", "t⁼"), ("ㄊ", "tʰ"), ("ㄋ", "n"), ("ㄌ", "l"),
    ("ㄍ", "k⁼"), ("ㄎ", "kʰ"), ("ㄏ", "x"), ("ㄐ", "tʃ⁼"), ("ㄑ", "tʃʰ"), ("ㄒ", "ʃ"), ("ㄓ", "ts`⁼"),
    ("ㄔ", "ts`ʰ"), ("ㄕ", "s`"), ("ㄖ", "ɹ`"), ("ㄗ", "ts⁼"), ("ㄘ", "tsʰ"), ("ㄙ", "|s"), ("ㄚ", "|a"),
    ("ㄛ", "|o"), ("ㄜ", "|ə"), ("ㄝ", "|ɛ"), ("ㄞ", "|aɪ"), ("ㄟ", "|eɪ"), ("ㄠ", "|ɑʊ"), ("ㄡ", "|oʊ"),
    ("ㄢ", "|an"), ("ㄣ", "|ən"), ("ㄤ", "|ɑŋ"), ("ㄥ", "|əŋ"), ("ㄦ", "əɹ"), ("ㄧ", "|i"), ("ㄨ", "|u"),
    ("ㄩ", "|ɥ"), ("ˉ", "→|"), ("ˊ", "↑|"), ("ˇ", "↓↑|"), ("ˋ", "↓|"), ("˙", "|"),
]  # fmt: skip


def normalize_mandarin(text: str) -> str:
    text = re.sub(r"\s+", "", ascii_punctuation(text))
    text = re.sub(r"[^\u4e00-\u9fff\s_,\.\?!;:\'…]", "", text)
    return re.sub(r"\s*([,\.\?!;:\'…])\s*", r"\1", text)


def _change_tone(bpmf: str, tone: str) -> str:
    return (bpmf[:-1] if bpmf and bpmf[-1] in "˙ˊˇˋ" else bpmf) + tone


def _er_sandhi(word: str, b: list[str]) -> list[str]:
    if len(word) > 1 and word[-1] == "儿" and word not in _NO_ER_SANDHI:
        b[-1] = _change_tone(b[-1], "˙")
    return b


def _bu_sandhi(word: str, b: list[str]) -> list[str]:
    if set(word) == {"不"} or word == "不字":
        return b
    if len(word) == 3 and word[1] == "不" and b[1][:-1] == "ㄅㄨ":
        b[1] = b[1][:-1] + "˙"
        return b
    for i, ch in enumerate(word):
        if ch == "不" and i + 1 < len(b) and i + 1 < len(word) and b[i + 1] and b[i + 1][-1] == "ˋ":
            b[i] = b[i][:-1] + "ˊ"
    return b


def _yi_sandhi(word: str, b: list[str]) -> list[str]:
    if "一" in word and any(ch.isnumeric() for ch in word if ch != "一"):  # numbers: 一 keeps tone 1
        for i in range(len(word)):
            if i == 0 and word[0] == "一" and len(word) > 1 and word[1] not in _CHINESE_DIGITS:
                b[0] = _change_tone(b[0], "ˊ" if b[0] and b[1] and b[1][-1] in ("ˋ", "˙") else "ˋ")
            elif word[i] == "一":
                b[i] = _change_tone(b[i], "")
        return b
    if len(word) == 3 and word[1] == "一" and word[0] == word[-1]:
        b[1] = _change_tone(b[1], "˙")
    elif word.startswith("第一"):
        b[1] = _change_tone(b[1], "")
    elif word.startswith(("一月", "一日", "一号")):
        b[0] = _change_tone(b[0], "")
    else:
        for i, ch in enumerate(word):
            if ch == "一" and i + 1 < len(word):
                if len(b) > i + 1 and b[i + 1] and b[i + 1][-1] == "ˋ":
                    b[i] = _change_tone(b[i], "ˊ")
                elif word[i + 1] not in _YI_PUNCT:
                    b[i] = _change_tone(b[i], "ˋ")
    return b


def _merge_yi(words: list[str]) -> list[str]:
    merged: list[str] = []
    for i, w in enumerate(words):  # A 一 A -> A一A
        if 0 < i < len(words) - 1 and w == "一" and words[i - 1] == words[i + 1]:
            if i - 1 < len(merged):
                merged[i - 1] = merged[i - 1] + "一" + merged[i - 1]
            else:
                merged += [w, words[i + 1]]
        elif i >= 2 and words[i - 1] == "一" and words[i - 2] == w:
            continue
        else:
            merged.append(w)
    out: list[str] = []
    for w in merged:  # a lone 一 joins the next word
        if out and out[-1] == "一":
            out[-1] += w
        else:
            out.append(w)
    return out


def _merge_bu(words: list[str]) -> list[str]:
    out, last = [], ""
    for w in words:
        if w != "不":
            out.append(last + w if last == "不" else w)
        last = w
    return out


def _merge_er(words: list[str]) -> list[str]:
    out: list[str] = []
    for i, w in enumerate(words):
        if i >= 1 and w == "儿":
            out[-1] += w
        else:
            out.append(w)
    return out


def _read_table(path: Path) -> dict[str, str]:
    table = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if "\t" in line:
            key, value = line.strip().split("\t")
            table[key] = value
    return table


class PolyphoneBert:
    """The official polyphone disambiguation model (ONNX), run on the CPU; `tables` holds its
    vocab.txt and polydict.json."""

    def __init__(self, model: Path, tables: Path):
        import onnxruntime as ort

        self.vocab = {
            t: i for i, t in enumerate((tables / "vocab.txt").read_text(encoding="utf-8").splitlines())
        }
        self.id2pinyin = json.loads((tables / "polydict.json").read_text(encoding="utf-8"))
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(model), sess_options=opts, providers=["CPUExecutionProvider"])

    def predict(self, sentence: str, index: int) -> str:
        """Pinyin with tone digit of sentence[index]."""
        import numpy as np

        unk = self.vocab.get("[UNK]", 100)
        ids = [self.vocab["[CLS]"]] + [self.vocab.get(ch, unk) for ch in sentence]
        out = self.session.run(["outputs"], {"input_ids": np.asarray([ids], dtype=np.int32)})[0]
        label = int(out[0, index].argmax()) + 1  # the model's outputs are per character (no [CLS])
        return self.id2pinyin[str(label)][2:-1]  # "乐{le4}" -> "le4"


class MandarinG2P:
    def __init__(self, g2p_dir: Path, lexicon: Path, polyphone_model: Path):
        self.pinyin_to_bopomofo = _read_table(g2p_dir / "pinyin_2_bpmf.txt")
        model_dir = g2p_dir / "g2p_chinese_model"
        self.poly_chars = set((model_dir / "polychar.txt").read_text(encoding="utf-8").split())
        self.lexicon = _read_table(lexicon) if lexicon.is_file() else None
        self.fallback_reasons: list[str] = []
        if self.lexicon is None:
            self.fallback_reasons.append(
                "the official Mandarin lexicon is missing: pinyin comes from pypinyin"
            )
        self.bert = None
        try:
            if polyphone_model.is_file():
                self.bert = PolyphoneBert(polyphone_model, model_dir)
        except Exception as exc:  # e.g. a Git LFS pointer instead of the model
            self.fallback_reasons.append(f"the polyphone model cannot be loaded ({type(exc).__name__})")
        if self.bert is None and not any("polyphone" in r for r in self.fallback_reasons):
            self.fallback_reasons.append(
                "the polyphone model is missing: polyphonic characters are read by pypinyin"
            )

    # -- pinyin sources ------------------------------------------------------------------------

    def _bpmf(self, pinyin: str) -> str | None:
        base, tone = pinyin[:-1], pinyin[-1:]
        if base in self.pinyin_to_bopomofo and tone in TONE_MARK:
            return self.pinyin_to_bopomofo[base] + TONE_MARK[tone]
        return None

    def _pypinyin(self, word: str) -> list[str]:
        from pypinyin import Style, lazy_pinyin

        out = []
        for ch, py in zip(
            word, lazy_pinyin(word, style=Style.TONE3, neutral_tone_with_five=True), strict=False
        ):
            out.append(self._bpmf(py) or ch)
        return out

    def _word_bopomofo(self, word: str, sentence: str, offset: int) -> list[str]:
        lex = self.lexicon
        if lex is not None and word in lex and word not in self.poly_chars:
            out = [self._bpmf(py) for py in lex[word].split(" ")]
            if all(out):
                return out
            from pypinyin import BOPOMOFO, lazy_pinyin

            return lazy_pinyin(word, BOPOMOFO)
        if lex is None and (self.bert is None or not any(ch in self.poly_chars for ch in word)):
            return self._pypinyin(word)  # no lexicon, and no polyphone the model could settle
        out = []
        for i, ch in enumerate(word):
            if ch in self.poly_chars:
                if self.bert is not None:
                    out.append(self._bpmf(self.bert.predict(sentence, offset + i)) or ch)
                else:
                    out.append(self._pypinyin(word)[i])
            elif lex is not None and ch in lex:
                out.append(self._bpmf(lex[ch]) or ch)
            elif lex is None:
                out.append(self._pypinyin(ch)[0])
            else:
                out.append(ch)
        return out

    # -- the official pipeline -----------------------------------------------------------------

    def bopomofo(self, text: str) -> str:
        import jieba

        jieba_ready()
        words = _merge_er(_merge_bu(_merge_yi(jieba.lcut(text, cut_all=False))))
        pieces: list[str] = []
        offset = 0
        for word in words:
            b = self._word_bopomofo(word, text, offset)
            offset += len(word)
            if len(word) == 3 and all(x and x[-1] == "ˇ" for x in (b[0], b[1], b[-1])):
                b[0], b[1] = b[0] + "ˊ", b[1] + "ˊ"  # official quirk: appended, not replaced
            if len(word) == 2 and b[0] and b[-1] and b[0][-1] == "ˇ" and b[-1][-1] == "ˇ":
                b[0] = b[0][:-1] + "ˊ"
            b = _er_sandhi(word, _yi_sandhi(word, _bu_sandhi(word, b)))
            if not _CJK.search(word):
                pieces.append("|" + word)
                continue
            b = [re.sub(r"([\u3105-\u3129])$", r"\1ˉ", x) for x in b]  # first tone is written explicitly
            pieces.append(("|" if pieces else "") + "|".join(b))
        return "".join(pieces)

    def phones(self, text: str) -> str:
        """A Mandarin segment -> '|'-separated phones."""
        import cn2an

        text = normalize_mandarin(cn2an.transform(text.strip(), "an2cn"))
        text = self.bopomofo(text)
        for a, b in _BOPOMOFO_TO_PHONES:
            text = text.replace(a, b)
        text = re.sub("([sɹ]`[⁼ʰ]?)([→↓↑ ]+|$)", r"\1ɹ\2", text)
        text = re.sub("([s][⁼ʰ]?)([→↓↑ ]+|$)", r"\1ɹ\2", text)
        text = re.sub(r"^\||[^\w\s_,\.\?!;:\'…\|→↓↑⁼ʰ`]", "", text)
        text = re.sub(r"([,\.\?!;:\'…])", r"|\1|", text)
        return re.sub(r"\|+", "|", text).rstrip("|")


@functools.cache
def jieba_ready() -> None:
    """jieba builds its prefix dictionary on first use (about a second): do it once, quietly."""
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()
