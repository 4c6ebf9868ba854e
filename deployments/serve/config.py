"""serve_config.yaml as other places deploy it: a container (Docker, the cluster launcher) and KubeRay's
RayService take the same file with the HTTP proxy listening on every interface instead of loopback.
Nothing else may differ: tests load the RayService's serveConfigV2 through Ray Serve's own schema and
compare it with `serve_config(host="0.0.0.0")`.

    python -m deployments.serve.config --host 0.0.0.0 serve_config.yaml -o /tmp/serve_config.yaml
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
SERVE_CONFIG = ROOT / "serve_config.yaml"


def serve_config(path: str | Path = SERVE_CONFIG, *, host: str | None = None) -> dict:
    """The config as a dict, checked by Ray Serve's schema; `host` replaces http_options.host (with a
    host other than loopback, `auth: auto` requires API keys: see deployments/service/settings.py)."""
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(Path(path).read_text())
    if host is not None:
        config = copy.deepcopy(config)
        config.setdefault("http_options", {})["host"] = host
    ServeDeploySchema.model_validate(config)  # raises, naming the field, on a config Serve would refuse
    return config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", default=str(SERVE_CONFIG))
    ap.add_argument("--host", help="where the HTTP proxy listens (0.0.0.0 in a container or a pod)")
    ap.add_argument("-o", "--output", help="write here (default: stdout)")
    args = ap.parse_args(argv)
    text = yaml.safe_dump(serve_config(args.config, host=args.host), sort_keys=False)
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
