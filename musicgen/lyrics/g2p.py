"""A lyric line to phone ids of the official vocabulary (`g2p/vocab.json`, 363 phones).

A line is split by script as the official `chn_eng_g2p` does it (runs of Latin letters, runs of CJK
ideographs; other characters join the run they follow, or the next run at the start of a line) and
each run goes through its language's g2p.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from musicgen.lyrics.g2p_en import english_to_phones
from musicgen.lyrics.g2p_zh import MandarinG2P


def _script(ch: str) -> str:
    if "\u4e00" <= ch <= "\u9fa5":
        return "zh"
    if "A" <= ch <= "Z" or "a" <= ch <= "z":
        return "en"
    return "other"


def has_mandarin(text: str) -> bool:
    return any(_script(ch) == "zh" for ch in text)


def unsupported_letters(text: str) -> list[str]:
    """Letters of scripts the model was not trained on (Latin and CJK ideographs are supported)."""
    bad = []
    for ch in text:
        if ch.isalpha() and _script(ch) == "other" and not _is_latin(ch) and ch not in bad:
            bad.append(ch)
    return bad


def _is_latin(ch: str) -> bool:
    return "LATIN" in unicodedata.name(ch, "")


def split_scripts(text: str) -> list[tuple[str, str]]:
    """[(segment, 'en' | 'zh' | 'other')], the official segmentation."""
    segments: list[tuple[str, str]] = []
    current, lang = "", ""
    for i, ch in enumerate(text):
        kind = _script(ch)
        if i == 0:
            current, lang = ch, kind
        elif lang == "other":  # leading punctuation/digits join whatever script comes next
            current += ch
            lang = kind
        elif kind in (lang, "other"):
            current += ch
        else:
            segments.append((current, lang))
            current, lang = ch, kind
    segments.append((current, lang))
    return segments


@dataclass(frozen=True)
class LinePhones:
    phones: str  # '|'-separated, as the official front end prints them
    ids: list[int]  # vocabulary ids (model ids are these + 1)
    dropped: list[str]  # phones that are not in the vocabulary (the official code drops them silently)


class PhoneTokenizer:
    """`g2p_dir` holds vocab.json and the Mandarin tables (the layout of the official data files).
    The optional Mandarin lexicon and polyphone model are looked up there too unless given."""

    def __init__(
        self, g2p_dir: str | Path, *, lexicon: Path | None = None, polyphone_model: Path | None = None
    ):
        self.g2p_dir = Path(g2p_dir)
        self.lexicon = lexicon or self.g2p_dir / "chinese_lexicon.txt"
        self.polyphone_model = polyphone_model or self.g2p_dir / "g2p_chinese_model" / "poly_bert_model.onnx"
        self.phone2id: dict[str, int] = json.loads((self.g2p_dir / "vocab.json").read_text(encoding="utf-8"))[
            "vocab"
        ]
        self.id2phone = {v: k for k, v in self.phone2id.items()}
        self._mandarin: MandarinG2P | None = None

    @property
    def mandarin(self) -> MandarinG2P:
        """Built on first use: English-only callers never pay for jieba and the tables."""
        if self._mandarin is None:
            self._mandarin = MandarinG2P(self.g2p_dir, self.lexicon, self.polyphone_model)
        return self._mandarin

    def _segment_phones(self, segment: str, lang: str, line: str) -> str:
        if lang == "en":
            return english_to_phones(segment)
        if lang == "zh":
            return self.mandarin.phones(segment)
        # no letters at all: the official code crashes here; digits still read as English words
        if any(ch.isdigit() for ch in segment):
            return english_to_phones(segment)
        return ""

    def line(self, text: str) -> LinePhones:
        segments = split_scripts(text)
        all_phones, ids, dropped = "", [], []
        for index, (segment, lang) in enumerate(segments):
            phones = self._segment_phones(segment, lang, text)
            seg_ids = []
            for p in phones.split("|"):
                if p in self.phone2id:
                    seg_ids.append(self.phone2id[p])
                elif p:
                    dropped.append(p)
            all_phones += phones + "|"
            ids += seg_ids
            # a line that ends in English ends without the trailing word break
            if lang == "en" and index == len(segments) - 1 and len(all_phones) >= 2 and all_phones[-2] == "_":
                all_phones = all_phones[:-2]
                ids = ids[:-1]
        return LinePhones(all_phones, ids, dropped)
