"""Lyrics front end throughput and cold start, in one fresh process.

    python benchmarks/frontend.py [--assets ../shared/diffrhythm-assets] [--repeat 20]

Cold start = the first line of each language, which pays for espeak-ng (English) or jieba's prefix
dictionary and the Mandarin tables (Mandarin). Throughput = lines per second afterwards.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from musicgen.lyrics.frontend import LyricsFrontEnd
from musicgen.lyrics.g2p import PhoneTokenizer
from musicgen.lyrics.lrc import parse_lrc
from musicgen.registry import MODELS

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ASSETS = ROOT.parent / "shared" / "diffrhythm-assets"


def lines_of(path: Path) -> list[str]:
    return [ln.text for ln in parse_lrc(path.read_text(encoding="utf-8")).lines if ln.text]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assets", type=Path, default=DEFAULT_ASSETS)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()

    en = lines_of(args.assets / "examples" / "eg_en_full.lrc")
    zh = lines_of(args.assets / "examples" / "eg_cn_full.lrc")
    tok = PhoneTokenizer(args.assets / "g2p")

    rows = []
    for name, lines in (("English", en), ("Mandarin", zh)):
        t0 = time.perf_counter()
        tok.line(lines[0])
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.repeat):
            for line in lines:
                tok.line(line)
        rate = args.repeat * len(lines) / (time.perf_counter() - t0)
        rows.append((name, len(lines), cold, rate))

    fe = LyricsFrontEnd(tok)
    lrc = (args.assets / "examples" / "eg_en_full.lrc").read_text(encoding="utf-8")
    t0 = time.perf_counter()
    for _ in range(args.repeat):
        fe.encode(lrc, MODELS["diffrhythm-1.2-full"], 285)
    song_ms = 1000 * (time.perf_counter() - t0) / args.repeat

    print(f"{'language':>9} | {'lines':>5} | {'cold start s':>12} | {'lines/s warm':>12}")
    print("-" * 48)
    for name, n, cold, rate in rows:
        print(f"{name:>9} | {n:>5} | {cold:>12.3f} | {rate:>12.1f}")
    print(f"whole song (eg_en_full.lrc, {len(en)} lines -> 6136 frames, full model): {song_ms:.1f} ms")
    print(f"Mandarin fallbacks active: {tok.mandarin.fallback_reasons or 'none'}")


if __name__ == "__main__":
    main()
