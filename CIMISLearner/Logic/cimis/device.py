"""Device and precision policy: CUDA when present (with a warning when it was asked for and is missing)."""

from __future__ import annotations

import contextlib
import warnings

import torch

from cimis.errors import CimisError


def resolve_device(requested: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA when available; ``"cuda"`` without a GPU falls back to the CPU with a warning."""
    requested = (requested or "auto").lower()
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda"):
        if torch.cuda.is_available():
            return torch.device(requested)
        warnings.warn("no CUDA GPU is available: running on the CPU, which is much slower", stacklevel=2)
        return torch.device("cpu")
    if requested == "cpu":
        return torch.device("cpu")
    raise CimisError(f"unknown device {requested!r}", "use auto, cpu or cuda")


def autocast(device: torch.device, enabled: bool = True):
    """Mixed precision on CUDA (bfloat16 where supported, else float16); full precision on the CPU, where
    autocast would not speed up 3D convolutions."""
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def needs_grad_scaler(device: torch.device, amp: bool) -> bool:
    """float16 autocast needs loss scaling; bfloat16 and float32 do not."""
    return amp and device.type == "cuda" and not torch.cuda.is_bf16_supported()
