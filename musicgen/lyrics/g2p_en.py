"""English lyrics to phones, as the official DiffRhythm front end produces them.

Steps (same semantics as the official `english_to_ipa` + `TextTokenizer`):
1. expand abbreviations (mr -> mister, ...) and numbers (inflect: 1999 -> nineteen ninety-nine,
   $12.75 -> 12 dollars, 75 cents, 1st -> first, 50% -> fifty percent, ...);
2. normalise punctuation (Chinese punctuation to ASCII, '...' to '…'), drop every other symbol;
3. phonemize with espeak-ng (en-us, no stress, punctuation kept) through phonemizer, phones joined
   by '|', words by '|_|';
4. put punctuation into its own phone, add a word break after a final sounding phone, and merge the
   phone pairs the vocabulary has as single phones (t|ɹ -> tɹ, ...) and map a few rare phones.

Phones depend on the exact espeak-ng build (Debian's 1.51; 1.52 changes e.g. "more", "four").
"""

from __future__ import annotations

import functools
import re

# -- 1. text normalisation ---------------------------------------------------------------------

_ABBREVIATIONS = [
    (re.compile(rf"\b{short}\b", re.IGNORECASE), long)
    for short, long in [
        ("mrs", "misess"),
        ("mr", "mister"),
        ("dr", "doctor"),
        ("st", "saint"),
        ("co", "company"),
        ("jr", "junior"),
        ("maj", "major"),
        ("gen", "general"),
        ("drs", "doctors"),
        ("rev", "reverend"),
        ("lt", "lieutenant"),
        ("hon", "honorable"),
        ("sgt", "sergeant"),
        ("capt", "captain"),
        ("esq", "esquire"),
        ("ltd", "limited"),
        ("col", "colonel"),
        ("ft", "fort"),
        ("etc", "et cetera"),
        ("btw", "by the way"),
    ]
]

_COMMA_NUMBER = re.compile(r"([0-9][0-9\,]+[0-9])")
_DECIMAL = re.compile(r"([0-9]+\.[0-9]+)")
_PERCENT = re.compile(r"([0-9\.\,]*[0-9]+%)")
_POUNDS = re.compile(r"£([0-9\,]*[0-9]+)")
_DOLLARS = re.compile(r"\$([0-9\.\,]*[0-9]+)")
_FRACTION = re.compile(r"([0-9]+)/([0-9]+)")
_ORDINAL = re.compile(r"[0-9]+(st|nd|rd|th)")
_NUMBER = re.compile(r"[0-9]+")


@functools.cache
def _inflect():
    import inflect

    return inflect.engine()


def _units(n: int, one: str, many: str) -> str:
    return one if n == 1 else many


def _dollars(m: re.Match) -> str:
    parts = m.group(1).split(".")
    if len(parts) > 2:
        return f" {m.group(1)} dollars "
    dollars = int(parts[0]) if parts[0] else 0
    cents = int(parts[1]) if len(parts) > 1 and parts[1] else 0
    if dollars and cents:
        return f" {dollars} {_units(dollars, 'dollar', 'dollars')}, {cents} {_units(cents, 'cent', 'cents')} "
    if dollars:
        return f" {dollars} {_units(dollars, 'dollar', 'dollars')} "
    if cents:
        return f" {cents} {_units(cents, 'cent', 'cents')} "
    return " zero dollars "


def _fraction(m: re.Match) -> str:
    num, den = int(m.group(1)), int(m.group(2))
    words = _inflect().number_to_words
    if (num, den) == (1, 2):
        return " one half "
    if (num, den) == (1, 4):
        return " one quarter "
    if den == 2:
        return f" {words(num)} halves "
    if den == 4:
        return f" {words(num)} quarters "
    return f" {words(num)} {_inflect().ordinal(words(den))} "


def _number(m: re.Match) -> str:
    num = int(m.group(0))
    words = _inflect().number_to_words
    if 1000 < num < 3000:  # read years as years
        if num == 2000:
            return " two thousand "
        if 2000 < num < 2010:
            return f" two thousand {words(num % 100)} "
        if num % 100 == 0:
            return f" {words(num // 100)} hundred "
        return " " + words(num, andword="", zero="oh", group=2).replace(", ", " ") + " "
    return " " + words(num, andword="") + " "


