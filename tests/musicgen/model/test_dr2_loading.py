"""DiffRhythm 2's DiT and decoder load from what their files say: the configuration from model.json
(else config.json), cross-checked against what the weights can tell, and the decoder's sample rate from
decoder.json. The tiny DiffRhythm 2 of musicgen.tiny, written in the official files, is the checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from musicgen.errors import CheckpointMismatch, ModelNotAvailable
from musicgen.model.loading import load_bigvgan, load_dr2
from musicgen.tiny import save_tiny_dr2

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    return save_tiny_dr2(tmp_path_factory.mktemp("tiny-dr2"))


@pytest.fixture
def folder(official, tmp_path):
    return shutil.copytree(official, tmp_path / "model")


def edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_the_dit_loads_from_model_json(folder):
    dit = load_dr2(folder, device=CPU)
    assert (dit.cfg.dim, dit.cfg.depth, dit.cfg.heads, dit.cfg.text_num_embeds) == (64, 2, 4, 1000)


def test_without_model_json_it_loads_from_config_json(folder):
    want = load_dr2(folder, device=CPU)
    (folder / "model.json").rename(folder / "config.json")
    got = load_dr2(folder, device=CPU)
    assert got.cfg == want.cfg
    for key, value in want.state_dict().items():
        assert torch.equal(got.state_dict()[key], value)


def test_model_json_is_read_before_config_json(folder):
    (folder / "config.json").write_text("not json")  # would fail, were it read
    assert load_dr2(folder, device=CPU).cfg.dim == 64


def test_errors_name_the_config_file_that_was_read(folder):
    (folder / "model.json").unlink()
    (folder / "config.json").write_text("{")
    with pytest.raises(CheckpointMismatch, match="config.json is not readable JSON"):
        load_dr2(folder, device=CPU)


def test_neither_config_file_is_a_clear_error_naming_both(folder):
    (folder / "model.json").unlink()
    with pytest.raises(ModelNotAvailable, match="neither model.json nor config.json"):
        load_dr2(folder, device=CPU)


@pytest.mark.parametrize(
    "field, value, says",
    [
        ("heads", 8, "q/k norms are 16 wide .* makes 4 heads"),
        ("dim", 128, "input projection of the weights is 64 wide"),
        ("depth", 3, "the weights have 2 transformer blocks"),
        ("ff_mult", 2, "MLP is 256 wide"),
        ("mel_dim", 32, "latent embedding takes 64 channels"),
        ("text_num_embeds", 500, "text embedding has 1001 rows"),
    ],
)
@pytest.mark.parametrize("config", ["model.json", "config.json"])
def test_a_config_that_disagrees_with_the_weights_names_the_field(folder, config, field, value, says):
    if config != "model.json":
        (folder / "model.json").rename(folder / config)
    edit_json(folder / config, **{field: value})
    with pytest.raises(CheckpointMismatch, match=f"{field} is {value} in {config}, but .*{says}") as info:
        load_dr2(folder, device=CPU)
    assert info.value.details["field"] == field and info.value.details["config"] == value


def test_block_size_is_not_in_the_weights(folder):
    edit_json(folder / "model.json", block_size=20)
    assert load_dr2(folder, device=CPU).cfg.block_size == 20


def test_the_decoder_takes_its_sampling_rate_from_decoder_json(folder):
    assert load_bigvgan(folder, device=CPU).cfg.sampling_rate == 48_000
    edit_json(folder / "decoder.json", sampling_rate=44_100)
    assert load_bigvgan(folder, device=CPU).cfg.sampling_rate == 44_100


@pytest.mark.parametrize("rate", [None, 0, "48000"])
def test_a_decoder_json_without_a_sampling_rate_is_refused(folder, rate):
    raw = json.loads((folder / "decoder.json").read_text())
    raw.pop("sampling_rate")
    if rate is not None:
        raw["sampling_rate"] = rate
    (folder / "decoder.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointMismatch, match="decoder.json: sampling_rate must be a positive"):
        load_bigvgan(folder, device=CPU)
