"""`musicgen` command line: generate songs, fetch and list weights.

    musicgen generate --lyrics song.lrc --style "upbeat pop, female vocals" --takes 2 --format mp3
    musicgen generate --lyrics song.lrc --ref-audio ref.wav --model diffrhythm-1.2-full --duration 180
    musicgen models pull diffrhythm-1.2-base
    musicgen models list
    musicgen keys create alice          # the service's API keys (needs the serve extras)

Errors are printed as one line with their code and a hint; no traceback (set MUSICGEN_DEBUG=1 for one).
"""

from __future__ import annotations

import argparse
import importlib
import json
import secrets
import sys
import time
from pathlib import Path

from musicgen import env
from musicgen.errors import InvalidParameter, MusicgenError

EXIT_USAGE, EXIT_ERROR, EXIT_INTERRUPTED = 2, 1, 130
# Commands implemented outside the library (the service's `keys` talks to Redis, which musicgen never
# imports): name -> (module, help). The module has `main(argv, prog) -> int`, and is imported only when
# its command runs; it parses its own arguments.
PLUGIN_COMMANDS = {
    "keys": ("deployments.service.keys", "create, list and revoke the service's API keys"),
}


def _parse_segments(text: str) -> tuple[tuple[float, float], ...]:
    try:
        value = json.loads(text)
        segments = tuple((float(a), float(b)) for a, b in value)
    except (ValueError, TypeError):
        raise InvalidParameter(
            f"cannot read --edit-segments {text!r}",
            recovery='write segments as JSON seconds, e.g. "[[0,25],[50,-1]]" (-1: start or end of the song)',
        ) from None
    if not segments:
        raise InvalidParameter("--edit-segments is empty", recovery="give at least one [start, end] segment")
    return segments


def build_parser() -> argparse.ArgumentParser:
    from musicgen.audio import OUTPUT_FORMATS
    from musicgen.pipelines.base import MAX_TAKES
    from musicgen.registry import DEFAULT_MODEL, MODELS, family_defaults

    parser = argparse.ArgumentParser(prog="musicgen", description="DiffRhythm song generation")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a song")
    gen.add_argument(
        "--lyrics", type=Path, help="LRC lyrics file ([mm:ss.xx] per line); omit for an instrumental"
    )
    style = gen.add_mutually_exclusive_group(required=True)
    style.add_argument("--style", help="text style prompt, e.g. 'jazzy piano ballad, male vocals'")
    style.add_argument("--ref-audio", type=Path, help="reference song (>= 10 s) whose style to follow")
    gen.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(MODELS))
    gen.add_argument("--duration", type=float, help="song length in seconds (base: 95; full: 96 to 285)")
    gen.add_argument(
        "--seed", type=int, help="take i uses seed + i (default: random, recorded in the sidecar)"
    )
    gen.add_argument("--takes", type=int, default=1, help=f"number of takes, 1 to {MAX_TAKES} (one batch)")
    gen.add_argument("--steps", type=int, default=None,
                     help=f"sampling steps (default: the model's official one: {family_defaults('steps')})")  # fmt: skip
    gen.add_argument("--cfg", type=float, default=None, help="classifier-free guidance strength "
                     f"(default: {family_defaults('cfg_strength')})")  # fmt: skip
    gen.add_argument("--format", default="wav", choices=sorted(OUTPUT_FORMATS))
    gen.add_argument("--out", type=Path, default=Path("outputs"), help="output folder")
    gen.add_argument("--name", help="file name stem (default: song-<time>)")
    gen.add_argument("--edit-audio", type=Path, help="song to edit (regenerate --edit-segments of it)")
    gen.add_argument("--edit-segments", help='JSON seconds to regenerate, e.g. "[[0,25],[50,-1]]"')
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    gen.add_argument("--dtype", default="auto", help="auto (bf16 on GPUs, fp32 on CPU), fp32, bf16 or fp16")
    gen.add_argument("--plan", default="auto", choices=["auto", "batched", "sequential", "parallel", "graphs"],
                     help="how a sampling step's rows run: auto = in parallel on CPU (threads split among "
                     "the rows), batched with a CUDA graph on CUDA, batched elsewhere")  # fmt: skip
    gen.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                     help="torch.compile the DiT: auto = on CUDA only (the first song compiles for seconds)")  # fmt: skip
    gen.add_argument("--offline", action="store_true", help="never download; fail if weights are missing")
    gen.add_argument("--quiet", action="store_true", help="no progress bars")

    models = sub.add_parser("models", help="fetch or list model weights")
    msub = models.add_subparsers(dest="models_command", required=True)
    pull = msub.add_parser("pull", help="download a model's files into the cache")
    pull.add_argument(
        "names", nargs="*", default=[DEFAULT_MODEL], help="model names, 'mulan', 'vae', 'assets' or 'all'"
    )
    msub.add_parser("list", help="list models and what is cached")
    for name, (_, text) in PLUGIN_COMMANDS.items():  # listed in --help; main() runs them
        sub.add_parser(name, help=text, add_help=False)
    return parser


