"""Hands torch tensors to the Rust extension as ``(data_ptr, shape, dtype, device, row_stride)``
tuples, and reads the caller's CUDA stream. Private to the package."""

from __future__ import annotations

from typing import Any

import torch

Spec = tuple[int, tuple[int, ...], str, int, int]


def as_tensor(name: str, x: Any) -> torch.Tensor:
    """Accepts a torch tensor or any DLPack / array-interface producer (numpy, cupy, ...) on the
    CPU or a CUDA GPU. Any other device (``meta`` among them, which would reach the ops' fake
    implementations and compute nothing) is a ValueError naming the argument."""
    if isinstance(x, torch.Tensor):
        t = x
    elif hasattr(x, "__dlpack__"):
        t = torch.from_dlpack(x)
    elif hasattr(x, "__array_interface__"):
        t = torch.as_tensor(x)
    else:
        raise TypeError(f"{name}: expected a torch.Tensor or a DLPack/array producer, got {type(x).__name__}")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}: tensors must live on the CPU or a CUDA GPU, got {t.device}")
    return t


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The byte range ``[start, end)`` the elements of ``t`` occupy (its strides included)."""
    if t.numel() == 0:
        return (0, 0)
    extent = 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))
    start = t.data_ptr() - sum((n - 1) * -st for n, st in zip(t.shape, t.stride()) if st < 0) * t.element_size()
    return start, start + extent * t.element_size()


def disjoint(written: tuple[str, torch.Tensor], *others: tuple[str, torch.Tensor | None]) -> None:
    """Raises ValueError naming both arguments when the tensor an op writes in place shares
    memory with another of its arguments (a view of the same storage, overlapping or not
    identical): the op would read what it has already overwritten."""
    name, t = written
    a0, a1 = _span(t)
    for other, u in others:
        if u is None or u.device != t.device:
            continue
        b0, b1 = _span(u)
        if a0 < b1 and b0 < a1:
            raise ValueError(f"{name}, {other}: must not share memory ({name} is written in place)")


def row_stride(t: torch.Tensor) -> int:
    """The elements from one row of ``t``'s last dimension to the next when its rows are all one
    stride apart, each row's values adjacent (a contiguous tensor: the last dimension's size; a
    0-d tensor: 1), else -1. A column range of a contiguous matrix, ``y[:, a:b]``, has the matrix's
    row length; the Rust side takes such rows only where an op reads them at a stride."""
    if t.is_contiguous():
        return t.shape[-1] if t.dim() else 1
    if t.dim() < 2 or (t.shape[-1] > 1 and t.stride(-1) != 1):
        return -1
    stride, rows = 0, 1  # rows: how many rows the leading dimensions to the right hold
    for n, st in zip(reversed(t.shape[:-1]), reversed(t.stride()[:-1])):
        if n == 1:
            continue
        if rows == 1:
            stride = st
        elif st != stride * rows:
            return -1
        rows *= n
    return stride if stride >= t.shape[-1] else -1


def rows_of(t: torch.Tensor) -> torch.Tensor:
    """``t`` as an op that reads rows at a stride on the GPU takes it: itself where it is on a GPU
    and :func:`row_stride` is not -1 (a column range of a matrix is read in place), else
    ``t.contiguous()``."""
    return t if t.is_cuda and row_stride(t) >= 0 else t.contiguous()


def spec(name: str, t: torch.Tensor) -> Spec:
    """The tuple form of ``t``. The tensor must stay alive for the duration of the call."""
    device = -1 if t.device.type == "cpu" else _cuda_index(name, t)
    return (t.data_ptr(), tuple(t.shape), str(t.dtype).removeprefix("torch."), device, row_stride(t))


def _cuda_index(name: str, t: torch.Tensor) -> int:
    if t.device.type != "cuda":
        raise ValueError(f"{name}: tensors must live on the CPU or a CUDA GPU, got {t.device}")
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def stream(t: torch.Tensor) -> int:
    """The raw handle of the current CUDA stream of ``t``'s device (0 for CPU tensors)."""
    if t.device.type != "cuda":
        return 0
    return torch.cuda.current_stream(t.device).cuda_stream
