"""Argument checks the op wrappers share (the kernels check the rest)."""

from __future__ import annotations

import torch

def ndim(name: str, t: torch.Tensor, n: int) -> None:
    """The checks Python needs before it can size an output; the kernels check the rest."""
    if t.dim() != n:
        raise ValueError(f"{name}: expected a {n}-d tensor, got shape {list(t.shape)}")


INT64_MAX = 2**63 - 1
"""The largest int an op's schema carries (torch.library ints are int64)."""


def positive(name: str, v: int, high: int | None = None) -> int:
    """``v`` if it is an int in ``[1, high]`` (``high`` defaults to :data:`INT64_MAX`); else
    TypeError/ValueError naming ``name``."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if v < 1:
        raise ValueError(f"{name}: must be >= 1, got {v}")
    high = INT64_MAX if high is None else high
    if v > high:
        raise ValueError(f"{name}: must be <= {high:,}, got {v:,}")
    return v


def flag(name: str, v: bool) -> bool:
    """``v`` if it is a bool; else TypeError naming ``name``."""
    if not isinstance(v, bool):
        raise TypeError(f"{name}: expected a bool, got {type(v).__name__}")
    return v


def choice(name: str, v: str, choices: tuple[str, ...]) -> str:
    """``v`` if it is one of ``choices``; else ValueError naming ``name`` and the choices."""
    if not isinstance(v, str) or v not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {v!r}")
    return v


def cuda_index(device: torch.device | str | int) -> int:
    """The index of a CUDA ``device`` (the current one for ``"cuda"``); anything else raises
    ValueError naming ``device``."""
    dev = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    if dev.type != "cuda":
        raise ValueError(f"device: expected a CUDA device, got {dev}")
    if dev.index is not None:
        return dev.index
    try:
        return torch.cuda.current_device()
    except (RuntimeError, AssertionError) as e:  # torch without a driver or without CUDA
        from dsv4rs import CudaError

        raise CudaError(f"no CUDA device available ({e})") from None
