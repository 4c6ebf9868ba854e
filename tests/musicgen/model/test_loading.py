"""Strict loading of the official formats, and the errors for files that are not."""

from __future__ import annotations

import pytest
import torch

from musicgen.errors import CheckpointMismatch
from musicgen.model.dit import DiT
from musicgen.model.loading import load_dit, load_vae, save_dit_checkpoint
from musicgen.registry import MODELS, TINY_DIT

CPU = torch.device("cpu")


def test_roundtrip_in_official_layout(tmp_path):
    torch.manual_seed(0)
    model = DiT(TINY_DIT)
    path = save_dit_checkpoint(model, tmp_path / "cfm_model.pt")
    raw = torch.load(path, weights_only=True)
    assert list(raw) == ["model_state_dict"]
    assert all(k.startswith("transformer.") for k in raw["model_state_dict"])
    loaded = load_dit(path, TINY_DIT, device=CPU, dtype=torch.float32)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_base_checkpoint_refused_for_full_model(shared_dir):
    full_cfg = MODELS["diffrhythm-1.2-full"].dit
    with pytest.raises(CheckpointMismatch, match="without a duration embedding"):
        load_dit(
            shared_dir / "conformance/sampler/base_cfm_model.pt", full_cfg, device=CPU, dtype=torch.float32
        )


def test_wrong_shapes_are_refused(shared_dir):
    # the conformance checkpoint is dim 64; the real config is dim 2048
    with pytest.raises(CheckpointMismatch, match="does not fit"):
        load_dit(
            shared_dir / "conformance/sampler/full_cfm_model.pt",
            MODELS["diffrhythm-1.2-full"].dit,
            device=CPU,
            dtype=torch.float32,
        )


def test_missing_and_extra_keys_are_refused(tmp_path):
    model = DiT(TINY_DIT)
    state = {"transformer." + k: v for k, v in model.state_dict().items()}
    del state["transformer.proj_out.bias"]
    torch.save({"model_state_dict": state}, tmp_path / "missing.pt")
    with pytest.raises(CheckpointMismatch, match="proj_out.bias"):
        load_dit(tmp_path / "missing.pt", TINY_DIT, device=CPU, dtype=torch.float32)
    state["transformer.proj_out.bias"] = torch.zeros(64)
    state["transformer.surprise.weight"] = torch.zeros(1)
    torch.save({"model_state_dict": state}, tmp_path / "extra.pt")
    with pytest.raises(CheckpointMismatch, match="surprise"):
        load_dit(tmp_path / "extra.pt", TINY_DIT, device=CPU, dtype=torch.float32)


@pytest.mark.parametrize(
    "content, message",
    [(b"not a checkpoint", "not a readable PyTorch checkpoint"), (None, "no 'model_state_dict'")],
)
def test_unreadable_checkpoints(tmp_path, content, message):
    path = tmp_path / "cfm_model.pt"
    if content is None:
        torch.save({"state_dict": {}}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointMismatch, match=message):
        load_dit(path, TINY_DIT, device=CPU, dtype=torch.float32)


def test_vae_must_be_torchscript_with_export_methods(tmp_path):
    plain = torch.jit.script(torch.nn.Linear(2, 2))
    plain.save(str(tmp_path / "vae.pt"))
    with pytest.raises(CheckpointMismatch, match="decode_export"):
        load_vae(tmp_path / "vae.pt", device=CPU)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointMismatch, match="not a TorchScript VAE"):
        load_vae(tmp_path / "junk.pt", device=CPU)
