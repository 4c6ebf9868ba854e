"""The DiffRhythm DiT: the network only (no sampling state), in plain PyTorch.

Parameter names match the official `cfm_model.pt` (with the `transformer.` prefix that the CFM wrapper
adds), so official checkpoints load with `strict=True`. The blocks are the Llama decoder layers the
official code takes from `transformers` (RMSNorm eps 1e-6, SwiGLU MLP, RoPE theta 10000, 32 heads,
no biases), written out here so that attention goes straight to `scaled_dot_product_attention`.

The forward pass is split in two so that a sampler can do the step-invariant work once per request:
`prepare()` embeds everything that does not depend on the noisy latent or the flow time (text path,
ConvNeXt blocks, text-fusion projections, the cond/text/style part of the input projection,
start/duration embeddings, RoPE tables) and `velocity()` runs one ODE step on top of it.
`forward()` is the two called back to back, with the official signature's meaning.

Precision: RoPE tables, sinusoidal timestep features and RMSNorm statistics are always fp32, whatever
the weights' dtype (the official fp16 run rounds its RoPE phases to fp16, which drifts at long
positions).

How the network runs (fused or packed projections, compiled blocks, plans, CUDA graphs) is not here:
see musicgen/runtime/.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

COND_DIM = 512  # width of time/start/duration embeddings and of the style embedding (MuQ-MuLan)
TIME_FREQ_DIM = 256


@dataclass(frozen=True)
class DiTConfig:
    """Hyperparameters of one DiffRhythm DiT. Field names follow the official `config/*.json`."""

    dim: int = 2048
    depth: int = 16
    ff_mult: int = 4
    text_dim: int = 512
    conv_layers: int = 4
    mel_dim: int = 64
    text_num_embeds: int = 363
    max_frames: int = 2048
    # The official code builds LlamaConfig(hidden_size=dim, ...) without num_attention_heads, so the
    # attention always has LlamaConfig's default of 32 heads, whatever the JSON's "heads" says.
    heads: int = 32
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    # v1.2-full has a duration embedding; v1.0 and v1.2-base do not.
    duration_embed: bool = False
    # v1.0 called its Llama layers without an attention mask, which transformers' SDPA path turns
    # into causal attention; v1.2 passes an all-ones mask and so attends to every frame.
    causal: bool = False

    def __post_init__(self):
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} is not divisible by heads={self.heads}")
        if self.text_dim != COND_DIM:
            # text-fusion layers are nn.Linear(COND_DIM, dim) applied to the text embedding
            raise ValueError(f"text_dim must be {COND_DIM} (the official text-fusion layers assume it)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @classmethod
    def from_official_json(cls, cfg: dict, **overrides) -> DiTConfig:
        """From the `model` section of an official `config/diffrhythm-1b.json`-style file.

        `heads` there is ignored on purpose: see the `heads` field.
        """
        known = ("dim", "depth", "ff_mult", "text_dim", "conv_layers", "mel_dim", "text_num_embeds")
        return cls(**{k: cfg[k] for k in known if k in cfg}, **overrides)


# --------------------------------------------------------------------------------------------------
# building blocks


def sinusoidal_features(t: torch.Tensor, dim: int = TIME_FREQ_DIM, scale: float = 1000.0) -> torch.Tensor:
    """(b,) flow times -> (b, dim) fp32 features: [sin, cos] of scale * t * 10000^(-k/(half-1))."""
    half = dim // 2
    freqs = torch.exp(
        torch.arange(half, device=t.device, dtype=torch.float32) * -(math.log(10000) / (half - 1))
    )
    arg = scale * t.float()[:, None] * freqs[None, :]
    return torch.cat((arg.sin(), arg.cos()), dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int = COND_DIM, freq_dim: int = TIME_FREQ_DIM):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (b,) -> (b, dim)
        feats = sinusoidal_features(t, self.freq_dim)
        return self.time_mlp(feats.to(self.time_mlp[0].weight.dtype))


def text_position_table(dim: int, length: int, device=None) -> torch.Tensor:
    """(length, dim) fp32 [cos | sin] table added to the lyric embedding before the ConvNeXt blocks."""
    freqs = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, device=device)[: dim // 2].float() / dim))
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), freqs)
    return torch.cat((angles.cos(), angles.sin()), dim=-1)


class GRN(nn.Module):
    """Global response normalisation (ConvNeXt-V2), over the time axis."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, n, d)
        gx = torch.norm(x, p=2, dim=1, keepdim=True)  # (b, 1, d)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


class ConvNeXtV2Block(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.grn = GRN(hidden)
        self.pwconv2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, n, d)
        h = self.dwconv(x.transpose(1, 2)).transpose(1, 2)
        h = self.pwconv2(self.grn(self.act(self.pwconv1(self.norm(h)))))
        return x + h


