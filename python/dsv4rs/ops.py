"""dsv4rs ops on torch tensors, CPU or CUDA (SPEC.md sections 2-5).

Every op checks dtype, shape, device and index ranges (errors name the argument), dispatches to
the Rust CPU kernel or the CUDA kernel on the tensors' device and the current stream, and is
registered as a ``torch.library`` op (namespace ``dsv4rs``) with a fake implementation, so that
``torch.compile`` and CUDA graphs see one node. GPU ops never synchronize and allocate only
their outputs.

Cache layout (SPEC.md section 5): a cache is a ``uint8`` tensor ``[num_pages, page_bytes]`` of
64-row pages, each page holding all its rows' data, then all its rows' scales. Row ``r`` is row
``r % 64`` of page ``r // 64``; ``-1`` means "no row".
"""

from __future__ import annotations

from typing import Literal

import torch

from dsv4rs import _core
from dsv4rs._tensor import as_tensor, spec, stream

PAGE_ROWS = 64
"""Rows per cache page, for every cache family."""
MAIN_ENTRY_BYTES = 584
"""Bytes of one KV entry: 448 FP8 e4m3 + 64 BF16 + 7 UE8M0 scales + 1 pad."""
INDEX_KEY_BYTES = {"fp4": 68, "fp8": 132}
"""Bytes of one indexer key: FP4 e2m1 + 4 UE8M0 scales, or FP8 e4m3 + one fp32 scale."""

IndexKeyFormat = Literal["fp4", "fp8"]


def _check_fmt(fmt: str) -> None:
    if fmt not in INDEX_KEY_BYTES:
        raise ValueError(f'fmt: expected "fp4" or "fp8", got {fmt!r}')


