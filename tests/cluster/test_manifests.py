"""Every deployment manifest and config under cluster/, checked without a cloud or a Docker daemon:
- the core kinds of cluster/kuberay (and the RayService's pod templates, as PodTemplates) pass
  Kubernetes' own schemas strictly (kubernetes-validate, offline: an unknown field fails); every other
  kind is one of the CRD kinds named here;
- every RayService field outside the pod templates is in a table with where KubeRay documents it and
  the type or enum its CRD declares, and the table lists nothing the manifest does not set;
- the RayService's serve config goes through Ray Serve's own schema and equals serve_config.yaml (the
  HTTP host aside), the launcher configs through Ray's cluster-launcher schema;
- in the RayService and both launcher configs, the custom resources the service's settings ask for
  (resolved from the file's own environment) are declared by the GPU groups alone (generators) and the
  head alone (the API), as Ray's autoscaler reads the groups;
- the compose file names the images the Dockerfile builds, and the Dockerfile takes its Python
  dependencies from pyproject.toml.
(The Grafana dashboard's metric names are checked against a running app in
tests/deployments/serve/test_app.py.)"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
import sys
import tomllib
from typing import NamedTuple

import pytest
import yaml

from tests.conftest import ROOT

CLUSTER = ROOT / "cluster"
DOCKERFILE = CLUSTER / "docker" / "Dockerfile"

# The Kubernetes release whose API the core kinds are checked against (kubernetes-validate ships the
# schemas of 1.25 to its own version): not the newest, so that a field added since fails here.
KUBERNETES_VERSION = "1.35.0"
# Kinds no Kubernetes schema describes, only their operators' CRDs: KubeRay's RayService (its fields:
# KUBERAY_FIELDS below) and the Prometheus Operator's PodMonitor. Any other unknown kind fails.
CRD_KINDS = {("ray.io/v1", "RayService"), ("monitoring.coreos.com/v1", "PodMonitor")}


class KubeRayField(NamedTuple):
    """A RayService field this project sets: what KubeRay's CRD declares for its value
    (ray-operator/config/crd/bases/ray.io_rayservices.yaml in ray-project/kuberay) and where KubeRay's
    API reference documents it."""

    value: type | frozenset[str] | str  # a type, an enum, STRING_MAP or POD_TEMPLATE
    documented: str
    since: str = "v1.0.0"  # the KubeRay release that first has it in ray.io/v1


API_MD = "docs/reference/api.md"  # in ray-project/kuberay
STRING_MAP = "map of string to string"  # the CRD's `additionalProperties: {type: string}`
POD_TEMPLATE = "PodTemplateSpec"  # Kubernetes' own type: checked strictly by kubernetes-validate
_CLUSTER = "spec.rayClusterConfig"
_HEAD = f"{_CLUSTER}.headGroupSpec"
_WORKERS = f"{_CLUSTER}.workerGroupSpecs[]"
# every field path the RayService sets outside the pod templates, and nothing else (a test checks both)
KUBERAY_FIELDS = {
    "apiVersion": KubeRayField(frozenset({"ray.io/v1"}), f"{API_MD}#rayservice"),
    "kind": KubeRayField(frozenset({"RayService"}), f"{API_MD}#rayservice"),
    "metadata.name": KubeRayField(str, f"{API_MD}#rayservice"),
    "spec.serveConfigV2": KubeRayField(str, f"{API_MD}#rayservicespec"),
    f"{_CLUSTER}.rayVersion": KubeRayField(str, f"{API_MD}#rayclusterspec"),
    # Ray's token auth for the control plane: cherry-picked into v1.5.1, not in v1.5.0
    f"{_CLUSTER}.authOptions.mode": KubeRayField(
        frozenset({"disabled", "token"}), f"{API_MD}#authoptions", "v1.5.1"
    ),
    f"{_CLUSTER}.enableInTreeAutoscaling": KubeRayField(bool, f"{API_MD}#rayclusterspec"),
    f"{_CLUSTER}.autoscalerOptions.upscalingMode": KubeRayField(
        frozenset({"Default", "Aggressive", "Conservative"}), f"{API_MD}#autoscaleroptions"
    ),
    f"{_CLUSTER}.autoscalerOptions.idleTimeoutSeconds": KubeRayField(int, f"{API_MD}#autoscaleroptions"),
    f"{_HEAD}.rayStartParams": KubeRayField(STRING_MAP, f"{API_MD}#headgroupspec"),
    f"{_HEAD}.template": KubeRayField(POD_TEMPLATE, f"{API_MD}#headgroupspec"),
    f"{_WORKERS}.groupName": KubeRayField(str, f"{API_MD}#workergroupspec"),
    f"{_WORKERS}.replicas": KubeRayField(int, f"{API_MD}#workergroupspec"),
    f"{_WORKERS}.minReplicas": KubeRayField(int, f"{API_MD}#workergroupspec"),
    f"{_WORKERS}.maxReplicas": KubeRayField(int, f"{API_MD}#workergroupspec"),
    f"{_WORKERS}.rayStartParams": KubeRayField(STRING_MAP, f"{API_MD}#workergroupspec"),
    f"{_WORKERS}.template": KubeRayField(POD_TEMPLATE, f"{API_MD}#workergroupspec"),
}


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


def _validate_strictly(doc: dict, where: str) -> None:
    """`doc` against Kubernetes' schema of its kind, unknown fields refused; a failure names the field."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        field = ".".join(str(p) for p in e.path)
        raise AssertionError(f"{where}: {doc['kind']} {field}: {e.message}") from None


