"""The settings: when API keys are required, and the refusal to serve an open API on a public address."""

from __future__ import annotations

import pydantic
import pytest
import yaml

from deployments.service.settings import AppArgs, Quotas, is_loopback
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
    args on 0.0.0.0 require keys; its quotas are valid."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    host = config["http_options"]["host"]
    args = config["applications"][0]["args"]
    assert host == "127.0.0.1" and "host" not in args  # the host comes from http_options alone
    assert not AppArgs(**args, host=host).auth_required
    assert AppArgs(**args, host="0.0.0.0").auth_required
    assert AppArgs(**args).quotas == Quotas(**args["quotas"])
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
