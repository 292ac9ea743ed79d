"""Which torch device a command runs on, and the matching autocast (shared by every stage)."""

from __future__ import annotations

import os

import torch

from featcache.errors import FeatcacheError


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` (CUDA when present, the LOCAL_RANK card under torchrun), ``cpu``, ``cuda``, ``cuda:N``."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise FeatcacheError(f"--device {device!r}: not a torch device (auto, cpu, cuda, cuda:1, ...).") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FeatcacheError(f"--device {device}: CUDA is not available on this machine; use --device cpu.")
    if dev.type not in ("cpu", "cuda"):
        raise FeatcacheError(f"--device {device}: featcache runs on cpu or cuda devices.")
    return dev


def autocast(dev: torch.device, enabled: bool | None = None):
    """bf16 autocast on a GPU (or when asked), a no-op context on the CPU."""
    on = dev.type == "cuda" if enabled is None else enabled
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=on)
