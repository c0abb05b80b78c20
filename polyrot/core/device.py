"""Which torch device a computation runs on ('auto' takes CUDA when torch sees one), and in which precision."""

from __future__ import annotations

import torch

from polyrot.errors import ParameterError


def autocast(device: str | torch.device, precision: str):
    """The training step's context for `precision` (polyrot.core.precision): bf16 autocast on the
    device's type, or nothing for fp32."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")


def resolve_device(device: str) -> str:
    """'auto' is CUDA when present, else the CPU; asking for CUDA without one is a ParameterError."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ParameterError(f"device {device!r} asked for, but torch sees no CUDA device")
    try:
        torch.device(device)
    except RuntimeError:
        raise ParameterError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    return device
