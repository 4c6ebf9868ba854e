"""The DiT's fast paths (musicgen/runtime/projections.py, compile.py) compute the official numbers:
fused projections over the official parameters, a contiguous residual stream, compiled blocks."""

from __future__ import annotations

import shutil

import pytest
import torch

from benchmarks.variants import (
    AdditiveMaskAttention,
    TransposedConvPositionEmbedding,
    set_post_ops,
    swap_attention,
)
from musicgen.model.dit import DiT
from musicgen.model.loading import load_dit, save_dit_checkpoint
from musicgen.registry import DR1, TINY_DIT
from musicgen.runtime.compile import compile_modules
from musicgen.runtime.plans import apply_execution, resolve_execution
from musicgen.runtime.projections import fuse, is_fused, is_packed, pack, packing_available, unfuse

CPU = torch.device("cpu")


def _random_dit(seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    model = DiT(TINY_DIT).eval()
    with torch.no_grad():  # the official init zeroes some layers; random weights exercise every path
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def _velocity(model: DiT, frames: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    text = torch.randint(0, 364, (2, frames), generator=g)
    with torch.inference_mode():
        pre = model.prepare(torch.zeros(2, frames, 64), model.embed_text(text), torch.randn(2, 512, generator=g),
                            torch.zeros(2), torch.full((2,), 0.1))  # fmt: skip
        return model.velocity(torch.randn(2, frames, 64, generator=g), torch.tensor(0.4), pre)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _load_for_cpu(path, *, compile: str = "off") -> DiT:
    """As the pipeline loads a DiT for the CPU in fp32: loaded, then the runtime's fast paths."""
    model = load_dit(path, TINY_DIT, device=CPU, dtype=torch.float32)
    apply_execution(model, resolve_execution(DR1, CPU, torch.float32, compile=compile))
    return model


def test_loaded_models_run_fused_projections_over_the_official_parameters(tmp_path):
    """q/k/v and gate/up run as one matrix multiply each; the official parameters are views into the
    fused weights (no weight held twice), the state dict is the official one, and the numbers are the
    unfused ones."""
    model = _random_dit()
    path = save_dit_checkpoint(model, tmp_path / "cfm_model.pt")
    loaded = load_dit(path, TINY_DIT, device=CPU, dtype=torch.float32)
    fuse(loaded)
    assert is_fused(loaded) and not is_fused(model)
    assert list(loaded.state_dict()) == list(model.state_dict())
    for block in loaded.transformer_blocks:
        attn, mlp = block.self_attn, block.mlp
        assert attn.qkv.shape == (3 * TINY_DIT.dim, TINY_DIT.dim)
        assert all(_storage(p.weight) == _storage(attn.qkv) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        assert all(_storage(p.weight) == _storage(mlp.gate_up) for p in (mlp.gate_proj, mlp.up_proj))
        assert torch.equal(attn.qkv, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert torch.allclose(_velocity(loaded), _velocity(model), atol=1e-6, rtol=0)
    unfuse(loaded)
    assert torch.equal(_velocity(loaded), _velocity(model))


def test_fused_weights_follow_dtype_changes_and_new_weights(tmp_path):
    model = _random_dit()
    fuse(model)
    model.double()  # .to() converts each parameter on its own: the fused weights are rebuilt
    attn = model.transformer_blocks[0].self_attn
    assert attn.qkv.dtype == torch.float64 and _storage(attn.q_proj.weight) == _storage(attn.qkv)
    model.float()
    other = _random_dit(seed=1)
    reference = _velocity(other)
    model.load_state_dict(other.state_dict())  # copied into the views, so into the fused weights
    assert torch.allclose(_velocity(model), reference, atol=1e-6, rtol=0)
    model.load_state_dict(_random_dit(seed=2).state_dict(), assign=True)  # new tensors: fused again
    fresh = _random_dit(seed=2)
    assert _storage(model.transformer_blocks[0].mlp.gate_proj.weight) == _storage(
        model.transformer_blocks[0].mlp.gate_up
    )
    assert torch.allclose(_velocity(model), _velocity(fresh), atol=1e-6, rtol=0)
    # a checkpoint written from a fused model holds each official tensor on its own
    raw = torch.load(save_dit_checkpoint(model, tmp_path / "fused.pt"), weights_only=True)["model_state_dict"]
    q = raw["transformer.transformer_blocks.0.self_attn.q_proj.weight"]
    assert q.untyped_storage().nbytes() == q.numel() * q.element_size()


def test_the_residual_stream_is_contiguous():
    """The conv position embedding's transposed output would otherwise set the layout of the whole
    residual stream (and make every linear layer copy its input)."""
    model = _random_dit()
    h = torch.randn(2, 48, TINY_DIT.dim)
    assert model.input_embed.conv_pos_embed(h).is_contiguous()
    model.input_embed.conv_pos_embed.__class__ = TransposedConvPositionEmbedding  # the benchmark's variant
    assert not model.input_embed.conv_pos_embed(h).is_contiguous()


@pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler for torch.compile"
)
def test_compiled_blocks_equal_eager():
    """Compiled blocks (the `compile` setting): the same numbers as eager, to fp32 precision."""
    model = _random_dit()
    fuse(model)
    eager = _velocity(model)
    compile_modules(model.transformer_blocks)
    try:
        compiled = _velocity(model)
    finally:
        torch._dynamo.reset()
    assert torch.allclose(compiled, eager, atol=1e-5, rtol=0), (compiled - eager).abs().max()


def test_the_official_additive_mask_changes_speed_not_numbers():
    """The official v1.2 code's all-zero additive mask (the benchmark's reference swaps it in)."""
    model = _random_dit()
    plain = _velocity(model)
    swap_attention(model, AdditiveMaskAttention)
    assert torch.allclose(_velocity(model), plain, atol=1e-6, rtol=0)


def test_fusing_is_chosen_by_device(tmp_path):
    path = save_dit_checkpoint(_random_dit(), tmp_path / "cfm_model.pt")
    assert is_fused(_load_for_cpu(path))  # fused on the CPU
    assert not is_fused(load_dit(path, TINY_DIT, device=CPU, dtype=torch.float32))  # loading alone: eager
    cuda = resolve_execution(DR1, torch.device("cuda"), torch.bfloat16, compile="off")
    assert not cuda.fuse and not cuda.pack  # measured slower there
    compiling = resolve_execution(DR1, CPU, torch.float32, compile="on")
    assert compiling.fuse and not compiling.pack  # packed weights are not combined with compiling


def _failing_backend(gm, example_inputs):
    raise RuntimeError("no compiler toolchain here")


def test_a_compile_that_fails_runs_eagerly_or_refuses_to_load(monkeypatch, caplog):
    """compile=auto on a machine whose toolchain fails: a warning and eager blocks (the numbers are
    the eager ones); compile=on: the model does not load, with a recovery hint."""
    from musicgen.errors import ModelNotAvailable
    from musicgen.pipelines.dr1 import _compile_probe
    from musicgen.runtime.compile import compile_or_fall_back, is_compiled

    model = _random_dit()
    eager = _velocity(model)
    blocks, probe = list(model.transformer_blocks), _compile_probe(model, CPU)
    try:
        with caplog.at_level("WARNING", logger="musicgen.runtime.compile"):
            assert not compile_or_fall_back(blocks, probe, required=False, backend=_failing_backend)
        assert "running the DiT eagerly" in caplog.text
        assert not any(is_compiled(b) for b in blocks)
        assert torch.equal(_velocity(model), eager)
        with pytest.raises(ModelNotAvailable) as err:
            compile_or_fall_back(blocks, probe, required=True, backend=_failing_backend)
        assert "C compiler" in err.value.recovery
    finally:
        torch._dynamo.reset()


needs_packing = pytest.mark.skipif(not packing_available(), reason="no oneDNN packed linear in this PyTorch")


@needs_packing
def test_packed_weights_compute_the_official_numbers_and_keep_the_official_state_dict(tmp_path):
    """oneDNN packed weights (the CPU default at load), with and without post-ops: same numbers to fp32
    rounding, dense copies freed, the official state dict given back exactly, a checkpoint written from it loads strictly."""
    model = _random_dit()
    reference = _velocity(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path = save_dit_checkpoint(model, tmp_path / "cfm_model.pt")
    loaded = _load_for_cpu(path)
    assert is_packed(loaded) and is_fused(loaded)
    attn = loaded.transformer_blocks[0].self_attn
    assert attn.q_proj.weight.numel() == 0 and not hasattr(attn, "qkv")  # not held twice
    assert torch.allclose(_velocity(loaded), reference, atol=1e-5, rtol=0)
    # SiLU, gate x up and the residual additions as oneDNN post-ops (the default) or on their own
    set_post_ops(loaded, False)
    assert torch.allclose(_velocity(loaded), reference, atol=1e-5, rtol=0)
    set_post_ops(loaded, True)
    got = loaded.state_dict()
    assert list(got) == list(state)
    assert all(torch.equal(got[k], v) for k, v in state.items())
    again = _load_for_cpu(save_dit_checkpoint(loaded, tmp_path / "again.pt"))
    assert torch.equal(_velocity(again), _velocity(loaded))


@needs_packing
def test_packed_models_load_new_weights_and_unpack_on_conversion():
    model = _random_dit()
    pack(model)
    other = _random_dit(seed=1)
    model.load_state_dict(other.state_dict())  # unpacked for loading, packed again after
    assert is_packed(model)
    assert torch.allclose(_velocity(model), _velocity(other), atol=1e-5, rtol=0)
    model.double()  # packed weights are fp32 CPU only: a conversion unpacks
    assert not is_packed(model) and model.transformer_blocks[0].self_attn.qkv.dtype == torch.float64
    model.float()
    assert torch.allclose(_velocity(model), _velocity(other), atol=1e-6, rtol=0)
    with pytest.raises(RuntimeError, match="fp32 on the CPU"):
        pack(model.to(torch.bfloat16))
