"""Where the DiffLM stack runs: `--device cpu|cuda|auto` for training and generation.

CPU is the default and the tested path; "auto" takes a CUDA GPU when torch sees one.
"""
from __future__ import annotations

import torch

DEVICES = ("cpu", "cuda", "auto")


class DeviceError(ValueError):
    """An unknown device name, or `cuda` on a machine where torch sees no CUDA device."""


def resolve_device(name: str | torch.device = "cpu") -> torch.device:
    """"cpu" -> cpu; "cuda" -> cuda (an error if torch sees no CUDA device); "auto" -> cuda if available, else cpu."""
    if isinstance(name, torch.device):
        if name.type == "cpu":
            return name
        name = name.type if name.type == "cuda" and name.index is None else str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("--device cuda: no CUDA device is available to torch (torch.cuda.is_available() is "
                              "False); use --device cpu or auto")
        return torch.device("cuda")
    raise DeviceError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
