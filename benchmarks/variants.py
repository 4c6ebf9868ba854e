"""Variants of the networks that only benchmarks use (and the tests that check them): the official
code's layouts, which the network does not keep as flags, and the packed projections without their
post-ops. Each is a subclass swapped in on the module instances (`module.__class__ = ...`), with the
same parameters and state dict."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from musicgen.model import dr2_dit
from musicgen.model.dit import MLP, Attention, ConvPositionEmbedding
from musicgen.runtime.projections import PackedAttention, PackedMLP, packed_linear


class TransposedConvPositionEmbedding(ConvPositionEmbedding):
    """The official layout: the convolution's transposed output, whose frame-major strides then run
    through the whole residual stream (every linear layer copies its input at batch > 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1d(x.transpose(1, 2)).transpose(1, 2)


class AdditiveMaskAttention(Attention):
    """The official v1.2 code's attention: an all-zero additive float mask (what transformers makes of
    its all-ones mask), the same numbers on a slower kernel."""

    def attend(self, q, k, v):
        if self.causal:
            return super().attend(q, k, v)
        b, _, n, _ = q.shape
        return F.scaled_dot_product_attention(q, k, v, attn_mask=q.new_zeros(b, 1, n, n))


class PackedAttentionWithoutPostOps(PackedAttention):
    def project_out(self, out, residual):
        out = packed_linear(out, self.o_packed)
        return out if residual is None else residual + out


class PackedMLPWithoutPostOps(PackedMLP):
    forward = MLP.forward  # SiLU, the product and the residual addition on their own


class DR2AttentionWithoutMask(dr2_dit.Attention):
    """DiffRhythm 2's attention without the official all-True mask: SDPA may take its fastest kernel."""

    def attend(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # a key-padding mask only


def swap_attention(model, cls: type) -> None:
    """Every block's attention as `cls` (a subclass of its own class's base)."""
    for block in model.transformer_blocks:
        block.self_attn.__class__ = cls


def set_post_ops(model, on: bool) -> None:
    """A packed DiffRhythm 1 DiT's matrix multiplies with their post-ops (the runtime's) or without."""
    pairs = ((PackedAttention, PackedAttentionWithoutPostOps), (PackedMLP, PackedMLPWithoutPostOps))
    for block in model.transformer_blocks:
        for module in (block.self_attn, block.mlp):
            for with_ops, without in pairs:
                if isinstance(module, with_ops):
                    module.__class__ = with_ops if on else without