def _pod_templates(rayservice: dict) -> dict[str, dict]:
    """The RayService's pod templates (the head's and each worker group's), each as a core PodTemplate:
    a kind whose `template` is the PodTemplateSpec KubeRay takes."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = {"head": cluster["headGroupSpec"], **{g["groupName"]: g for g in cluster["workerGroupSpecs"]}}
    return {
        name: {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": f"musicgen-{name}"},
            "template": copy.deepcopy(group["template"]),
        }
        for name, group in groups.items()
    }


def _used_fields(node, path: str = ""):
    """(path, value) of every field set in a RayService document, down to KubeRay's own fields: a pod
    template (Kubernetes' type) and rayStartParams (a map of strings) are leaves; list items add `[]`."""
    field = KUBERAY_FIELDS.get(path)
    if isinstance(node, dict) and not (field and field.value in (STRING_MAP, POD_TEMPLATE)):
        for key, value in node.items():
            yield from _used_fields(value, f"{path}.{key}" if path else key)
    elif isinstance(node, list):
        for item in node:
            yield from _used_fields(item, f"{path}[]")
    else:
        yield path, node


def _has_declared_value(value, declared) -> bool:
    if isinstance(declared, frozenset):
        return value in declared
    if declared is int:  # the CRD's int32
        return isinstance(value, int) and not isinstance(value, bool) and -(2**31) <= value < 2**31
    if declared == STRING_MAP:
        return isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        )
    if declared == POD_TEMPLATE:
        return isinstance(value, dict) and "spec" in value
    return isinstance(value, declared)


def _release(tag: str) -> tuple[int, ...]:
    return tuple(int(n) for n in tag.removeprefix("v").split("."))


def test_every_kubernetes_manifest_is_well_formed():
    for path in sorted((CLUSTER / "kuberay").glob("*.yaml")):
        docs = _docs(path)
        assert docs, path
        for doc in docs:
            assert {"apiVersion", "kind", "metadata", "spec"} <= set(doc), (path, doc.get("kind"))
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), path


