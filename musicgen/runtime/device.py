"""Device detection and the dtype policy: bf16 where the accelerator supports it, fp32 on the CPU.

RoPE tables, timestep features and normalisation statistics are fp32 in every policy (see musicgen/model/dit.py).
"""

from __future__ import annotations

import torch

from musicgen.errors import InvalidParameter

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InvalidParameter(
            f"unknown device {name!r}", recovery="use auto, cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidParameter(
            "device cuda was asked for but no CUDA GPU is visible", recovery="use --device cpu"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidParameter(
            "device mps was asked for but MPS is not available", recovery="use --device cpu"
        )
    return device


def resolve_dtype(device: torch.device, name: str = "auto") -> torch.dtype:
    if name != "auto":
        if name not in DTYPES:
            raise InvalidParameter(
                f"unknown dtype {name!r}", recovery=f"use auto or one of {', '.join(DTYPES)}"
            )
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.bfloat16
    return torch.float32


def host_tensor(values: list, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """`values` as a tensor on `device` without waiting for the device: on CUDA through pinned memory,
    copied asynchronously (a plain `torch.tensor(values, device=...)` blocks the host until the stream
    has caught up, which leaves the GPU idle while the next call is being launched)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
