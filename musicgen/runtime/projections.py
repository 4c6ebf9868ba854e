"""Fused and packed projections of DiffRhythm 1's DiT, as subclasses of its `Attention` and `MLP` that
`fuse` / `pack` swap in on the module instances (and `unfuse` / `unpack` swap out).

fused: q/k/v of an attention as one (3d, d) weight and gate/up of an MLP as one (2h, d): one matrix
    multiply instead of three and two. The official parameters remain, as views into the fused
    weights, so the state dict, strict loading and saving are unchanged and no weight is held twice.
    A conversion (`.to()`, `.half()`) or a load that replaces the parameters (`assign=True`) fuses the
    new parameters again.
packed (CPU, fp32): the fused weights reordered once into oneDNN's blocked layout, their matrix
    multiplies run through oneDNN instead of MKL, with SiLU, the gate x up product and the residual
    additions as post-ops (inside the matrix multiplies, on the product while it is in cache):
    measured 1.1-1.2x per song, post-ops another 1.03-1.07x, on the project's 2-core AMD CPU, with
    the same numbers to fp32 rounding. The dense copies are freed (the official parameters become
    empty placeholders); `state_dict()` gives the official tensors back under the official names,
    loading unpacks, loads and packs again, and a conversion unpacks (pack again explicitly).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from musicgen.model.dit import MLP, Attention, DiT

# --------------------------------------------------------------------------------------------------
# oneDNN


def packing_available() -> bool:
    """oneDNN's packed-weight linear (what torch.compile's CPU freezing uses) is in this PyTorch build."""
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


def _pack(weight: torch.Tensor) -> torch.Tensor:
    """A (out, in) fp32 weight reordered once into oneDNN's blocked layout (an opaque mkldnn tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 2048)


