"""MP3 encoders side by side: speed (CPU seconds, times real time) and quality against the WAV.

    .venv/bin/python benchmarks/encoding.py                       # 285 s of the reference song, stereo
    .venv/bin/python benchmarks/encoding.py --input song.wav --seconds 120 --plot benchmarks/encoding.png

Candidates: libsndfile's MP3 (its default VBR, what the service used before) and LAME through lameenc
at several quality settings (-q 2 best ... 7 fast) and constant bit rates. Quality is measured on the
decoded stream (libsndfile/mpg123), aligned to the WAV by cross-correlation (LAME adds a 1105-sample
delay when no gapless header is written):
  SNR      signal-to-noise ratio of the decoded audio (higher is better)
  log-mel  mean absolute difference of 64 log-mel band energies up to 16 kHz, in dB (lower is better;
           close to what a listener hears as a change of timbre)
The pick: among the settings whose SNR and log-mel distance are both at least as good as the libsndfile
baseline's, those within 15% of the fastest one's speed; of these, the one closest to the WAV (a
setting that passes by a hair on one song may not on the next). musicgen.audio.encode_mp3 uses it.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_INPUT = ROOT.parent / "shared" / "diffrhythm-assets" / "examples" / "eg_cn.wav"
LAME_SETTINGS = [(2, 192), (5, 192), (7, 192), (7, 224), (7, 256), (7, 320), (7, 128)]


def load_song(path: Path, seconds: float) -> tuple[np.ndarray, int]:
    """(samples, 2) float32: a mono input goes into both channels, the second 7 ms later (so that the
    encoder's joint stereo has work to do), tiled to `seconds`."""
    x, sr = sf.read(str(path), dtype="float32", always_2d=True)
    if x.shape[1] == 1:
        x = np.concatenate([x, np.roll(x, int(0.007 * sr), axis=0)], axis=1)
    n = int(seconds * sr)
    return np.tile(x, (int(np.ceil(n / len(x))), 1))[:n, :2], sr


def libsndfile_mp3(song: np.ndarray, sr: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, song, sr, format="MP3")
    return buf.getvalue()


def lame_mp3(song: np.ndarray, sr: int, quality: int, kbps: int) -> bytes:
    from musicgen.audio import encode_mp3

    return encode_mp3(song, sr, bitrate_kbps=kbps, quality=quality)


def quality(ref: np.ndarray, data: bytes, sr: int) -> tuple[float, float, int]:
    """(SNR dB, log-mel distance dB, delay samples) of the decoded stream against `ref` (mono mix)."""
    import librosa

    out, _ = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    r, o = ref.mean(axis=1), out.mean(axis=1)
    probe = r[sr : 6 * sr]
    delays = range(0, 3000)
    delay = max(delays, key=lambda d: float(np.dot(probe, o[sr + d : 6 * sr + d])))
    n = min(len(r), len(o) - delay)
    r, o = r[:n], o[delay : delay + n]
    snr = 10 * np.log10(np.sum(r**2) / max(np.sum((r - o) ** 2), 1e-20))

    def mel(s: np.ndarray) -> np.ndarray:
        frames = np.lib.stride_tricks.sliding_window_view(s, 2048)[::1024] * np.hanning(2048)
        power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
        bank = librosa.filters.mel(sr=sr, n_fft=2048, n_mels=64, fmax=16000)
        return 10 * np.log10(power @ bank.T + 1e-8)

    return float(snr), float(np.mean(np.abs(mel(r) - mel(o)))), delay


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", type=Path, default=DEFAULT_INPUT)
    ap.add_argument("--seconds", type=float, default=285.0, help="song length to encode (285 s: the longest)")
    ap.add_argument("--quality-seconds", type=float, default=30.0, help="audio compared for quality")
    ap.add_argument("--repeat", type=int, default=3, help="encodes per candidate (median CPU time)")
    ap.add_argument("--plot", type=Path, help="write speed against quality as a PNG")
    args = ap.parse_args()

    song, sr = load_song(args.input, args.seconds)
    head = song[: int(args.quality_seconds * sr)]
    candidates = [("libsndfile default (VBR)", lambda s: libsndfile_mp3(s, sr))] + [
        (f"lameenc -q {q} CBR {kbps}k", lambda s, q=q, kbps=kbps: lame_mp3(s, sr, q, kbps))
        for q, kbps in LAME_SETTINGS
    ]
    rows = []
    print(
        f"{args.input.name}: {args.seconds:.0f} s stereo at {sr} Hz; quality on the first {args.quality_seconds:.0f} s"
    )
    for name, encode in candidates:
        times = []
        for _ in range(args.repeat):
            t0 = time.process_time()
            data = encode(song)
            times.append(time.process_time() - t0)
        cpu = statistics.median(times)
        snr, logmel, delay = quality(head, encode(head), sr)
        rows.append((name, cpu, args.seconds / cpu, len(data) * 8 / args.seconds / 1000, snr, logmel, delay))

    base = rows[0]
    passing = [r for r in rows[1:] if r[4] >= base[4] and r[5] <= base[5]]
    fastest = max((r[2] for r in passing), default=0)
    pick = min((r for r in passing if r[2] >= 0.85 * fastest), key=lambda r: r[5], default=None)
    print("\n| encoder | CPU s / take | x real time | kbps | SNR dB | log-mel dB | delay | vs baseline |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        mark = " **pick**" if r is pick else ""
        print(f"| {r[0]}{mark} | {r[1]:.2f} | {r[2]:.0f} | {r[3]:.0f} | {r[4]:.1f} | {r[5]:.2f} | {r[6]} "
              f"| {base[1] / r[1]:.1f}x faster |")  # fmt: skip
    if pick:
        print(
            f"\npick: {pick[0]} ({base[1] / pick[1]:.1f}x faster than libsndfile, SNR {pick[4] - base[4]:+.1f} dB, "
            f"log-mel {pick[5] - base[5]:+.2f} dB)"
        )
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in rows:
            ax.scatter(r[2], r[5], color="tab:red" if r is base else "tab:blue")
            ax.annotate(r[0], (r[2], r[5]), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.set_xlabel("times real time (one core)")
        ax.set_ylabel("log-mel distance to the WAV, dB (lower is better)")
        ax.set_title(f"MP3 encoders on {args.seconds:.0f} s of {args.input.name}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
