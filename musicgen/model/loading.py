"""Turning official checkpoint files into modules, strictly.

`cfm_model.pt` is `{"model_state_dict": {"transformer.<param>": tensor, ...}}` (the official CFM wrapper
has no parameters of its own); `vae_model.pt` is a TorchScript module with `decode_export` and
`encode_export`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from musicgen.errors import CheckpointMismatch, ModelNotAvailable
from musicgen.model.dit import DiT, DiTConfig
from musicgen.model.vae import SongVAE

PREFIX = "transformer."
# the official checkpoint files, as their hub repositories name them
DIT_FILE = "cfm_model.pt"  # a DiffRhythm 1 DiT
VAE_FILE = "vae_model.pt"  # the DiffRhythm 1 VAE (TorchScript)
DR2_DIT_FILES = ("model.json", "model.safetensors")  # the DiffRhythm 2 DiT: its configuration and weights
# where a DiffRhythm 2 DiT's configuration is looked for, in order: the official file, then the name some
# third-party loaders fetch it under
DR2_CONFIG_FILES = (DR2_DIT_FILES[0], "config.json")
DR2_DECODER_FILES = ("decoder.json", "decoder.bin")  # its BigVGAN decoder: configuration and weights
DR2_FILES = DR2_DIT_FILES + DR2_DECODER_FILES


def read_dit_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointMismatch(
            f"{path.name} is not a readable PyTorch checkpoint: {type(exc).__name__}"
        ) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model_state_dict"), dict):
        keys = list(ckpt)[:5] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointMismatch(
            f"{path.name} has no 'model_state_dict' (found {keys}): not an official cfm_model.pt"
        )
    state = ckpt["model_state_dict"]
    stray = [k for k in state if not k.startswith(PREFIX)]
    if stray:
        raise CheckpointMismatch(f"{path.name}: keys outside '{PREFIX}': {stray[:3]}")
    return {k[len(PREFIX) :]: v for k, v in state.items()}


def load_dit(
    path: str | Path,
    cfg: DiTConfig,
    *,
    device: torch.device,
    dtype: torch.dtype,
    model_name: str = "",
) -> DiT:
    """The DiT of an official `cfm_model.pt`, loaded strictly, on `device` in `dtype`, eager (fused or
    packed projections and compiling are the runtime's: see musicgen/runtime/plans.py)."""
    state = read_dit_state_dict(path)
    has_duration = any(k.startswith("duration_time_embed.") for k in state)
    if has_duration != cfg.duration_embed:
        kind = "a v1.2-full checkpoint (with" if has_duration else "a checkpoint without"
        raise CheckpointMismatch(
            f"{Path(path).name} is {kind} a duration embedding), but {model_name or 'this model'} "
            f"{'needs' if cfg.duration_embed else 'has no'} one"
        )
    with torch.device("meta"):
        model = DiT(cfg)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise CheckpointMismatch(
            f"{Path(path).name} does not fit {model_name or 'the model'}: {' '.join(first)}"
        ) from None
    return model.to(device=device, dtype=dtype).eval()


def save_dit_checkpoint(model: DiT, path: str | Path) -> Path:
    """Write a DiT in the official cfm_model.pt layout (each tensor its own storage, also when the
    parameters are views into fused weights)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {PREFIX + k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    torch.save({"model_state_dict": state}, path)
    return path


def load_vae(path: str | Path, *, device: torch.device) -> SongVAE:
    path = Path(path)
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise CheckpointMismatch(f"{path.name} is not a TorchScript VAE: {type(exc).__name__}") from None
    for method in ("decode_export", "encode_export"):
        if not hasattr(module, method):
            raise CheckpointMismatch(f"{path.name} has no {method}(): not the official DiffRhythm VAE")
    return SongVAE(module.to(device).eval(), device)


# -- DiffRhythm 2: model.json + model.safetensors, decoder.json + decoder.bin --------------------------


def _read_config(cls, path: Path):
    """`cls.from_json` of a JSON file, its problems as CheckpointMismatch naming the file."""
    import json

    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointMismatch(f"{path.name} is not readable JSON: {type(exc).__name__}") from None
    if not isinstance(raw, dict):
        raise CheckpointMismatch(f"{path.name} is not a JSON object")
    try:
        return cls.from_json(raw)
    except (TypeError, ValueError) as exc:
        raise CheckpointMismatch(f"{path.name}: {exc}") from None


def _assign_strictly(build, state: dict[str, torch.Tensor], weights: str, config: str):
    """The module `build()` makes (on the meta device), with exactly these tensors as its parameters."""
    with torch.device("meta"):
        model = build()
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointMismatch(
            f"{weights} does not fit {config}: {' '.join(str(exc).splitlines()[:3])}"
        ) from None
    return model


def dr2_config_file(folder: Path) -> Path:
    """The DiT configuration in `folder`: model.json, else config.json."""
    for name in DR2_CONFIG_FILES:
        if (folder / name).is_file():
            return folder / name
    raise ModelNotAvailable(
        f"{folder} has neither {' nor '.join(DR2_CONFIG_FILES)}: no DiffRhythm 2 configuration to read"
    )


def check_dr2_weights(cfg, state: dict[str, torch.Tensor], weights: str, config: str) -> None:
    """What the tensors of a DiT checkpoint (keys without `transformer.`) say about the configuration,
    checked against it: a CheckpointMismatch names the field, its value in `config` and what the weights
    say. Keys that are absent are left to strict loading; `block_size` leaves no trace in the weights."""

    def refuse(field: str, value, found: str):
        raise CheckpointMismatch(
            f"{weights} does not fit {config}: {field} is {value} in {config}, but {found}",
            details={"field": field, "config": value, "file": config},
        )

    def shape(key: str) -> tuple[int, ...] | None:
        return tuple(state[key].shape) if key in state else None

    proj_2 = shape("input_embed.proj_2.weight")  # (dim, 512)
    if proj_2 is not None and proj_2[0] != cfg.dim:
        refuse("dim", cfg.dim, f"the input projection of the weights is {proj_2[0]} wide")
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.")}
    if blocks and len(blocks) != cfg.depth:
        refuse("depth", cfg.depth, f"the weights have {len(blocks)} transformer blocks")
    q_norm = shape("transformer_blocks.0.self_attn.q_norm.weight")  # (head size,)
    if q_norm is not None and q_norm[0] != cfg.head_dim:
        whole = q_norm[0] and cfg.dim % q_norm[0] == 0
        heads = str(cfg.dim // q_norm[0]) if whole else "no whole number of"
        refuse("heads", cfg.heads, f"the weights' q/k norms are {q_norm[0]} wide (head size dim / heads), "
               f"so dim {cfg.dim} makes {heads} heads")  # fmt: skip
    gate = shape("transformer_blocks.0.mlp.gate_proj.weight")  # (dim * ff_mult, dim)
    if gate is not None and gate[0] != cfg.dim * cfg.ff_mult:
        refuse(
            "ff_mult",
            cfg.ff_mult,
            f"the weights' MLP is {gate[0]} wide ({gate[0] / cfg.dim:g} x dim {cfg.dim})",
        )
    latent = shape("latent_embed.0.weight")  # (512, mel_dim)
    if latent is not None and latent[1] != cfg.mel_dim:
        refuse("mel_dim", cfg.mel_dim, f"the weights' latent embedding takes {latent[1]} channels")
    table = shape("text_embed.text_embed.weight")  # (text_num_embeds + 1, 512): row 0 is the filler
    if table is not None and table[0] != cfg.text_num_embeds + 1:
        refuse("text_num_embeds", cfg.text_num_embeds,
               f"the weights' text embedding has {table[0]} rows ({table[0] - 1} tokens and the filler)")  # fmt: skip


def load_dr2(folder: str | Path, *, device: torch.device, dtype: torch.dtype = torch.float32):
    """A DiffRhythm 2 DiT from its configuration (`model.json`, as the official loader reads it, else
    `config.json`) and `model.safetensors` (keys `transformer.*`): what the weights say about the
    configuration is checked first (`check_dr2_weights`), then they are loaded strictly."""
    from safetensors.torch import load_file

    from musicgen.model.dr2_dit import DR2Config, DR2DiT

    folder = Path(folder)
    config_path = dr2_config_file(folder)
    config, weights = config_path.name, DR2_DIT_FILES[1]
    cfg = _read_config(DR2Config, config_path)
    try:
        state = load_file(str(folder / weights))
    except Exception as exc:
        raise CheckpointMismatch(
            f"{weights} is not a readable safetensors file: {type(exc).__name__}"
        ) from None
    stray = [k for k in state if not k.startswith(PREFIX)]
    if stray:
        raise CheckpointMismatch(f"{weights}: keys outside '{PREFIX}': {stray[:3]}")
    state = {k[len(PREFIX) :]: v for k, v in state.items()}
    check_dr2_weights(cfg, state, weights, config)
    return _assign_strictly(lambda: DR2DiT(cfg), state, weights, config).to(device=device, dtype=dtype).eval()


def save_dr2(model, folder: str | Path) -> Path:
    """Write a DiffRhythm 2 DiT in the official files (model.json, model.safetensors)."""
    import dataclasses
    import json

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {k: v for k, v in dataclasses.asdict(model.cfg).items() if k != "extra"}
    cfg["repa_dims"] = list(cfg["repa_dims"])
    (folder / DR2_DIT_FILES[0]).write_text(json.dumps({**cfg, **model.cfg.extra}, indent=2))
    save_file({PREFIX + k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(folder / DR2_DIT_FILES[1]))  # fmt: skip
    return folder


def load_bigvgan(folder: str | Path, *, device: torch.device, dtype: torch.dtype = torch.float32):
    """The DiffRhythm 2 decoder from `decoder.json` and `decoder.bin` (`{"generator": state dict}` with
    weight-norm pairs, as the official Generator reads it), strictly; the weight norm fused. Its audio
    is at the file's `sampling_rate`, `hop` samples a latent frame (whether that fits the DiT's latent
    rate is the pipeline's to check)."""
    from musicgen.model.bigvgan import BigVGAN, DecoderConfig, fuse_weight_norm

    folder = Path(folder)
    config, weights = DR2_DECODER_FILES
    cfg = _read_config(DecoderConfig, folder / config)
    try:
        ckpt = torch.load(folder / weights, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointMismatch(f"{weights} is not a readable checkpoint: {type(exc).__name__}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("generator"), dict):
        raise CheckpointMismatch(f"{weights} has no 'generator' state dict")
    try:
        state = fuse_weight_norm(ckpt["generator"])
    except KeyError as exc:
        raise CheckpointMismatch(f"{weights}: {exc}") from None
    return (
        _assign_strictly(lambda: BigVGAN(cfg), state, weights, config).to(device=device, dtype=dtype).eval()
    )


def save_bigvgan(model, folder: str | Path) -> Path:
    """Write a decoder in the official files: decoder.json and decoder.bin with weight-norm pairs
    (g = the norm of each fused weight's slice along dim 0, v = the weight), which load to the same
    fused weights up to rounding."""
    import dataclasses
    import json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.asdict(model.cfg)
    (folder / DR2_DECODER_FILES[0]).write_text(json.dumps(cfg, indent=2))
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith(".weight") and value.ndim == 3:
            base = key[: -len(".weight")]
            state[base + ".weight_g"] = torch.norm_except_dim(value, 2, 0).clone()
            state[base + ".weight_v"] = value.clone()
        else:
            state[key] = value.clone()
    torch.save({"generator": state}, folder / DR2_DECODER_FILES[1])
    return folder