def packed_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    *,
    activation: str = "none",
    mul: torch.Tensor | None = None,
    add: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ packed.T through oneDNN, followed by at most one post-op that runs inside the matrix multiply:
    an activation ("swish" is SiLU), or the product with `mul`, or the sum with `add` (same shape as
    the output; None: nothing added)."""
    linear = torch.ops.mkldnn._linear_pointwise
    x = x.contiguous()
    if mul is not None:
        return linear.binary(x, mul.contiguous(), packed, None, "mul")
    if add is not None:
        return linear.binary(x, add.contiguous(), packed, None, "add")
    return linear(x, packed, None, activation, [], "")


def _fuse_linears(*linears: nn.Linear) -> torch.Tensor:
    """Concatenate the weights of bias-free linears (rows) and make each weight a view of the result."""
    fused = torch.cat([lin.weight.detach() for lin in linears])
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight = nn.Parameter(fused[start : start + rows], requires_grad=lin.weight.requires_grad)
        start += rows
    return fused


# --------------------------------------------------------------------------------------------------
# the swapped-in classes


class _Fused:
    """What the fused classes share: `_refuse()` builds the fused weight over the current parameters;
    conversions fuse again."""

    def _refuse(self) -> None:
        raise NotImplementedError

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)  # .to() converts each parameter on its own: fuse them again
        self._refuse()
        return out


class FusedAttention(_Fused, Attention):
    qkv: torch.Tensor  # (3d, d); q_proj/k_proj/v_proj.weight are views of it

    def _refuse(self) -> None:
        self.qkv = _fuse_linears(self.q_proj, self.k_proj, self.v_proj)

    def project_qkv(self, x):
        return F.linear(x, self.qkv).split(x.shape[-1], dim=-1)


class FusedMLP(_Fused, MLP):
    gate_up: torch.Tensor  # (2 hidden, dim); gate_proj/up_proj.weight are views of it

    def _refuse(self) -> None:
        self.gate_up = _fuse_linears(self.gate_proj, self.up_proj)

    def project_in(self, x):
        return F.linear(x, self.gate_up).chunk(2, dim=-1)


class _Packed:
    """What the packed classes share: the state dict holds the official dense tensors, loading goes
    through the dense (fused) form, a conversion unpacks."""

    fused_class: type  # the class an unpack returns to

    def dense_weights(self) -> dict[str, torch.Tensor]:
        """The official weights, dense (names relative to this module)."""
        raise NotImplementedError

    def _pack_weights(self) -> None:
        """Pack from the fused form and free the dense copies."""
        raise NotImplementedError

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for name, tensor in self.dense_weights().items():
            state[prefix + name] = tensor
        return state

    def _load_from_state_dict(self, *args, **kwargs):
        # loading copies into the official parameters: give them their shapes back; packed again after
        # the children loaded (see _after_load)
        self._repack_as = type(self)
        _unpack_module(self)
        self._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        _unpack_module(self)  # packed weights are CPU fp32 only
        return self._apply(fn, recurse)


class PackedAttention(_Packed, FusedAttention):
    """q/k/v as one packed matrix multiply, o_proj with the residual addition as a post-op."""

    fused_class = FusedAttention
    qkv_packed: torch.Tensor
    o_packed: torch.Tensor

    def _pack_weights(self) -> None:
        self.qkv_packed, self.o_packed = _pack(self.qkv), _pack(self.o_proj.weight)
        del self.qkv
        _free(self.q_proj, self.k_proj, self.v_proj, self.o_proj)

    def dense_weights(self) -> dict[str, torch.Tensor]:
        q, k, v = self.qkv_packed.to_dense().split(self.heads * self.head_dim)
        return {
            "q_proj.weight": q,
            "k_proj.weight": k,
            "v_proj.weight": v,
            "o_proj.weight": self.o_packed.to_dense(),
        }

    def project_qkv(self, x):
        return packed_linear(x, self.qkv_packed).split(x.shape[-1], dim=-1)

    def project_out(self, out, residual):
        return packed_linear(out, self.o_packed, add=residual)


class PackedMLP(_Packed, FusedMLP):
    """gate with SiLU as a post-op, up with the gate x up product as one, down with the residual
    addition (gate and up stay two matrix multiplies: each carries its own post-op)."""

    fused_class = FusedMLP
    gate_packed: torch.Tensor
    up_packed: torch.Tensor
    down_packed: torch.Tensor

    def _pack_weights(self) -> None:
        self.gate_packed, self.up_packed = _pack(self.gate_proj.weight), _pack(self.up_proj.weight)
        self.down_packed = _pack(self.down_proj.weight)
        del self.gate_up
        _free(self.gate_proj, self.up_proj, self.down_proj)

    def dense_weights(self) -> dict[str, torch.Tensor]:
        return {"gate_proj.weight": self.gate_packed.to_dense(), "up_proj.weight": self.up_packed.to_dense(),
                "down_proj.weight": self.down_packed.to_dense()}  # fmt: skip

    def project_in(self, x):  # without post-ops (benchmarks time them so)
        return packed_linear(x, self.gate_packed), packed_linear(x, self.up_packed)

    def project_out(self, h, residual):
        out = packed_linear(h, self.down_packed)
        return out if residual is None else residual + out

    def forward(self, x, residual=None):
        gate = packed_linear(x, self.gate_packed, activation="swish")
        return packed_linear(packed_linear(x, self.up_packed, mul=gate), self.down_packed, add=residual)


def _free(*linears: nn.Linear) -> None:
    empty = torch.empty(0)
    for lin in linears:
        lin.weight.data = empty


_FUSED = {Attention: FusedAttention, MLP: FusedMLP}
_PACKED = {FusedAttention: PackedAttention, FusedMLP: PackedMLP}


def _after_load(module: nn.Module, _incompatible_keys) -> None:
    """Load post-hook of a fused or packed module: loading may have replaced the parameters
    (assign=True), so fuse the new ones; pack again what was packed."""
    if isinstance(module, _Fused):
        module._refuse()
    repack_as = module.__dict__.pop("_repack_as", None)
    if repack_as is not None:
        _pack_module(module, repack_as)


def _unpack_module(module: nn.Module) -> None:
    """A packed module back to its fused class, with dense official parameters (views of the fused weight)."""
    if not isinstance(module, _Packed):
        return
    dense = module.dense_weights()
    for name in list(vars(module)):
        if name.endswith("_packed"):
            delattr(module, name)
    for name, tensor in dense.items():
        module.get_submodule(name.rsplit(".", 1)[0]).weight.data = tensor.contiguous()
    module.__class__ = module.fused_class
    module._refuse()


def _pack_module(module: nn.Module, cls: type) -> None:
    module.__class__ = cls
    module._pack_weights()


# --------------------------------------------------------------------------------------------------
# a whole model


def _mixers(model: DiT) -> list[nn.Module]:
    return [m for block in model.transformer_blocks for m in (block.self_attn, block.mlp)]


def is_fused(model: DiT) -> bool:
    return all(isinstance(m, _Fused) for m in _mixers(model))


def is_packed(model: DiT) -> bool:
    return all(isinstance(m, _Packed) for m in _mixers(model))


def fuse(model: DiT) -> None:
    """Fused q/k/v and gate/up in every block (see the module's docstring). Idempotent."""
    for m in _mixers(model):
        if type(m) in _FUSED:
            m.__class__ = _FUSED[type(m)]
            m._runtime_hook = m.register_load_state_dict_post_hook(_after_load)
            m._refuse()


def unfuse(model: DiT) -> None:
    """Back to one matrix multiply per official projection (unpacked first)."""
    unpack(model)
    for m in _mixers(model):
        if isinstance(m, _Fused):
            m._runtime_hook.remove()
            del m._runtime_hook
            for name in ("qkv", "gate_up"):
                m.__dict__.pop(name, None)
            m.__class__ = next(base for base, fused in _FUSED.items() if isinstance(m, fused))


def pack(model: DiT, cls_of: dict[type, type] | None = None) -> None:
    """Packed weights in every block (fused first; see the module's docstring). `cls_of` maps each
    fused class to the packed class to swap in (default: `PackedAttention`, `PackedMLP`; benchmarks
    give variants without post-ops)."""
    if model.proj_out.weight.device.type != "cpu" or model.dtype != torch.float32:
        raise RuntimeError("packed weights are for fp32 on the CPU")
    if not packing_available():
        raise RuntimeError("this PyTorch build has no oneDNN packed linear")
    fuse(model)
    classes = {**_PACKED, **(cls_of or {})}
    for m in _mixers(model):
        if type(m) in classes:
            _pack_module(m, classes[type(m)])


def unpack(model: DiT) -> None:
    """Back to dense official parameters, fused."""
    for m in _mixers(model):
        _unpack_module(m)