def test_every_core_kind_passes_kubernetes_schema_strictly_and_the_rest_are_named_crds():
    import kubernetes_validate

    checked, crds = set(), set()
    for path in sorted((CLUSTER / "kuberay").glob("*.yaml")):
        for doc in _docs(path):
            kind = (doc["apiVersion"], doc["kind"])
            try:
                _validate_strictly(doc, path.name)
                checked.add(doc["kind"])
            except kubernetes_validate.SchemaNotFoundError:
                assert kind in CRD_KINDS, f"{path.name}: {kind} is no Kubernetes kind, nor a CRD named here"
                crds.add(kind)
    assert {"Service", "StatefulSet", "PersistentVolumeClaim"} <= checked
    assert crds == CRD_KINDS  # no stale name: each is in a file


def test_the_rayservices_pod_templates_pass_kubernetes_schema_strictly(rayservice):
    templates = _pod_templates(rayservice)
    assert set(templates) == {"head", "gpu"}
    for name, doc in templates.items():
        _validate_strictly(doc, f"rayservice.yaml, the {name} group's template")


def _misspell_image(pod: dict) -> None:
    container = pod["containers"][0]
    container["imagee"] = container.pop("image")


def _misspell_an_env_value(pod: dict) -> None:
    pod["containers"][0]["env"].append({"name": "MUSICGEN_MODEL", "vaule": "tiny"})


def _quote_a_port(pod: dict) -> None:
    pod["containers"][0]["ports"][0]["containerPort"] = "8000"


@pytest.mark.parametrize(
    ("break_it", "named"),
    [
        (_misspell_image, "'imagee' was unexpected"),
        (_misspell_an_env_value, "'vaule' was unexpected"),
        (_quote_a_port, "'8000' is not of type 'integer'"),
    ],
)
def test_strict_validation_refuses_a_template_with_a_wrong_field(rayservice, break_it, named):
    # worth something only if it refuses what the API server would (kubectl validates fields strictly)
    broken = _pod_templates(rayservice)["gpu"]
    break_it(broken["template"]["spec"])
    with pytest.raises(AssertionError, match=re.escape(named)):
        _validate_strictly(broken, "a broken copy")


def test_every_rayservice_field_is_in_the_kuberay_table_with_the_value_its_crd_declares(rayservice):
    used = list(_used_fields(rayservice))
    paths = {path for path, _ in used}
    assert paths - set(KUBERAY_FIELDS) == set(), (
        "fields the table does not list (add where KubeRay documents them)"
    )
    assert set(KUBERAY_FIELDS) - paths == set(), "fields the table lists that the manifest no longer sets"
    for path, value in used:
        declared = KUBERAY_FIELDS[path].value
        assert _has_declared_value(value, declared), f"{path}: {value!r} is not {declared}"
    # the CRD's required fields of a worker group, and the bounds the operator and autoscaler keep
    for group in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        assert {"groupName", "minReplicas", "maxReplicas", "template"} <= set(group)
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], group["groupName"]
        assert group["maxReplicas"] >= 1, group["groupName"]


def test_the_kuberay_release_the_manifest_and_readme_ask_for_has_every_field_used():
    needed = max((f.since for f in KUBERAY_FIELDS.values()), key=_release)
    header = (CLUSTER / "kuberay" / "rayservice.yaml").read_text()
    (stated,) = re.findall(r"KubeRay operator \((v[\d.]+) or newer", header)
    assert stated == needed
    assert f"Install the KubeRay operator ({needed} or newer)" in (ROOT / "README.md").read_text()


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


class ClusterFile(NamedTuple):
    """What a cluster file gives Ray: the environment the app is built in (the head's), the resources
    each node group declares, which group is the head, and the app's args."""

    env: dict[str, str]
    groups: dict[str, dict[str, float]]
    head: str
    app_args: dict


