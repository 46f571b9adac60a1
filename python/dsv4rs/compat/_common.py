"""What the compat modules share: their error types, the argument checks in the engines' style,
and engine-owned paged caches (pages of any size and byte stride) read through dsv4rs's ops.

A paged cache row is split in two parts (docs/model.md section 5): every page holds the data
parts of its rows, then their scale parts. FlashMLA and DeepGEMM use that layout for any page
size ``B`` (rows per page) and let a page occupy more bytes than its rows (``stride(0)``, e.g.
vLLM pads a page to a multiple of 576 bytes). dsv4rs's ops read 64-row pages packed back to back,
so an engine cache is read either as a view (64 rows a page, no padding: zero copy) or by
gathering the rows a call needs into a fresh dsv4rs cache (:meth:`PagedCache.gather`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
import re

import torch

from dsv4rs import ops

F32_MAX = torch.finfo(torch.float32).max

GATHER_BUDGET_BYTES = 256 << 20
"""Largest temporary one call of the compat layer allocates at a time (gathered rows, float32
score tiles); bigger work is done in chunks of queries or keys."""


class CompatRuntimeError(RuntimeError, ValueError):
    """Bad input where FlashMLA (``TORCH_CHECK``) or DeepGEMM (``DG_HOST_ASSERT``) raise a
    ``RuntimeError``. Also a ``ValueError``, as every other argument error of dsv4rs."""


class CompatAssertionError(AssertionError, ValueError):
    """Bad input where FlashMLA's Python interface fails an ``assert``. Also a ``ValueError``."""


def torch_check(cond: bool, msg: str) -> None:
    """Raises :class:`CompatRuntimeError` unless ``cond``: where the engine raises RuntimeError."""
    if not cond:
        raise CompatRuntimeError(msg)


def py_assert(cond: bool, msg: str) -> None:
    """Raises :class:`CompatAssertionError` unless ``cond``: where the engine asserts."""
    if not cond:
        raise CompatAssertionError(msg)


def tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise CompatRuntimeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t


def optional_tensor(name: str, t: object) -> torch.Tensor | None:
    """``None``, or :func:`tensor`'s check."""
    return None if t is None else tensor(name, t)


def check_ndim(name: str, t: torch.Tensor | None, n: int) -> None:
    if t is not None:
        torch_check(t.dim() == n, f"{name}: expected a {n}-d tensor, got shape {list(t.shape)}")


def check_dtype(name: str, t: torch.Tensor | None, *dtypes: torch.dtype) -> None:
    if t is not None and t.dtype not in dtypes:
        want = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise CompatRuntimeError(f"{name}: expected dtype {want}, got {str(t.dtype).removeprefix('torch.')}")


def check_shape(name: str, t: torch.Tensor | None, *dims: int) -> None:
    if t is not None and tuple(t.shape) != dims:
        raise CompatRuntimeError(f"{name}: expected shape {list(dims)}, got {list(t.shape)}")


def check_device(name: str, t: torch.Tensor | None, device: torch.device) -> None:
    if t is not None and t.device != device:
        raise CompatRuntimeError(f"{name}: expected a tensor on {device} (where q is), got one on {t.device}")


def check_last_dim_contiguous(name: str, t: torch.Tensor | None) -> None:
    if t is not None and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise CompatRuntimeError(f"{name}: the last dim must be contiguous, got strides {list(t.stride())}")


def check_contiguous(name: str, t: torch.Tensor | None) -> None:
    if t is not None and not t.is_contiguous():
        raise CompatRuntimeError(f"{name}: must be contiguous, got strides {list(t.stride())}")


INT32_MAX = (1 << 31) - 1


def integer(name: str, v: object, low: int, high: int = INT32_MAX) -> int:
    """``v`` as an int in ``[low, high]`` (the engines take these as C ints); anything else raises
    ValueError naming ``name``."""
    try:
        if isinstance(v, bool) or isinstance(v, torch.Tensor) and (v.dim() != 0 or v.is_meta):
            raise TypeError
        v = operator.index(v)  # an int, or a NumPy or 0-d torch integer
    except TypeError:
        raise ValueError(f"{name}: expected an int, got {type(v).__name__}") from None
    if v < low:
        raise ValueError(f"{name}: must be >= {low}, got {v}")
    if v > high:
        raise ValueError(f"{name}: must be <= {high}, got {v}")
    return v


