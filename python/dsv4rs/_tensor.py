"""Hands torch tensors to the Rust extension as ``(data_ptr, shape, dtype, device, contiguous)``
tuples, and reads the caller's CUDA stream. Private to the package."""

from __future__ import annotations

from typing import Any

import torch

Spec = tuple[int, tuple[int, ...], str, int, bool]


def as_tensor(name: str, x: Any) -> torch.Tensor:
    """Accepts a torch tensor or any DLPack / array-interface producer (numpy, cupy, ...)."""
    if isinstance(x, torch.Tensor):
        return x
    if hasattr(x, "__dlpack__"):
        return torch.from_dlpack(x)
    if hasattr(x, "__array_interface__"):
        return torch.as_tensor(x)
    raise TypeError(f"{name}: expected a torch.Tensor or a DLPack/array producer, got {type(x).__name__}")


def spec(name: str, t: torch.Tensor) -> Spec:
    """The tuple form of ``t``. The tensor must stay alive for the duration of the call."""
    device = -1 if t.device.type == "cpu" else _cuda_index(name, t)
    return (t.data_ptr(), tuple(t.shape), str(t.dtype).removeprefix("torch."), device, t.is_contiguous())


def _cuda_index(name: str, t: torch.Tensor) -> int:
    if t.device.type != "cuda":
        raise ValueError(f"{name}: tensors must live on the CPU or a CUDA GPU, got {t.device}")
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def stream(t: torch.Tensor) -> int:
    """The raw handle of the current CUDA stream of ``t``'s device (0 for CPU tensors)."""
    if t.device.type != "cuda":
        return 0
    return torch.cuda.current_stream(t.device).cuda_stream