def cmd_generate(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from musicgen import __version__, hub
    from musicgen.audio import write_audio
    from musicgen.lyrics.frontend import LyricsFrontEnd
    from musicgen.pipelines import EditSpec, Pipeline, SongRequest
    from musicgen.registry import get_model_spec

    spec = get_model_spec(args.model)
    seconds = args.duration if args.duration is not None else spec.min_seconds
    spec.check_duration(seconds)
    if (args.edit_audio is None) != (args.edit_segments is None):
        raise InvalidParameter(
            "--edit-audio and --edit-segments go together", recovery="give both, or neither"
        )
    lyrics = ""
    if args.lyrics is not None:
        try:
            lyrics = args.lyrics.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidParameter(
                f"cannot read lyrics file {args.lyrics}: {exc}", recovery="give a UTF-8 LRC file"
            ) from None
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    steps = args.steps if args.steps is not None else spec.default_steps
    cfg = args.cfg if args.cfg is not None else spec.default_cfg
    edit = EditSpec(args.edit_audio, _parse_segments(args.edit_segments)) if args.edit_audio else None
    if args.ref_audio is not None:  # check the clip before loading any weights
        from musicgen.model.style import check_reference_audio

        check_reference_audio(args.ref_audio)

    download = not args.offline
    if not download or hub.hub_offline():  # name every missing file at once, before any work
        hub.check_cached(spec)
    t0 = time.perf_counter()
    frames = LyricsFrontEnd.from_assets().encode(lyrics, spec, seconds)
    for w in frames.warnings:
        print(f"warning: {w}", file=sys.stderr)
    pipe = Pipeline.from_pretrained(
        args.model,
        device=args.device,
        dtype=args.dtype,
        download=download,
        plan=args.plan,
        compile=args.compile,
    )
    load_s = time.perf_counter() - t0
    if spec.untrained:
        print("note: the tiny model is UNTRAINED: its output is noise, for testing only", file=sys.stderr)

    request = SongRequest(
        tokens=frames.tokens,
        song_duration=frames.song_duration,
        style_prompt=args.style,
        reference_audio=args.ref_audio,
        seed=seed,
        num_takes=args.takes,
        steps=steps,
        cfg_strength=cfg,
        edit=edit,
        duration_s=seconds,
    )
    bars: dict[str, tqdm] = {}

    def on_progress(p):
        if args.quiet:
            return
        if p.stage not in bars:  # a new stage: finish the previous bar first
            for bar in bars.values():
                bar.close()
            total = p.total if p.stage == "sampling" else 1
            bars[p.stage] = tqdm(
                total=total, desc=p.stage.replace("_", " "), unit="step" if p.total else "stage"
            )
        bar = bars[p.stage]
        bar.update((p.step if p.stage == "sampling" else int(p.fraction >= 1)) - bar.n)

    try:
        result = pipe.generate(request, progress=on_progress)
    finally:
        for bar in bars.values():
            bar.close()

    stem = args.name or time.strftime("song-%Y%m%d-%H%M%S")
    t1 = time.perf_counter()
    files = [
        str(
            write_audio(
                args.out / f"{stem}-take{i + 1}.{args.format}", audio, result.sample_rate, args.format
            )
        )
        for i, audio in enumerate(result.audio)
    ]
    timings = {"load_s": load_s, **result.timings, "write_s": time.perf_counter() - t1}
    sidecar = {
        "musicgen_version": __version__,
        "model": spec.name,
        "untrained_model": spec.untrained,
        "files": files,
        "seeds": result.seeds,
        "parameters": {
            "duration_s": seconds,
            "frames": frames.end_frame,
            "song_duration": frames.song_duration,
            "seed": seed,
            "takes": args.takes,
            "steps": steps,
            "cfg_strength": cfg,
            "style_prompt": args.style,
            "reference_audio": str(args.ref_audio) if args.ref_audio else None,
            "edit_audio": str(args.edit_audio) if args.edit_audio else None,
            "edit_segments": [list(s) for s in edit.segments] if edit else None,
            "format": args.format,
            "device": str(pipe.device),
            "dtype": str(pipe.dit.dtype).removeprefix("torch."),
        },
        "lrc": frames.lrc,
        "warnings": frames.warnings,
        "sample_rate": result.sample_rate,
        "audio_seconds": result.seconds,
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "torch": torch.__version__,
    }
    sidecar_path = args.out / f"{stem}.json"
    sidecar_path.write_text(json.dumps(sidecar, indent=2, ensure_ascii=False))
    for f in files:
        print(f)
    print(sidecar_path)
    return 0


def cmd_models(args) -> int:
    from musicgen import hub
    from musicgen.model.loading import VAE_FILE
    from musicgen.registry import MODELS, MULAN_REPO, VAE_REPO, get_model_spec

    if args.models_command == "list":
        print(f"cache: {hub.cache_dir()}")
        for spec in MODELS.values():
            status = hub.model_status(spec)
            state = (
                "ready"
                if all(status.values())
                else "missing " + ", ".join(k for k, ok in status.items() if not ok)
            )
            print(
                f"{spec.name:22} {spec.min_seconds:>3}-{spec.max_seconds:<3}s  {state:32} {spec.description}"
            )
        return 0

    names = args.names
    if "all" in names:
        names = [n for n, s in MODELS.items() if not s.untrained]
    for name in names:
        if name == "assets":
            hub.pull_assets()
        elif name == "mulan":
            hub.pull_mulan(MULAN_REPO)
        elif name == "vae":
            hub.hub_file(VAE_REPO, VAE_FILE, pull_target="vae")
        else:
            spec = get_model_spec(name)
            if spec.untrained:
                spec.family.build_tiny(hub.cache_dir() / spec.name)  # built locally, with all it needs
                continue
            print(f"pulling {name} ({spec.repo_id}) into {hub.cache_dir()}")
            for files in spec.files.values():  # its family's: checkpoint (and VAE)
                for repo, file in files:
                    hub.hub_file(repo, file, pull_target=name)
            hub.pull_mulan(MULAN_REPO)
            hub.pull_assets()
    print("done")
    return 0


def run_plugin(name: str, argv: list[str]) -> int:
    module_name = PLUGIN_COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        print(f"error: `musicgen {name}` needs {exc.name!r}, which is not installed\n"
              "  hint: install the service's packages: EXTRAS=serve,test scripts/setup.sh", file=sys.stderr)  # fmt: skip
        return EXIT_ERROR
    return module.main(argv, prog=f"musicgen {name}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    plugin = argv[0] if argv and argv[0] in PLUGIN_COMMANDS else None
    args = None if plugin else build_parser().parse_args(argv)
    try:
        if plugin:
            return run_plugin(plugin, argv[1:])
        if args.command == "generate":
            return cmd_generate(args)
        return cmd_models(args)
    except MusicgenError as exc:
        if env.debug():
            raise
        print(f"error [{exc.code}]: {exc.message}\n  hint: {exc.recovery}", file=sys.stderr)
        return EXIT_USAGE if exc.code.startswith("INVALID") or exc.code == "UNSUPPORTED_MEDIA" else EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