def flag(name: str, v: object) -> bool:
    """``v`` as a bool, as the engines read their flags (anything Python reads as one: a bool,
    an int, a NumPy bool, a one-value tensor); what has no truth value (a tensor of several
    values or on the meta device, an array) raises ValueError naming ``name``."""
    try:
        return bool(v)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{name}: expected a bool, got {type(v).__name__}"
                         f"{f' of shape {list(v.shape)}' if hasattr(v, 'shape') else ''}") from None


def finite_float(name: str, v: object) -> float:
    """``v`` as a finite float (a real number such as an int, a float or a NumPy scalar; not a
    bool); else ValueError naming ``name``."""
    try:
        f = float(v) if isinstance(v, numbers.Real) and not isinstance(v, bool) else math.nan
    except OverflowError:  # an int past float's range
        f = math.inf
    if not math.isfinite(f):
        raise ValueError(f"{name}: expected a finite float, got {v!r:.60}")
    return f


def finite_sink(sink: torch.Tensor | None, heads: int, device: torch.device) -> torch.Tensor:
    """The per-head sink as ``ops.sparse_attention`` takes it: float32, finite. ``-inf`` (no
    sink) and ``+inf`` (every output zero) become -/+ the largest float32, which give the same
    result exactly (``exp(sink - m)`` is 0 or infinite either way); ``None`` means no sink."""
    if sink is None:
        return torch.full((heads,), -F32_MAX, dtype=torch.float32, device=device)
    if sink.device.type == "cpu" and sink.isnan().any():  # (values are not checked on a GPU)
        raise ValueError(f"attn_sink: NaN at index {int(sink.isnan().nonzero()[0, 0])} (a sink is a number or +-inf)")
    return sink.clamp(min=-F32_MAX, max=F32_MAX)


def renamed(e: ValueError, names: dict[str, str], origins: dict[str, torch.Tensor] | None = None,
            offsets: dict[str, int] | None = None) -> ValueError:
    """An op's ValueError ``e`` (``"<argument>: <what>"``) in the caller's names: the op's
    argument ``a`` becomes ``names[a]``; where the message names a row of a cache the call
    gathered, the row becomes the engine cache's row (``origins[a][row]``); a flat index into a
    chunk of the caller's tensor is moved by the chunk's start (``offsets[a]``); a message naming
    several arguments (``"q, weights, key_cache: ..."``) has each renamed. Other errors are
    returned as they are."""
    head, sep, rest = str(e).partition(": ")
    several = head.split(", ")
    if sep and len(several) > 1 and all(a in names for a in several):
        return ValueError(f"{', '.join(names[a] for a in several)}: {rest}")
    if not sep or head not in names:
        return e
    origin = (origins or {}).get(head)
    row = re.match(r"row (\d+) (.*)", rest, re.S)
    flat = re.match(r"(.* at flat index )(\d+)(.*)", rest, re.S)
    if row and origin is not None and int(row.group(1)) < origin.numel():
        rest = f"row {int(origin[int(row.group(1))])} {row.group(2)}"
    elif flat and (offsets or {}).get(head):
        rest = f"{flat.group(1)}{int(flat.group(2)) + offsets[head]}{flat.group(3)}"
    return ValueError(f"{names[head]}: {rest}")


@dataclasses.dataclass(frozen=True)
class RowFormat:
    """A packed row format: ``data_bytes`` per row in the page's data part, ``scale_bytes`` in its
    scale part."""

    name: str
    data_bytes: int
    scale_bytes: int

    @property
    def row_bytes(self) -> int:
        return self.data_bytes + self.scale_bytes


