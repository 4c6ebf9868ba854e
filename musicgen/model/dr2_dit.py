"""The DiffRhythm 2 backbone in plain PyTorch: a Llama-style transformer (pre-norm RMSNorm, q/k RMSNorm per
head, RoPE, full bidirectional attention, SwiGLU) over a 512-d input embedding of text tokens or latents,
with the flow time given per token and the style added to the input; plus the block key/value cache.

Parameter names follow the official checkpoint (`transformer.` prefix in `model.safetensors`), so the
released weights load strictly. The official code: ASLP-lab/DiffRhythm2's diffrhythm2/backbones/dit.py (`DiT`),
llama_nar.py and llama_attention.py (the layers), diffrhythm2/cache_utils.py (`BlockFlowMatchingCache`).

Shapes: b batch, n tokens, d model width, h heads, e head size (d / h), c = 64 latent channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

COND_DIM = 512  # hard-coded in the official DiT: text, latent, time and style embeddings are 512-d
TIME_FEATURES = 256
RMS_EPS = 1e-6
ROPE_THETA = 10000.0
# token ids of the lyrics front end (the official inference.py's `parse_lyrics`): 0 is the filler, phones
# are 1..363
FILLER = 0


@dataclass(frozen=True)
class DR2Config:
    """`model.json` of a DiffRhythm 2 checkpoint (unknown keys of the file are kept in `extra`)."""

    dim: int = 2048
    depth: int = 16
    heads: int = 16
    ff_mult: int = 4
    mel_dim: int = 64
    text_num_embeds: int = 1000
    block_size: int = 10
    repa_depth: int = -1
    repa_dims: tuple[int, ...] = (1024,)
    long_skip_connection: bool = False
    extra: dict = field(default_factory=dict, compare=False)

    @classmethod
    def from_json(cls, raw: dict) -> DR2Config:
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        args = {k: (tuple(v) if k == "repa_dims" else v) for k, v in raw.items() if k in known}
        return cls(**args, extra={k: v for k, v in raw.items() if k not in known})

    def __post_init__(self):
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} is not divisible by heads={self.heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


class RMSNorm(nn.Module):
    """Llama's RMSNorm: computed in fp32, cast back, then scaled."""

    def __init__(self, size: int, eps: float = RMS_EPS):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def time_features(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(b, n) flow times -> (b, n, 256) [sin | cos] of 1000 t f_k, f_k = 10000^(-k/127), in fp32, then
    rounded to `dtype` (the official text and cache passes give their +-1 times as fp16)."""
    half = TIME_FEATURES // 2
    freqs = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))
    arg = (1000 * t.unsqueeze(-1)) * freqs
    out = torch.cat((arg.sin(), arg.cos()), dim=-1)
    return out if dtype is None else out.to(dtype)


class TimeEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.time_mlp = nn.Sequential(
            nn.Linear(TIME_FEATURES, COND_DIM), nn.SiLU(), nn.Linear(COND_DIM, COND_DIM)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (b, n, 256) -> (b, n, 512)
        return self.time_mlp(features.to(self.time_mlp[0].weight.dtype))


class TextEmbedding(nn.Module):
    def __init__(self, num_embeds: int):
        super().__init__()
        self.text_embed = nn.Embedding(num_embeds + 1, COND_DIM)  # id 0: the filler

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text_embed(tokens)


class InputEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(COND_DIM, COND_DIM)
        self.proj_2 = nn.Linear(COND_DIM, dim)

    def forward(self, x: torch.Tensor, style: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        # x, time (b, n, 512); style (b, 512)
        h = self.proj(x + style.unsqueeze(1) + time) + x
        return self.proj_2(h)


class OutputNorm(nn.Module):
    """LayerNorm without affine, modulated by the time embedding: scale first, then shift."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(COND_DIM, 2 * dim)
        self.dim = dim

    def forward(self, h: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        scale, shift = torch.chunk(self.linear(F.silu(time)), 2, dim=-1)
        return F.layer_norm(h, (self.dim,), eps=1e-6) * (1 + scale) + shift


def rope_tables(
    positions: torch.Tensor, head_dim: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, n) positions -> cos, sin (b, n, e) of Llama's non-interleaved RoPE, computed in fp32."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (ROPE_THETA**exponents)
    freqs = (
        inv_freq[None, :, None].expand(positions.shape[0], -1, 1) @ positions[:, None, :].float()
    ).transpose(1, 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return (x * cos) + (_rotate_half(x) * sin)


class BlockCache:
    """Keys and values of one sampling stream (cond or null), per layer: the text's, stored by the text
    pass, and the clean blocks', appended by each block's cache pass. Keys are stored after q/k norm and
    RoPE. `mode`: "text" (store the call's as the text part; attend to the text only), "store" (append
    the call's to the history, attend to text + history) or "step" (attend to text + history + the
    call's, store nothing: the noisy ODE steps).

    With `capacity` (tokens: text + every block), each layer's keys and values live in one buffer
    allocated at the first call: a call writes its own at the end of what is kept and attends to a view
    of the prefix, where the official cache concatenates text, history and the call's anew at every
    step (a copy of the whole history per layer per step). Without it, it works as the official one."""

    def __init__(self, depth: int, capacity: int | None = None):
        self.text_k: list[torch.Tensor | None] = [None] * depth
        self.text_v: list[torch.Tensor | None] = [None] * depth
        self.k: list[torch.Tensor | None] = [None] * depth
        self.v: list[torch.Tensor | None] = [None] * depth
        self.capacity = capacity
        self.kept = [0] * depth  # buffered mode: tokens kept (text + history) per layer
        self.mode = "step"
        # every key is attended to (one length per batch): no key-padding mask, no per-row lengths
        self.key_mask: torch.Tensor | None = None
        self.key_lengths: list[int] | None = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.capacity is not None:
            return self._update_buffered(layer, k, v)
        if self.mode == "text":
            self.text_k[layer], self.text_v[layer] = k, v
            return k, v
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=-2)
            v = torch.cat([self.v[layer], v], dim=-2)
        if self.mode == "store":
            self.k[layer], self.v[layer] = k, v
        if self.text_k[layer] is not None:
            k = torch.cat([self.text_k[layer], k], dim=-2)
            v = torch.cat([self.text_v[layer], v], dim=-2)
        return k.contiguous(), v.contiguous()

    def _update_buffered(self, layer, k, v):
        if self.k[layer] is None:
            b, h, _, e = k.shape
            self.k[layer] = k.new_empty(b, h, self.capacity, e)
            self.v[layer] = v.new_empty(b, h, self.capacity, e)
        start, n = self.kept[layer], k.shape[-2]
        if start + n > self.capacity:
            raise ValueError(f"the key/value cache holds {self.capacity} tokens; {start + n} were asked for")
        self.k[layer][:, :, start : start + n] = k
        self.v[layer][:, :, start : start + n] = v
        if self.mode in ("text", "store"):
            self.kept[layer] = start + n
        return self.k[layer][:, :, : start + n], self.v[layer][:, :, : start + n]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (requests that left the batch are dropped from it)."""
        for group in (self.text_k, self.text_v, self.k, self.v):
            for i, t in enumerate(group):
                if t is not None:
                    group[i] = t.index_select(0, rows)

    def nbytes(self) -> int:
        """Bytes held: what the cache keeps (in buffered mode, its buffers' whole capacity)."""
        tensors = [t for group in (self.text_k, self.text_v, self.k, self.v) for t in group if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


class Attention(nn.Module):
    """`forward` is a template over `project_qkv`, `attend` and `project_out`, which a subclass may
    replace (a benchmark swaps in attention without the official mask)."""

    def __init__(self, cfg: DR2Config):
        super().__init__()
        d, self.heads, self.head_dim = cfg.dim, cfg.heads, cfg.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (b, n, d) -> q, k, v, each (b, n, d)."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """q (b, h, n, e), k and v (b, h, m, e) -> (b, h, n, e). The official call passes an all-True
        boolean mask: full attention either way, but SDPA may not take its fastest kernel with it.
        `mask` (broadcastable to (b, h, n, m), True = attend) is a cache's key-padding mask, when the
        cache gives one (rows of different lengths padded into one call)."""
        if mask is None:
            b, _, n, _ = q.shape
            mask = torch.ones(b, 1, n, k.shape[-2], dtype=torch.bool, device=q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def attend_rows(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int]
    ) -> torch.Tensor:
        """Variable-length attention: row i attends to its first lengths[i] keys, one call per row on
        views of k and v without a mask (every key of the view, as with the official all-True one), so
        no padded key is computed. A cache gives `key_lengths` on the CPU,
        where SDPA's kernel with a key-padding mask computes every padded key (measured 25% slower on
        a tick of 16 rows of 160-475 keys)."""
        out = torch.empty_like(q)
        for i, n in enumerate(lengths):
            out[i : i + 1] = F.scaled_dot_product_attention(
                q[i : i + 1], k[i : i + 1, :, :n], v[i : i + 1, :, :n]
            )
        return out

    def project_out(self, out: torch.Tensor) -> torch.Tensor:
        return self.o_proj(out)

    def forward(self, x, cos, sin, cache: BlockCache | None, layer: int) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (
            t.view(b, n, -1, self.head_dim).transpose(1, 2) for t in self.project_qkv(x)
        )  # (b, h, n, e)
        q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        mask = lengths = None
        if cache is not None:
            k, v = cache.update(layer, k, v)
            mask, lengths = cache.key_mask, cache.key_lengths
        if lengths is not None:
            out = self.attend_rows(q, k, v, lengths)
        else:
            out = self.attend(q, k, v) if mask is None else self.attend(q, k, v, mask)
        return self.project_out(out.transpose(1, 2).contiguous().reshape(b, n, -1))


class MLP(nn.Module):
    """`forward` is a template over `project_in` and `project_out`."""

    def __init__(self, cfg: DR2Config):
        super().__init__()
        hidden = cfg.dim * cfg.ff_mult
        self.gate_proj = nn.Linear(cfg.dim, hidden, bias=False)
        self.up_proj = nn.Linear(cfg.dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, cfg.dim, bias=False)

    def project_in(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate_proj(x), self.up_proj(x)

    def project_out(self, h: torch.Tensor) -> torch.Tensor:
        return self.down_proj(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.project_in(x)
        return self.project_out(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: DR2Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim)
        self.mlp = MLP(cfg)

    def forward(self, h, cos, sin, cache, layer):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, cache, layer)
        return h + self.mlp(self.post_attention_layernorm(h))


class DR2DiT(nn.Module):
    """The official `DiT` (the `transformer` of its CFM): `forward(x, time_features, positions, style,
    cache)` -> velocity (b, n, 64). `x` is already 512-d: `text_embed(tokens)` or `latent_embed(latents)`."""

    def __init__(self, cfg: DR2Config):
        super().__init__()
        self.cfg = cfg
        self.time_embed = TimeEmbedding()
        self.text_embed = TextEmbedding(cfg.text_num_embeds)
        self.input_embed = InputEmbedding(cfg.dim)
        self.latent_embed = nn.Sequential(nn.Linear(cfg.mel_dim, COND_DIM), nn.Linear(COND_DIM, COND_DIM))
        self.transformer_blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.long_skip_connection = (
            nn.Linear(2 * cfg.dim, cfg.dim, bias=False) if cfg.long_skip_connection else None
        )
        self.norm_out = OutputNorm(cfg.dim)
        self.proj_out = nn.Linear(cfg.dim, cfg.mel_dim)
        # REPA projection heads: trained with the model, in the checkpoint, never used at inference
        self.projectors = (
            nn.ModuleList(
                nn.Sequential(
                    nn.Linear(cfg.dim, 2 * cfg.dim),
                    nn.SiLU(),
                    nn.Linear(2 * cfg.dim, 2 * cfg.dim),
                    nn.SiLU(),
                    nn.Linear(2 * cfg.dim, r),
                )  # fmt: skip
                for r in cfg.repa_dims
            )
            if cfg.repa_depth > 0
            else None
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype

    def forward(
        self,
        x: torch.Tensor,  # (b, n, 512)
        time: torch.Tensor,  # (b, n, 256) time features (time_features)
        positions: torch.Tensor,  # (b, n)
        style: torch.Tensor,  # (b, 512)
        cache: BlockCache | None = None,
    ) -> torch.Tensor:
        c = self.time_embed(time)
        h = self.input_embed(x, style, c)
        residual = h
        cos, sin = rope_tables(positions, self.cfg.head_dim, h.dtype)
        for i, block in enumerate(self.transformer_blocks):
            h = block(h, cos, sin, cache, i)
        if self.long_skip_connection is not None:
            h = self.long_skip_connection(torch.cat((h, residual), dim=-1))
        return self.proj_out(self.norm_out(h, c))
