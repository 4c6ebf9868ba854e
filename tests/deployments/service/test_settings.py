"""The settings: when API keys are required, and the refusal to serve an open API on a public address."""

from __future__ import annotations

import re

import pydantic
import pytest
import yaml

from deployments.service.settings import AppArgs, is_loopback
from tests.conftest import ROOT


@pytest.mark.parametrize(
    "host, loopback",
    [("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True), ("::1", True), ("[::1]", True),
     ("0.0.0.0", False), ("::", False), ("10.1.2.3", False), ("songs.example.com", False), (None, False)],
)  # fmt: skip
def test_auto_requires_keys_unless_the_api_listens_on_loopback(host, loopback):
    assert is_loopback(host) is loopback
    assert AppArgs(host=host).auth_required is not loopback
    assert AppArgs(host=host, auth="on").auth_required


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", None])
def test_auth_off_on_a_public_address_is_refused_unless_allowed(host):
    with pytest.raises(pydantic.ValidationError) as refused:
        AppArgs(host=host, auth="off")
    message = str(refused.value)
    assert "anyone could read" in message and "allow_insecure_public: true" in message
    assert "musicgen keys create" in message  # and how to turn auth on instead
    allowed = AppArgs(host=host, auth="off", allow_insecure_public=True)
    assert not allowed.auth_required
    assert not AppArgs(host="127.0.0.1", auth="off").auth_required  # local: off needs no permission


def test_serve_config_runs_locally_without_keys_and_requires_them_when_public():
    """serve_config.yaml as scripts/serve.sh uses it: loopback, so a newcomer needs no key; the same
    args on 0.0.0.0 require keys. It restates no default but the deployment's shape, which whoever
    deploys it edits (replicas, auth): the defaults live in settings.py alone."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    host = config["http_options"]["host"]
    args = config["applications"][0]["args"]
    assert host == "127.0.0.1" and "host" not in args  # the host comes from http_options alone
    assert not AppArgs(**args, host=host).auth_required
    assert AppArgs(**args, host="0.0.0.0").auth_required
    restated = {k for k, v in args.items() if AppArgs.model_fields[k].default == v}
    assert restated <= {"min_ingress", "min_generators", "max_generators", "auth"}, restated
    with pytest.raises(pydantic.ValidationError):
        AppArgs(**{**args, "auth": "off"}, host="0.0.0.0")
    with pytest.raises(pydantic.ValidationError):
        AppArgs(quotas={"active_jobs": 0})


def test_generator_gpus_come_from_the_setting_then_the_environment(monkeypatch):
    """A cluster whose GPU nodes scale from zero has no GPU when the app is built: the generator's GPU
    request is a setting (or MUSICGEN_GENERATOR_GPUS), never read off the cluster when it is set."""
    from deployments.serve.app import generator_gpus

    monkeypatch.delenv("MUSICGEN_GENERATOR_GPUS", raising=False)
    assert AppArgs().resolved().generator_gpus is None
    assert generator_gpus(AppArgs().resolved()) == 0.0  # no Ray here: the CPU
    assert generator_gpus(AppArgs(generator_gpus=1).resolved()) == 1.0  # though this machine has none
    monkeypatch.setenv("MUSICGEN_GENERATOR_GPUS", "0.5")
    assert AppArgs().resolved().generator_gpus == 0.5
    assert AppArgs(generator_gpus=2).resolved().generator_gpus == 2  # the setting wins
    for bad in ("one", "-1", "99"):
        monkeypatch.setenv("MUSICGEN_GENERATOR_GPUS", bad)
        with pytest.raises(ValueError, match="MUSICGEN_GENERATOR_GPUS"):
            AppArgs().resolved()
    with pytest.raises(pydantic.ValidationError):
        AppArgs(generator_gpus=-1)


def test_models_served_beside_the_default_come_from_the_setting_or_the_environment(monkeypatch):
    monkeypatch.delenv("MUSICGEN_MODELS", raising=False)
    monkeypatch.delenv("MUSICGEN_MODEL", raising=False)
    assert AppArgs().resolved().served_models == ["diffrhythm-1.2-base"]
    assert AppArgs(model="tiny", models=["tiny-2", "tiny"]).resolved().served_models == ["tiny", "tiny-2"]
    monkeypatch.setenv("MUSICGEN_MODELS", " diffrhythm-2 , ")
    assert AppArgs().resolved().served_models == ["diffrhythm-1.2-base", "diffrhythm-2"]
    assert AppArgs(models=[]).resolved().served_models == ["diffrhythm-1.2-base"]  # the setting wins


def test_the_plan_names_are_the_samplers_everywhere():
    """serve_config.yaml's `plan` and `musicgen generate --plan` accept exactly the sampler's plans."""
    import typing

    from musicgen.cli import build_parser
    from musicgen.runtime.plans import PLANS

    assert typing.get_args(AppArgs.model_fields["plan"].annotation) == PLANS
    generate = build_parser()._subparsers._group_actions[0].choices["generate"]
    (plan,) = [a for a in generate._actions if a.dest == "plan"]
    assert tuple(plan.choices) == PLANS


def test_the_service_reads_its_environment_only_through_settings():
    """settings.ENV lists every variable the service obeys: no other module of deployments/ reads the
    environment, and every variable listed is read somewhere (here or by the library)."""
    from deployments.service import settings

    readers = [
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "deployments").rglob("*.py")
        if p.name not in ("settings.py", "local_cluster.py")
        and re.search(r"os\.environ|getenv\(", p.read_text())
    ]  # local_cluster.py starts test clusters: it sets its nodes' environment and obeys none of it
    assert readers == []
    code = "\n".join(p.read_text() for d in ("deployments", "musicgen") for p in (ROOT / d).rglob("*.py"))
    code = code.replace((ROOT / "deployments/service/settings.py").read_text(), "")
    settings_code = (ROOT / "deployments/service/settings.py").read_text()
    for name in settings.ENV:
        assert name in code or f'env("{name}")' in settings_code, f"{name} is declared but nothing reads it"
    with pytest.raises(KeyError, match="not declared"):
        settings.env("MUSICGEN_NOT_A_SETTING")


def test_the_settings_listing_names_every_arg_with_its_default():
    from deployments.service.settings import describe

    text = describe()
    for name in AppArgs.model_fields:
        assert f"\n  {name}" in text
    assert "  lease_s" in text and "30.0" in text and "quotas.songs_per_day" in text
    assert "MUSICGEN_API_KEYS:" in text and "MUSICGEN_CACHE_DIR:" in text  # the library's too


@pytest.mark.parametrize("timeout_s", [None, 600.0, 3600.0])
def test_a_stopping_generator_gets_longer_than_a_song_may_run(timeout_s, tmp_path):
    """Serve waits `graceful_shutdown_timeout_s` for a stopping generator's running batch, which may
    take `generation_timeout_s` (then its takes are encoded and stored); killed sooner, its jobs would
    start over elsewhere. build_app binds the deployments without a Ray cluster."""
    from deployments.serve.app import build_app

    raw = {"model": "tiny", "host": "127.0.0.1", "data_dir": str(tmp_path)}
    if timeout_s is not None:
        raw["generation_timeout_s"] = timeout_s
    ingress = build_app(raw)._bound_deployment
    args = ingress.init_args[2]
    (generator,) = (app._bound_deployment for app in ingress.init_args[1].values())
    grace_s = generator._deployment_config.graceful_shutdown_timeout_s
    assert grace_s > args.generation_timeout_s == (timeout_s or 1800.0)


@pytest.mark.parametrize("period_s", [None, 2.0])
def test_generators_are_health_checked_as_often_as_the_setting_says(period_s, tmp_path):
    """Serve runs a generator's health check every `generator_health_check_s` (10 s unless set): a
    replica that cannot load its model is replaced three failed checks later."""
    from deployments.serve.app import build_app

    raw = {"model": "tiny", "host": "127.0.0.1", "data_dir": str(tmp_path)}
    if period_s is not None:
        raw["generator_health_check_s"] = period_s
    ingress = build_app(raw)._bound_deployment
    (generator,) = (app._bound_deployment for app in ingress.init_args[1].values())
    assert generator._deployment_config.health_check_period_s == (period_s or 10.0)
    with pytest.raises(ValueError, match="generator_health_check_s"):
        build_app({**raw, "generator_health_check_s": 0})


def test_an_engine_generator_takes_its_jobs_at_once_and_a_batching_one_a_batch_ahead(tmp_path):
    """DiffRhythm 2's batched plan runs on the engine: its generator takes `max_engine_jobs` at once
    (Serve's max_ongoing_requests) and scales out at half of that; DiffRhythm 1 and DiffRhythm 2 under
    another plan run a batch while the next gathers (2 x max_batch_size)."""
    from deployments.serve.app import build_app

    def configs(**raw):
        app = {"model": "tiny", "models": ["tiny-2"], "host": "127.0.0.1", "data_dir": str(tmp_path), **raw}
        ingress = build_app(app)._bound_deployment
        return {
            model: (g._bound_deployment._deployment_config.max_ongoing_requests,
                    g._bound_deployment._deployment_config.autoscaling_config.target_ongoing_requests)
            for model, g in ingress.init_args[1].items()
        }  # fmt: skip

    assert configs(max_engine_jobs=48, max_batch_size=4) == {"tiny": (8, 4), "tiny-2": (48, 24)}
    assert configs(plan="sequential", max_batch_size=3) == {"tiny": (6, 3), "tiny-2": (6, 3)}


def test_custom_resources_come_from_the_setting_then_the_environment(monkeypatch):
    """Generators ask for the resource that only generator nodes declare, the API for the head's: a
    cluster file sets MUSICGEN_GENERATOR_RESOURCES / MUSICGEN_API_RESOURCES (JSON objects)."""
    monkeypatch.delenv("MUSICGEN_GENERATOR_RESOURCES", raising=False)
    monkeypatch.delenv("MUSICGEN_API_RESOURCES", raising=False)
    assert AppArgs().resolved().generator_resources == {} == AppArgs().resolved().api_resources
    monkeypatch.setenv("MUSICGEN_GENERATOR_RESOURCES", '{"musicgen_generator": 1}')
    monkeypatch.setenv("MUSICGEN_API_RESOURCES", '{"musicgen_api": 0.5}')
    resolved = AppArgs().resolved()
    assert resolved.generator_resources == {"musicgen_generator": 1.0}
    assert resolved.api_resources == {"musicgen_api": 0.5}
    assert AppArgs(generator_resources={"gpu_node": 2}).resolved().generator_resources == {"gpu_node": 2.0}
    for bad, match in [
        ("musicgen_generator=1", "not JSON"),
        ('["musicgen_generator"]', "resource names and amounts"),
        ('{"musicgen_generator": 0}', "amounts > 0"),
        ('{"musicgen_generator": true}', "amounts > 0"),
        ('{"GPU": 1}', "generator_gpus"),
    ]:
        monkeypatch.setenv("MUSICGEN_GENERATOR_RESOURCES", bad)
        with pytest.raises(ValueError, match="MUSICGEN_GENERATOR_RESOURCES") as caught:
            AppArgs().resolved()
        assert match in str(caught.value)


def test_each_node_keeps_its_data_under_its_own_data_dir_unless_the_args_name_one(monkeypatch, tmp_path):
    """The app is built on one node; a replica on another uses that node's MUSICGEN_DATA_DIR (nodes do
    not share a disk). A data_dir given in the args holds everywhere; a node without the variable keeps
    the builder's."""
    monkeypatch.setenv("MUSICGEN_DATA_DIR", str(tmp_path / "head"))
    built = AppArgs().resolved()
    assert built.data_dir == str(tmp_path / "head")
    monkeypatch.setenv("MUSICGEN_DATA_DIR", str(tmp_path / "worker"))
    assert built.on_this_node().data_dir == str(tmp_path / "worker")
    monkeypatch.delenv("MUSICGEN_DATA_DIR")
    assert built.on_this_node().data_dir == str(tmp_path / "head")
    given = AppArgs(data_dir=str(tmp_path / "shared")).resolved()
    monkeypatch.setenv("MUSICGEN_DATA_DIR", str(tmp_path / "worker"))
    assert given.on_this_node().data_dir == str(tmp_path / "shared")


def test_the_engines_cache_budget_is_given_one_way_at_most():
    """engine_cache_gib (GiB) or engine_cache_share (of the GPU's free memory), not both; each in range."""
    assert AppArgs(engine_cache_gib=24).engine_cache_gib == 24
    assert AppArgs(engine_cache_share=0.8).engine_cache_share == 0.8
    with pytest.raises(ValueError, match="engine_cache_gib and engine_cache_share both set"):
        AppArgs(engine_cache_gib=24, engine_cache_share=0.8)
    for bad in ({"engine_cache_gib": 0}, {"engine_cache_share": 0}, {"engine_cache_share": 0.99}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            AppArgs(**bad)