MAIN_ENTRY = RowFormat("584-byte FP8 entry", ops.MAIN_DATA_BYTES, ops.MAIN_ENTRY_BYTES - ops.MAIN_DATA_BYTES)
"""448 FP8 e4m3 + 64 BF16 (576 data bytes), 7 UE8M0 scales + a pad byte (FlashMLA's MODEL1)."""
INDEX_KEY_FP8 = RowFormat("132-byte FP8 indexer key", ops.INDEX_DIM, ops.INDEX_KEY_BYTES["fp8"] - ops.INDEX_DIM)
"""128 FP8 e4m3, one float32 scale (DeepGEMM's FP8 paged key cache)."""
INDEX_KEY_FP4 = RowFormat("68-byte FP4 indexer key", ops.INDEX_DIM // 2, ops.INDEX_KEY_BYTES["fp4"] - ops.INDEX_DIM // 2)
"""128 FP4 e2m1 (two a byte), 4 UE8M0 scales (dsv4rs's FP4 key layout)."""


class PagedCache:
    """An engine's paged cache ``[num_pages, page_rows, 1, row_bytes]`` of 1-byte elements (uint8,
    int8 or float8), whose page ``p`` starts ``p * stride(0)`` bytes in and holds its rows' data
    parts, then their scale parts. The caller has checked the shape (see :meth:`check`)."""

    def __init__(self, name: str, t: torch.Tensor, fmt: RowFormat) -> None:
        self.name, self.fmt = name, fmt
        self.bytes = t.view(torch.uint8)
        self.num_pages, self.page_rows = int(t.shape[0]), int(t.shape[1])
        self.page_stride = int(t.stride(0)) if self.num_pages > 1 else self.page_rows * fmt.row_bytes
        self.rows = self.num_pages * self.page_rows

    @staticmethod
    def check(name: str, t: torch.Tensor, fmt: RowFormat) -> None:
        """ValueErrors dsv4rs adds to the engines' own checks: pages must not overlap."""
        if t.shape[0] > 1 and t.stride(0) < t.shape[1] * fmt.row_bytes:
            raise ValueError(
                f"{name}: pages overlap (stride(0) = {t.stride(0)} bytes < {t.shape[1]} rows x {fmt.row_bytes} bytes)"
            )

    def native(self) -> torch.Tensor | None:
        """The cache as dsv4rs's ops take it (``uint8 [num_pages, 64 * row_bytes]``), a view
        without a copy, when its pages are 64 rows packed back to back; else ``None``."""
        row = self.fmt.row_bytes
        if self.page_rows != ops.PAGE_ROWS or self.page_stride != ops.PAGE_ROWS * row:
            return None
        b = self.bytes
        if b.shape[1] > 1 and b.stride(1) != row or b.stride(-1) != 1:
            return None
        return b.as_strided((self.num_pages, ops.PAGE_ROWS * row), (ops.PAGE_ROWS * row, 1), b.storage_offset())

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """A fresh dsv4rs cache (``uint8 [ceil(n / 64), 64 * row_bytes]``) whose row ``i`` holds
        the bytes of this cache's row ``rows[i]`` (``int64 [n]``, each in ``[0, self.rows)``;
        the caller masks invalid ids). Rows past ``n`` in the last page copy row ``rows[0]``
        (never read: no index points at them)."""
        n = rows.numel()
        pages = max(1, -(-n // ops.PAGE_ROWS))
        d, s, b = self.fmt.data_bytes, self.fmt.scale_bytes, self.bytes
        if self.num_pages == 0 or n == 0:
            return torch.zeros((pages, ops.PAGE_ROWS * self.fmt.row_bytes), dtype=torch.uint8, device=b.device)
        pad = pages * ops.PAGE_ROWS - n
        if pad:
            rows = torch.cat((rows, rows[:1].expand(pad)))
        page, offset = rows // self.page_rows, rows % self.page_rows
        start = b.storage_offset()
        shape = (self.num_pages, self.page_rows)
        data = b.as_strided((*shape, d), (self.page_stride, d, 1), start)
        scales = b.as_strided((*shape, s), (self.page_stride, s, 1), start + self.page_rows * d)
        return torch.cat((data[page, offset].view(pages, -1), scales[page, offset].view(pages, -1)), dim=1)


def valid_ids(ids: torch.Tensor, rows: int, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Where ``ids`` (``[T, K]``) name a row of a cache of ``rows`` rows (and, with ``lengths``
    ``[T]``, lie in the first ``lengths[t]`` columns)."""
    ok = (ids >= 0) & (ids < rows)
    if lengths is not None:
        ok &= torch.arange(ids.shape[1], device=ids.device) < lengths[:, None]
    return ok