class TextEmbedding(nn.Module):
    """Frame-aligned lyric tokens -> (b, n, text_dim). Token 0 is the filler."""

    def __init__(self, num_embeds: int, dim: int, conv_layers: int, max_pos: int):
        super().__init__()
        self.dim = dim
        self.max_pos = max_pos
        self.text_embed = nn.Embedding(num_embeds + 1, dim)
        self.text_blocks = nn.Sequential(*[ConvNeXtV2Block(dim, dim * 2) for _ in range(conv_layers)])

    def forward(self, text: torch.Tensor) -> torch.Tensor:  # (b, n) int -> (b, n, d)
        x = self.text_embed(text)
        if len(self.text_blocks):
            n = text.shape[1]
            # positions past the table repeat its last row, as the official get_pos_embed_indices does
            table = text_position_table(self.dim, min(n, self.max_pos), device=text.device)
            if n > self.max_pos:
                table = torch.cat((table, table[-1:].expand(n - self.max_pos, -1)))
            x = (x.float() + table).to(x.dtype)
            x = self.text_blocks(x)
        return x


class ConvPositionEmbedding(nn.Module):
    def __init__(self, dim: int, kernel_size: int = 31, groups: int = 16):
        super().__init__()
        self.conv1d = nn.Sequential(
            nn.Conv1d(dim, dim, kernel_size, groups=groups, padding=kernel_size // 2),
            nn.Mish(),
            nn.Conv1d(dim, dim, kernel_size, groups=groups, padding=kernel_size // 2),
            nn.Mish(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, n, d)
        # The convolution works on (b, d, n); transposed back, its output is a (b, n, d) view with
        # frame-major strides, and `conv_pos_embed(h) + h` would carry that layout through the whole
        # residual stream, so that every linear layer copies its input at batch > 1: made contiguous.
        return self.conv1d(x.transpose(1, 2)).transpose(1, 2).contiguous()


class InputEmbedding(nn.Module):
    """proj(cat(x, cond, text, style, time)) + conv position embedding.

    The projection is linear, so it is split by input: the cond/text/style part (step-invariant) is
    computed once per request by `invariant()`, and each step adds only the x and time parts.
    """

    def __init__(self, mel_dim: int, text_dim: int, out_dim: int):
        super().__init__()
        self.mel_dim, self.text_dim = mel_dim, text_dim
        self.proj = nn.Linear(mel_dim * 2 + text_dim + COND_DIM * 2, out_dim)
        self.conv_pos_embed = ConvPositionEmbedding(out_dim)

    def _weights(self):
        # column blocks of proj.weight in the official concatenation order: x, cond, text, style, time
        sizes = (self.mel_dim, self.mel_dim, self.text_dim, COND_DIM, COND_DIM)
        return torch.split(self.proj.weight, sizes, dim=1)

    def invariant(self, cond: torch.Tensor, text_emb: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        """(g, n, mel), (g, n, text_dim), (g, COND_DIM) -> (g, n, out_dim), bias included."""
        _, w_cond, w_text, w_style, _ = self._weights()
        per_frame = F.linear(cond, w_cond) + F.linear(text_emb, w_text)
        return per_frame + (F.linear(style, w_style) + self.proj.bias)[:, None, :]

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, invariant: torch.Tensor, rows: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        """x (rows, n, mel), c (rows, COND_DIM), invariant (g, n, out) -> (rows, n, out)."""
        w_x, *_, w_time = self._weights()
        h = F.linear(x, w_x) + F.linear(c, w_time)[:, None, :]
        h = _add_grouped(h, invariant, rows)
        return self.conv_pos_embed(h) + h


def _add_grouped(
    x: torch.Tensor, per_group: torch.Tensor, rows: tuple[int, ...] | None = None
) -> torch.Tensor:
    """x (sum(rows), ...) + per_group (g, ...): group j is added to its rows[j] consecutive rows of x.

    rows=None means the same number of rows per group (broadcast, no copy of per_group); uneven groups
    (a batch of requests with different numbers of takes) are added slice by slice.
    """
    g = per_group.shape[0]
    if rows is None or len(set(rows)) == 1:
        if x.shape[0] == g:
            return x + per_group
        return (x.unflatten(0, (g, -1)) + per_group.unsqueeze(1)).flatten(0, 1)
    if len(rows) != g or sum(rows) != x.shape[0]:
        raise ValueError(f"row layout {rows} does not fit {x.shape[0]} rows in {g} groups")
    out = torch.empty_like(x)
    start = 0
    for j, r in enumerate(rows):
        torch.add(x[start : start + r], per_group[j], out=out[start : start + r])
        start += r
    return out


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_table(head_dim: int, length: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (length, head_dim) cos and sin, in Llama's rotate-half layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (b, h, n, hd) rotated in fp32, returned in x's dtype."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    """Llama self-attention. `forward` is a template over `project_qkv`, `attend` and `project_out`,
    which a subclass may replace (the runtime swaps in fused or packed projections, see
    musicgen/runtime/projections.py; benchmarks swap in the official code's masked attention)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.heads, self.head_dim, self.causal = cfg.heads, cfg.head_dim, cfg.causal
        d = cfg.dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (b, n, d) -> q, k, v, each (b, n, d)."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v (b, h, n, hd) -> (b, h, n, hd). The official v1.2 code passes an all-ones attention
        mask, which transformers turns into an all-zero additive float mask: the same numbers, on a
        slower attention kernel; here no mask."""
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal and q.shape[2] > 1)

    def project_out(self, out: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """residual + o_proj(out) (residual None: o_proj(out) alone)."""
        out = self.o_proj(out)
        return out if residual is None else residual + out

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """residual + attention(x) (residual None: attention alone)."""
        b, n, _ = x.shape

        def heads(t):  # (b, n, d) -> (b, h, n, hd)
            return t.view(b, n, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = self.project_qkv(x)
        q, k, v = apply_rope(heads(q), *rope), apply_rope(heads(k), *rope), heads(v)
        out = self.attend(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return self.project_out(out, residual)


class MLP(nn.Module):
    """SwiGLU. `forward` is a template over `project_in` and `project_out` (see `Attention`)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def project_in(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (b, n, dim) -> gate, up, each (b, n, hidden)."""
        return self.gate_proj(x), self.up_proj(x)

    def project_out(self, h: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """residual + down_proj(h) (residual None: down_proj(h) alone)."""
        out = self.down_proj(h)
        return out if residual is None else residual + out

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """residual + down(silu(gate(x)) * up(x)) (residual None: the MLP alone)."""
        gate, up = self.project_in(x)
        return self.project_out(F.silu(gate) * up, residual)


class DecoderBlock(nn.Module):
    """A Llama decoder layer (pre-RMSNorm attention and SwiGLU MLP with residuals)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg.dim, cfg.dim * cfg.ff_mult)

    def forward(self, x: torch.Tensor, rope) -> torch.Tensor:
        x = self.self_attn(self.input_layernorm(x), rope, residual=x)
        return self.mlp(self.post_attention_layernorm(x), residual=x)


class AdaLayerNormFinal(nn.Module):
    def __init__(self, dim: int, cond_dim: int):
        super().__init__()
        self.linear = nn.Linear(cond_dim, dim * 2)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # x (b, n, d), c (b, cond)
        scale, shift = self.linear(F.silu(c)).chunk(2, dim=1)
        return self.norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]


# --------------------------------------------------------------------------------------------------
# the network


@dataclass
class Conditioning:
    """Step-invariant tensors for g groups (e.g. g=2: the conditional and the null branch of one
    request; or R requests' conditional groups plus their shared null groups).

    A batch passed to `DiT.velocity` has one block of consecutive rows per group (the takes), which
    share these tensors: `rows[j]` rows for group j, or the same number for every group when None.
    """

    input_bias: torch.Tensor  # (g, n, dim): cond/text/style part of the input projection, with bias
    fusion: list[torch.Tensor]  # depth//2 x (g, n, dim): text-fusion residuals
    extra_time: torch.Tensor  # (g, COND_DIM): start-time (+ duration) embedding
    rope: tuple[torch.Tensor, torch.Tensor] = field(repr=False)  # fp32 (n, head_dim) cos, sin
    rows: tuple[int, ...] | None = None  # rows of the batch per group; None: evenly split

    @property
    def groups(self) -> int:
        return self.input_bias.shape[0]

    def group(self, j: int) -> Conditioning:
        """Group j alone, for a batch of its rows (views, no copies)."""
        return Conditioning(
            input_bias=self.input_bias[j : j + 1],
            fusion=[f[j : j + 1] for f in self.fusion],
            extra_time=self.extra_time[j : j + 1],
            rope=self.rope,
        )

    def select(self, groups: list[int], rows: tuple[int, ...]) -> Conditioning:
        """The conditioning of a subset of the groups (in that order), for a new row layout."""
        idx = torch.tensor(groups, device=self.input_bias.device)
        return Conditioning(
            input_bias=self.input_bias.index_select(0, idx),
            fusion=[f.index_select(0, idx) for f in self.fusion],
            extra_time=self.extra_time.index_select(0, idx),
            rope=self.rope,
            rows=rows,
        )


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.time_embed = TimestepEmbedding()
        self.start_time_embed = TimestepEmbedding()
        self.duration_time_embed = TimestepEmbedding() if cfg.duration_embed else None
        self.text_embed = TextEmbedding(cfg.text_num_embeds, cfg.text_dim, cfg.conv_layers, cfg.max_frames)
        self.input_embed = InputEmbedding(cfg.mel_dim, cfg.text_dim, cfg.dim)
        self.transformer_blocks = nn.ModuleList([DecoderBlock(cfg) for _ in range(cfg.depth)])
        self.text_fusion_linears = nn.ModuleList(
            [nn.Sequential(nn.Linear(COND_DIM, cfg.dim), nn.SiLU()) for _ in range(cfg.depth // 2)]
        )
        self.norm_out = AdaLayerNormFinal(cfg.dim, COND_DIM)
        self.proj_out = nn.Linear(cfg.dim, cfg.mel_dim)
        # The null-branch text (all fillers) embeds to the same tensor for every request of a given
        # length: keep the last few, keyed by (length, dtype, device). Not part of the state dict.
        self._null_text_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.null_text_cache_size = 4
        self.register_load_state_dict_post_hook(lambda module, _keys: module._null_text_cache.clear())

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype

    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        """(g, n) frame-aligned token ids -> (g, n, text_dim)."""
        return self.text_embed(text)

    def null_text_embedding(self, length: int, device) -> torch.Tensor:
        """(1, n, text_dim): embedding of an all-filler lyric (the CFG null branch), cached."""
        key = (length, self.dtype, str(device))
        hit = self._null_text_cache.get(key)
        if hit is not None:
            self._null_text_cache.move_to_end(key)
            return hit
        emb = self.embed_text(torch.zeros(1, length, dtype=torch.long, device=device))
        self._null_text_cache[key] = emb
        while len(self._null_text_cache) > self.null_text_cache_size:
            self._null_text_cache.popitem(last=False)
        return emb

    def prepare(
        self,
        cond: torch.Tensor,  # (g, n, mel) latent prompt (zeros where generated)
        text_emb: torch.Tensor,  # (g, n, text_dim) from embed_text / null_text_embedding
        style: torch.Tensor,  # (g, COND_DIM)
        start_time: torch.Tensor,  # (g,)
        duration: torch.Tensor | None = None,  # (g,) song_duration = frames / max_frames
    ) -> Conditioning:
        """Everything of a forward pass that does not depend on the noisy latent or the flow time."""
        dt = self.dtype
        cond, text_emb, style = cond.to(dt), text_emb.to(dt), style.to(dt)
        extra = self.start_time_embed(start_time)
        if self.duration_time_embed is not None:
            if duration is None:
                raise ValueError("this model has a duration embedding: pass duration")
            extra = extra + self.duration_time_embed(duration)
        n = cond.shape[1]
        return Conditioning(
            input_bias=self.input_embed.invariant(cond, text_emb, style),
            fusion=[layer(text_emb) for layer in self.text_fusion_linears],
            extra_time=extra,
            rope=rope_table(self.cfg.head_dim, n, self.cfg.rope_theta, device=cond.device),
        )

    def velocity(self, x: torch.Tensor, t: torch.Tensor, pre: Conditioning) -> torch.Tensor:
        """x (rows, n, mel), t (rows,) or scalar -> predicted flow (rows, n, mel); see Conditioning."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        c = _add_grouped(self.time_embed(t), pre.extra_time, pre.rows)  # (rows, COND_DIM)
        h = self.input_embed(x.to(self.dtype), c, pre.input_bias, pre.rows)
        for i, block in enumerate(self.transformer_blocks):
            h = block(h, pre.rope)
            if i < len(pre.fusion):
                h = _add_grouped(h, pre.fusion[i], pre.rows)
        return self.proj_out(self.norm_out(h, c))

    def forward(
        self,
        x: torch.Tensor,
        cond: torch.Tensor,
        text: torch.Tensor,
        time: torch.Tensor,
        style: torch.Tensor,
        start_time: torch.Tensor,
        duration: torch.Tensor | None = None,
        drop_audio_cond: bool = False,
        drop_text: bool = False,
    ) -> torch.Tensor:
        """One plain forward pass, with the official DiT.forward's meaning (per-row inputs)."""
        if drop_audio_cond:
            cond = torch.zeros_like(cond)
        if drop_text:
            text = torch.zeros_like(text)
        pre = self.prepare(cond, self.embed_text(text), style, start_time, duration)
        return self.velocity(x, time, pre)