def new_kv_cache(num_pages: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A zeroed cache of ``num_pages`` pages of 584-byte FP8 KV entries."""
    if num_pages < 0:
        raise ValueError(f"num_pages: must be >= 0, got {num_pages}")
    return torch.zeros((num_pages, PAGE_ROWS * MAIN_ENTRY_BYTES), dtype=torch.uint8, device=device)


def new_index_key_cache(num_pages: int, fmt: IndexKeyFormat = "fp4", device: torch.device | str = "cpu") -> torch.Tensor:
    """A zeroed cache of ``num_pages`` pages of indexer keys in ``fmt`` (68 or 132 bytes a row)."""
    _check_fmt(fmt)
    if num_pages < 0:
        raise ValueError(f"num_pages: must be >= 0, got {num_pages}")
    return torch.zeros((num_pages, PAGE_ROWS * INDEX_KEY_BYTES[fmt]), dtype=torch.uint8, device=device)


@torch.library.custom_op("dsv4rs::kv_write", mutates_args=("cache",))
def _kv_write(cache: torch.Tensor, slots: torch.Tensor, entries: torch.Tensor) -> None:
    _core.kv_write(spec("cache", cache), spec("slots", slots), spec("entries", entries), stream(cache))


@_kv_write.register_fake
def _(cache: torch.Tensor, slots: torch.Tensor, entries: torch.Tensor) -> None:
    return None


def kv_write(cache: torch.Tensor, slots: torch.Tensor, entries: torch.Tensor) -> None:
    """Quantizes KV entries into the 584-byte FP8 layout and writes them into ``cache`` in place.

    Args:
        cache: ``uint8 [num_pages, 37376]`` (see :func:`new_kv_cache`).
        slots: ``int64 [n]`` destination row ids; ``-1`` skips the entry. On the CPU an id
            outside the cache or a repeated id raises; on the GPU such ids are skipped (the kernel
            cannot raise without synchronizing).
        entries: ``float32`` or ``bfloat16 [n, 512]``: dims 0:448 become FP8 e4m3 with one
            UE8M0 scale per 64, dims 448:512 BF16. Non-finite values raise on the CPU.
    """
    _kv_write(as_tensor("cache", cache), as_tensor("slots", slots), as_tensor("entries", entries))


@torch.library.custom_op("dsv4rs::kv_read", mutates_args=())
def _kv_read(cache: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    out = torch.empty((rows.shape[0] if rows.dim() == 1 else 0, 512), dtype=torch.float32, device=cache.device)
    _core.kv_read(spec("cache", cache), spec("rows", rows), spec("out", out), stream(cache))
    return out


@_kv_read.register_fake
def _(cache: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return cache.new_empty((rows.shape[0], 512), dtype=torch.float32)


def kv_read(cache: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Dequantizes rows of a 584-byte KV cache: ``int64 [m]`` row ids -> ``float32 [m, 512]``;
    ``-1`` reads as zeros."""
    return _kv_read(as_tensor("cache", cache), as_tensor("rows", rows))


@torch.library.custom_op("dsv4rs::index_key_write", mutates_args=("cache",))
def _index_key_write(cache: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor, fmt: str) -> None:
    _core.index_key_write(spec("cache", cache), spec("slots", slots), spec("keys", keys), fmt, stream(cache))


@_index_key_write.register_fake
def _(cache: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor, fmt: str) -> None:
    return None


def index_key_write(cache: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor, fmt: IndexKeyFormat = "fp4") -> None:
    """Quantizes indexer keys (``float32``/``bfloat16 [n, 128]``) into ``fmt`` and writes them
    into ``cache`` at ``slots`` (``int64 [n]``, ``-1`` skipped), in place. FP4: e2m1 with one UE8M0
    scale per 32 values; FP8: e4m3 with one power-of-two fp32 scale per key."""
    _check_fmt(fmt)
    _index_key_write(as_tensor("cache", cache), as_tensor("slots", slots), as_tensor("keys", keys), fmt)


@torch.library.custom_op("dsv4rs::index_key_read", mutates_args=())
def _index_key_read(cache: torch.Tensor, rows: torch.Tensor, fmt: str) -> torch.Tensor:
    out = torch.empty((rows.shape[0] if rows.dim() == 1 else 0, 128), dtype=torch.float32, device=cache.device)
    _core.index_key_read(spec("cache", cache), spec("rows", rows), spec("out", out), fmt, stream(cache))
    return out


@_index_key_read.register_fake
def _(cache: torch.Tensor, rows: torch.Tensor, fmt: str) -> torch.Tensor:
    return cache.new_empty((rows.shape[0], 128), dtype=torch.float32)


def index_key_read(cache: torch.Tensor, rows: torch.Tensor, fmt: IndexKeyFormat = "fp4") -> torch.Tensor:
    """Dequantizes indexer keys at ``rows`` (``int64 [m]``, ``-1`` gives zeros) -> ``float32 [m, 128]``."""
    _check_fmt(fmt)
    return _index_key_read(as_tensor("cache", cache), as_tensor("rows", rows), fmt)


@torch.library.custom_op("dsv4rs::hadamard128", mutates_args=())
def _hadamard128(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    _core.hadamard128(spec("x", x), spec("out", out), stream(x))
    return out


@_hadamard128.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=torch.float32)


def hadamard128(x: torch.Tensor) -> torch.Tensor:
    """Normalized Walsh-Hadamard transform (scale 128^-0.5, Sylvester order) of the rows of
    ``x`` (``float32``/``bfloat16 [n, 128]``) -> ``float32 [n, 128]``. CPU and GPU results are
    bit-identical."""
    return _hadamard128(as_tensor("x", x))


def quantize_entries(entries: torch.Tensor) -> torch.Tensor:
    """Packs ``[n, 512]`` entries into a fresh KV cache, entry ``i`` at row ``i``."""
    entries = as_tensor("entries", entries)
    if entries.dim() != 2:
        raise ValueError(f"entries: expected shape [n, 512], got {list(entries.shape)}")
    n = entries.shape[0]
    cache = new_kv_cache((n + PAGE_ROWS - 1) // PAGE_ROWS, entries.device)
    kv_write(cache, torch.arange(n, device=entries.device), entries)
    return cache


def quantize_index_keys(keys: torch.Tensor, fmt: IndexKeyFormat = "fp4") -> torch.Tensor:
    """Packs ``[n, 128]`` indexer keys into a fresh key cache, key ``i`` at row ``i``."""
    keys = as_tensor("keys", keys)
    if keys.dim() != 2:
        raise ValueError(f"keys: expected shape [n, 128], got {list(keys.shape)}")
    n = keys.shape[0]
    cache = new_index_key_cache((n + PAGE_ROWS - 1) // PAGE_ROWS, fmt, keys.device)
    index_key_write(cache, torch.arange(n, device=keys.device), keys, fmt)
    return cache


def warm_up(device: torch.device | str | int = "cuda") -> None:
    """Loads the CUDA kernels on ``device`` now; call before capturing a CUDA graph."""
    dev = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    if dev.type != "cuda":
        raise ValueError(f"device: expected a CUDA device, got {dev}")
    _core.warm_up(dev.index if dev.index is not None else torch.cuda.current_device())