def _kuberay_cluster_file() -> ClusterFile:
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    (service, *_) = _docs(CLUSTER / "kuberay" / "rayservice.yaml")
    cluster = service["spec"]["rayClusterConfig"]
    # the node types Ray's autoscaler plans with, as it reads them from the RayCluster of this spec
    config = _derive_autoscaling_config_from_ray_cr(
        {"metadata": {"name": "musicgen", "namespace": "default"}, "spec": cluster}
    )
    (head_c,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    return ClusterFile(
        env={e["name"]: e["value"] for e in head_c["env"] if "value" in e},
        groups={name: node["resources"] for name, node in config["available_node_types"].items()},
        head=config["head_node_type"],
        app_args=app["args"],
    )


def _launcher_cluster_file(cloud: str) -> ClusterFile:
    config = yaml.safe_load((CLUSTER / "launcher" / f"{cloud}.yaml").read_text())
    # the variables the head's start commands export before `ray start` and `serve deploy`
    words = shlex.split(" ".join(config["head_start_ray_commands"]))
    (app,) = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"]
    return ClusterFile(
        env=dict(w.split("=", 1) for w in words if re.fullmatch(r"MUSICGEN_[A-Z_]+=.+", w)),
        groups={name: node["resources"] for name, node in config["available_node_types"].items()},
        head=config["head_node_type"],
        app_args=app["args"],
    )


@pytest.mark.parametrize("source", ["kuberay", "aws", "gcp"])
def test_generators_can_run_only_on_gpu_nodes_and_the_api_only_on_the_head(source):
    from deployments.serve.app import PromptValidator, generator_needs
    from deployments.service.settings import AppArgs

    cluster = _kuberay_cluster_file() if source == "kuberay" else _launcher_cluster_file(source)
    with pytest.MonkeyPatch.context() as mp:  # the settings as the app builder reads them on the head
        for var in ("MUSICGEN_GENERATOR_GPUS", "MUSICGEN_GENERATOR_RESOURCES", "MUSICGEN_API_RESOURCES"):
            mp.delenv(var, raising=False)
        for var, value in cluster.env.items():
            mp.setenv(var, value)
        resolved = AppArgs(**cluster.app_args, host="0.0.0.0").resolved()
    generator, api = resolved.generator_resources, resolved.api_resources
    assert generator and api, (
        "without custom resources generators may start on the head, the API on GPU nodes"
    )
    gpu_groups = {name for name, has in cluster.groups.items() if has.get("GPU", 0) > 0}
    assert gpu_groups and cluster.head not in gpu_groups
    for resource in generator:
        declared_by = {name for name, has in cluster.groups.items() if has.get(resource, 0) > 0}
        assert declared_by == gpu_groups, (
            f"{resource}: declared by {declared_by}, the GPU groups are {gpu_groups}"
        )
    needs = generator_needs(resolved, resolved.generator_gpus)
    for name in gpu_groups:  # a GPU node has room for a whole generator replica
        assert all(cluster.groups[name].get(k, 0) >= v for k, v in needs.items()), (name, needs)
    # every ingress replica (up to max_ingress) and the validator's on the head at once
    api_replicas = resolved.max_ingress + PromptValidator.num_replicas
    for resource, amount in api.items():
        declared_by = {name for name, has in cluster.groups.items() if has.get(resource, 0) > 0}
        assert declared_by == {cluster.head}, f"{resource}: declared by {declared_by}, not the head alone"
        assert cluster.groups[cluster.head][resource] >= amount * api_replicas


def test_each_kuberay_pod_starts_ray_with_the_custom_resources_the_autoscaler_plans_with(rayservice):
    cluster = rayservice["spec"]["rayClusterConfig"]
    planned = _kuberay_cluster_file().groups
    params = {
        "headgroup": cluster["headGroupSpec"]["rayStartParams"],
        **{g["groupName"]: g["rayStartParams"] for g in cluster["workerGroupSpecs"]},
    }
    for name, start in params.items():
        # KubeRay writes each param as --name=value into the pod's shell command line
        (flag,) = shlex.split(f"--resources={start['resources']}")
        declared = json.loads(flag.removeprefix("--resources="))
        assert declared and {k: planned[name].get(k) for k in declared} == declared, name


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