def normalize_english(text: str) -> str:
    for pattern, replacement in _ABBREVIATIONS:
        text = pattern.sub(replacement, text)
    text = _COMMA_NUMBER.sub(lambda m: m.group(1).replace(",", ""), text)
    text = _POUNDS.sub(r"\1 pounds", text)
    text = _DOLLARS.sub(_dollars, text)
    text = _FRACTION.sub(_fraction, text)
    text = _DECIMAL.sub(lambda m: m.group(1).replace(".", " point "), text)
    text = _PERCENT.sub(lambda m: m.group(1).replace("%", " percent "), text)
    text = _ORDINAL.sub(lambda m: " " + _inflect().number_to_words(m.group(0)) + " ", text)
    return _NUMBER.sub(_number, text)


# -- 2./3. punctuation and espeak ----------------------------------------------------------------

PUNCTUATION = ",.?!;:'…"
# CJK and typographic punctuation to the ASCII marks the vocabulary has (the Mandarin g2p uses it too)
PUNCT_MAP = [
    ("，", ","), ("。", "."), ("！", "!"), ("？", "?"), ("；", ";"), ("：", ":"), ("、", ","),
    ("‘", "'"), ("’", "'"), ("⋯", "…"), ("···", "…"), ("・・・", "…"), ("...", "…"),
]  # fmt: skip


def ascii_punctuation(text: str) -> str:
    for a, b in PUNCT_MAP:
        text = text.replace(a, b)
    return text


_NOT_KEPT = re.compile(r"[^\w\s_,\.\?!;:\'…]")
_SPACE_AROUND_PUNCT = re.compile(r"\s*([,\.\?!;:\'…])\s*")
_PUNCT_PHONE = re.compile(r"([,\.\?!;:\'…])")


def normalize_punctuation(line: str) -> str:
    line = _NOT_KEPT.sub("", ascii_punctuation(line.strip()))
    line = _SPACE_AROUND_PUNCT.sub(r"\1", line)
    return re.sub(r"\s+", " ", line)


@functools.cache
def espeak_backend(language: str = "en-us"):
    """The phonemizer espeak backend, created once per process (espeak initialisation is slow)."""
    from phonemizer.backend import EspeakBackend

    return EspeakBackend(
        language,
        punctuation_marks=PUNCTUATION,
        preserve_punctuation=True,
        with_stress=False,
        tie=False,
        language_switch="remove-flags",
        words_mismatch="ignore",
    )


def espeak_version() -> str:
    return ".".join(str(x) for x in espeak_backend().version())


def phonemize(text: str, language: str = "en-us") -> str:
    from phonemizer.separator import Separator

    out = espeak_backend(language).phonemize(
        [normalize_punctuation(text)],
        separator=Separator(word="|_|", syllable="-", phone="|"),
        strip=True,
        njobs=1,
    )
    phones = _PUNCT_PHONE.sub(r"|\1|", "\n".join(out))
    return re.sub(r"\|+", "|", phones).rstrip("|")


# -- 4. phone fix-ups ------------------------------------------------------------------------------

_SOUNDING_END = "p⁼ʰmftnlkxʃs`ɹaoəɛɪeɑʊŋiuɥwæjː"
_PHONE_MAP = [
    ("t|ɹ", "tɹ"),
    ("d|ɹ", "dɹ"),
    ("t|s", "ts"),
    ("d|z", "dz"),
    ("ɪ|ɹ", "ɪɹ"),
    ("ɐ", "ɚ"),
    ("ᵻ", "ɪ"),
    ("əl", "l"),
    ("x", "k"),
    ("ɬ", "l"),
    ("ʔ", "t"),
    ("n̩", "n"),
    ("oː|ɹ", "oːɹ"),
]
_PHONE_MAP_RE = [
    (re.compile(r"(^|[_|])" + re.escape(a) + r"([_|]|$)"), rf"\g<1>{b}\g<2>") for a, b in _PHONE_MAP
]


def _map_phones(phones: str) -> str:
    for pattern, replacement in _PHONE_MAP_RE:
        # repeated until stable: adjacent matches share their separator
        while pattern.search(phones):
            phones = pattern.sub(replacement, phones)
    return phones


def english_to_phones(text: str) -> str:
    """One English text segment -> '|'-separated phones, as the official english_to_ipa."""
    phones = phonemize(normalize_english(text))
    if phones and phones[-1] in _SOUNDING_END:
        phones += "|_"
    return _map_phones(phones)
