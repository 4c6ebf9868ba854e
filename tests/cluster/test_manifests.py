"""Every deployment manifest and config under cluster/, checked without a cloud or a Docker daemon:
the RayService's serve config goes through Ray Serve's own schema and equals serve_config.yaml (the
HTTP host aside), the launcher configs through Ray's cluster-launcher schema, the compose file names
the images the Dockerfile builds, and the Dockerfile takes its Python dependencies from pyproject.toml.
(The Grafana dashboard's metric names are checked against a running app in
tests/deployments/serve/test_app.py.)"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib

import pytest
import yaml

from tests.conftest import ROOT

CLUSTER = ROOT / "cluster"
DOCKERFILE = CLUSTER / "docker" / "Dockerfile"


def _docs(path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _pin(package: str) -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dep in deps["dependencies"] + [d for extra in deps["optional-dependencies"].values() for d in extra]:
        m = re.fullmatch(rf"{re.escape(package)}(\[[^\]]*\])?==([\w.]+)", dep)
        if m:
            return m.group(2)
    raise AssertionError(f"{package} is not pinned in pyproject.toml")


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.fixture(scope="module")
def rayservice() -> dict:
    (service, *_) = _docs(CLUSTER / "kuberay" / "rayservice.yaml")
    return service


def test_every_kubernetes_manifest_is_well_formed():
    for path in sorted((CLUSTER / "kuberay").glob("*.yaml")):
        docs = _docs(path)
        assert docs, path
        for doc in docs:
            assert {"apiVersion", "kind", "metadata", "spec"} <= set(doc), (path, doc.get("kind"))
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), path


def test_the_rayservice_serves_serve_config_yaml_with_only_the_host_changed(rayservice):
    from ray.serve.schema import ServeDeploySchema

    from deployments.serve.config import serve_config

    assert rayservice["apiVersion"] == "ray.io/v1" and rayservice["kind"] == "RayService"
    inside = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(inside)  # what KubeRay submits, as Serve checks it
    assert inside == serve_config(host="0.0.0.0")
    local = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    local["http_options"]["host"] = "0.0.0.0"
    assert inside == local


def test_the_rayservice_cluster_scales_gpu_workers_from_zero_with_secrets_and_a_cache(rayservice):
    from deployments.service.settings import AppArgs

    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == _pin("ray")
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["authOptions"]["mode"] == "token"
    head = cluster["headGroupSpec"]["template"]["spec"]
    (gpu,) = cluster["workerGroupSpecs"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
    worker = gpu["template"]["spec"]
    (head_c,) = head["containers"]
    (worker_c,) = worker["containers"]
    assert worker_c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in head_c["resources"]["limits"]
    assert head_c["image"].endswith("musicgen:cpu") and worker_c["image"].endswith("musicgen:cuda")
    for container, spec in ((head_c, head), (worker_c, worker)):
        env = _env(container)
        for name, key in (("REDIS_URL", "redis-url"), ("MUSICGEN_API_KEYS", "api-keys")):
            assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "musicgen", "key": key}
        assert env["MUSICGEN_GENERATOR_GPUS"]["value"] == "1"
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in spec["volumes"]}
        assert claims[mounts[env["MUSICGEN_CACHE_DIR"]["value"]]] == "musicgen-models"
        assert claims[mounts[env["MUSICGEN_DATA_DIR"]["value"]]] == "musicgen-data"
    pvcs = {d["metadata"]["name"]: d for d in _docs(CLUSTER / "kuberay" / "rayservice.yaml")[1:]}
    assert all(p["spec"]["accessModes"] == ["ReadWriteMany"] for p in pvcs.values())
    assert set(pvcs) == {"musicgen-models", "musicgen-data"}

    # what the app builder sees on the head: the serve config's args and the pod's environment
    (app,) = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]
    values = {k: v["value"] for k, v in _env(head_c).items() if "value" in v}
    args = AppArgs(**app["args"], host="0.0.0.0")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in values.items():
            mp.setenv(k, v)
        resolved = args.resolved()
    assert resolved.generator_gpus == 1.0 and resolved.auth_required


def test_the_redis_manifest_persists_its_append_only_file():
    docs = {d["kind"]: d for d in _docs(CLUSTER / "kuberay" / "redis.yaml")}
    sts = docs["StatefulSet"]["spec"]
    (redis,) = sts["template"]["spec"]["containers"]
    assert redis["args"][:2] == ["--appendonly", "yes"]
    data_mount = next(m["mountPath"] for m in redis["volumeMounts"] if m["name"] == "data")
    assert redis["args"][redis["args"].index("--dir") + 1] == data_mount
    assert sts["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert docs["Service"]["metadata"]["name"] == "musicgen-redis"
    assert docs["Service"]["spec"]["ports"][0]["port"] == 6379


@pytest.mark.parametrize("cloud", ["aws", "gcp"])
def test_the_cluster_launcher_configs_pass_rays_schema(cloud):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "launcher" / f"{cloud}.yaml").read_text())
    validate_config(prepare_config(config))  # the checks `ray up` runs before it starts anything
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"]["GPU"] == 0
    gpu = nodes["gpu"]
    assert gpu["min_workers"] == 0 and gpu["resources"]["GPU"] == 1
    head_start = " ".join(config["head_start_ray_commands"])
    assert "MUSICGEN_GENERATOR_GPUS=1" in head_start and "--appendonly yes" in head_start
    assert "deployments.serve.config --host 0.0.0.0" in head_start
    assert (ROOT / config["file_mounts"]["~/musicgen.env"]).with_suffix(".env.example").is_file()
    # every variable the commands read from the env file is in its example
    example = (CLUSTER / "launcher" / "musicgen.env.example").read_text()
    offered = set(re.findall(r"^([A-Z_]+)=", example, re.M))
    commands = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    used = set(re.findall(r"\$\{?([A-Z][A-Z_]+)", commands)) - {"RAY_HEAD_IP"}
    assert used <= offered, used - offered
    assert "/cluster/launcher/musicgen.env" in (ROOT / ".gitignore").read_text().splitlines()


def test_the_dockerfile_installs_from_pyproject_and_runs_unprivileged():
    text = DOCKERFILE.read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    joined = re.sub(r"\\\n\s*", " ", code)
    pip_installs = re.findall(r"pip install ([^&;\n]+)", joined)
    # the only packages named: the project itself, pip, and the torch pins read from pyproject.toml
    for args in pip_installs:
        words = shlex.split(args)
        valued = {i + 1 for i, w in enumerate(words) if w in ("--progress-bar", "--index-url")}
        named = [w for i, w in enumerate(words) if not w.startswith("-") and i not in valued]
        assert all(a in (".[serve]", "pip", "$pins") for a in named), args
    assert any('".[serve]"' in a for a in pip_installs)
    script = re.search(r"python -c '([^']+)'", joined).group(1)
    pins = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert pins.stdout.split() == [f"torch=={_pin('torch')}", f"torchaudio=={_pin('torchaudio')}"]
    assert "scripts/system-deps.sh" in text  # the one list of system packages (espeak-ng 1.51)
    assert re.search(r"^FROM .* AS build$", text, re.M) and re.search(r"^FROM .* AS runtime$", text, re.M)
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user == ["musicgen"]
    assert "/readyz" in re.search(r"^HEALTHCHECK .*(?:\n\s+.*)*", text, re.M).group(0)
    assert re.search(r'^VOLUME \["/models", "/data"\]$', text, re.M)
    assert re.search(r"^\s+MUSICGEN_CACHE_DIR=/models", text, re.M)
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for path in src.split():
            assert (ROOT / path).exists(), path
    entry = CLUSTER / "docker" / "entrypoint.sh"
    assert subprocess.run(["sh", "-n", str(entry)]).returncode == 0
    assert entry.stat().st_mode & 0o111


def test_the_entrypoint_writes_a_serve_config_serve_accepts(tmp_path):
    out = tmp_path / "serve_config.yaml"
    subprocess.run([sys.executable, "-m", "deployments.serve.config", "--host", "0.0.0.0",
                    str(ROOT / "serve_config.yaml"), "-o", str(out)], cwd=ROOT, check=True)  # fmt: skip
    written = yaml.safe_load(out.read_text())
    assert written["http_options"]["host"] == "0.0.0.0"
    assert written["applications"] == yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("applications: [{name: x}]\n")
    refused = subprocess.run([sys.executable, "-m", "deployments.serve.config", str(bad)], cwd=ROOT,
                             capture_output=True, text=True)  # fmt: skip
    assert refused.returncode != 0 and "import_path" in refused.stderr


def test_compose_runs_redis_with_persistence_and_the_images_the_dockerfile_builds():
    compose = yaml.safe_load((CLUSTER / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"redis", "musicgen", "prometheus", "grafana"}
    assert "--appendonly" in services["redis"]["command"]
    assert services["redis"]["command"][services["redis"]["command"].index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])
    app = services["musicgen"]
    build = app["build"]
    assert (CLUSTER / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    dockerfile = DOCKERFILE.read_text()
    variants = {
        v for v in ("cpu", "cuda") if f'"$VARIANT" = {v}' in dockerfile or f'"$VARIANT" != {v}' in dockerfile
    }
    tag = re.fullmatch(r"musicgen:\$\{MUSICGEN_VARIANT:-(\w+)\}", app["image"]).group(1)
    assert tag in variants and build["args"]["VARIANT"] == "${MUSICGEN_VARIANT:-cuda}"
    assert app["environment"]["REDIS_URL"] == "redis://redis:6379/0"
    assert app["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert any(v.startswith("models:") and v.endswith(":/models") for v in app["volumes"])
    for service in services.values():  # every file a service mounts is in the repository
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (CLUSTER / source).exists(), source


def test_prometheus_scrapes_the_api_and_rays_metrics_port():
    config = yaml.safe_load((CLUSTER / "observability" / "prometheus.yml").read_text())
    targets = {j["job_name"]: j["static_configs"][0]["targets"] for j in config["scrape_configs"]}
    entry = (CLUSTER / "docker" / "entrypoint.sh").read_text()
    metrics_port = re.search(r"RAY_METRICS_EXPORT_PORT:-(\d+)", entry).group(1)
    assert targets == {"musicgen-api": ["musicgen:8000"], "ray": [f"musicgen:{metrics_port}"]}
    provisioning = CLUSTER / "observability" / "grafana" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert source["url"] == "http://prometheus:9090"
    dashboards = json.loads(
        (CLUSTER / "observability" / "grafana" / "dashboards" / "musicgen.json").read_text()
    )
    assert dashboards["uid"] == "musicgen" and dashboards["panels"]
