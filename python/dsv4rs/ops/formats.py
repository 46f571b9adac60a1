"""The cache formats (docs/model.md section 5) and the ops that write, read and copy their rows.

A cache is a ``uint8`` tensor ``[num_pages, page_bytes]`` of 64-row pages, each page holding all
its rows' data, then all its rows' scales (FlashMLA's layout). Row ``r`` is row ``r % 64`` of
page ``r // 64``; ``-1`` means "no row". The format constants are defined once, in the Rust core,
and re-exported here.
"""

from __future__ import annotations

from typing import Literal

import torch

from dsv4rs import _core
from dsv4rs._tensor import as_tensor, disjoint, spec, stream

# The cache formats, defined once in the Rust core (rust/core/src/quant.rs).
PAGE_ROWS: int = _core.PAGE_ROWS
"""Rows per cache page, for every cache family."""
ENTRY_DIM: int = _core.ENTRY_DIM
"""Width of one KV entry (K = V)."""
NOPE_DIM: int = _core.NOPE_DIM
"""Leading dims of an entry stored as FP8 e4m3 (the "NoPE" dims)."""
ROPE_DIM: int = _core.ROPE_DIM
"""Trailing dims of an entry stored as BF16 (the RoPE dims)."""
INDEX_DIM: int = _core.INDEX_DIM
"""Width of one indexer key."""
MAIN_ENTRY_BYTES: int = _core.MAIN_ENTRY_BYTES
"""Bytes of one KV entry: 448 FP8 e4m3 + 64 BF16 + 7 UE8M0 scales + 1 pad."""
MAIN_DATA_BYTES: int = _core.MAIN_DATA_BYTES
"""Bytes of one KV entry's data part (448 FP8 + 64 BF16); its 8 scale bytes follow the page's
64 data parts."""
INDEX_KEY_BYTES: dict[str, int] = _core.INDEX_KEY_BYTES
"""Bytes of one indexer key: FP4 e2m1 + 4 UE8M0 scales, or FP8 e4m3 + one fp32 scale."""
FP8_BLOCK: int = _core.FP8_BLOCK
"""NoPE values of an entry sharing one UE8M0 scale."""
FP4_BLOCK: int = _core.FP4_BLOCK
"""Indexer-key values sharing one FP4 UE8M0 scale."""

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
    cache, slots, entries = as_tensor("cache", cache), as_tensor("slots", slots), as_tensor("entries", entries)
    disjoint(("cache", cache), ("slots", slots), ("entries", entries))
    _kv_write(cache, slots, entries)


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
    ``-1`` reads as zeros. Corrupt bytes decode as what they hold: a BF16 NaN, an FP8 NaN code
    (0x7F/0xFF) or a UE8M0 scale code 0xFF give NaN (``sparse_attention`` refuses such rows)."""
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
    cache, slots, keys = as_tensor("cache", cache), as_tensor("slots", slots), as_tensor("keys", keys)
    disjoint(("cache", cache), ("slots", slots), ("keys", keys))
    _index_key_write(cache, slots, keys, fmt)


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


@torch.library.custom_op("dsv4rs::index_key_round_trip", mutates_args=())
def _index_key_round_trip(keys: torch.Tensor, fmt: str) -> torch.Tensor:
    out = torch.empty((keys.shape[0] if keys.dim() == 2 else 0, INDEX_DIM), dtype=torch.float32, device=keys.device)
    _core.index_key_round_trip(spec("keys", keys), spec("out", out), fmt, stream(keys))
    return out


@_index_key_round_trip.register_fake
def _(keys: torch.Tensor, fmt: str) -> torch.Tensor:
    return keys.new_empty((keys.shape[0], INDEX_DIM), dtype=torch.float32)


def index_key_round_trip(keys: torch.Tensor, fmt: IndexKeyFormat = "fp4") -> torch.Tensor:
    """What :func:`index_key_write` then :func:`index_key_read` return for ``keys``
    (``float32``/``bfloat16 [n, 128]``), without a cache: ``float32 [n, 128]``, bit for bit the
    same on the CPU and the GPU. FP4: e2m1 with one UE8M0 scale per 32 values; FP8: e4m3 with one
    power-of-two scale per key. Non-finite keys raise ValueError on the CPU (as
    :func:`index_key_write` does); on the GPU they go through the write kernel's encoder."""
    _check_fmt(fmt)
    return _index_key_round_trip(as_tensor("keys", keys), fmt)


@torch.library.custom_op("dsv4rs::copy_rows", mutates_args=("dst",))
def _copy_rows(dst: torch.Tensor, dst_rows: torch.Tensor, src: torch.Tensor, src_rows: torch.Tensor) -> None:
    _core.copy_rows(spec("dst", dst), spec("dst_rows", dst_rows), spec("src", src), spec("src_rows", src_rows),
                    stream(dst))


@_copy_rows.register_fake
def _(dst: torch.Tensor, dst_rows: torch.Tensor, src: torch.Tensor, src_rows: torch.Tensor) -> None:
    return None


def copy_rows(dst: torch.Tensor, dst_rows: torch.Tensor, src: torch.Tensor, src_rows: torch.Tensor) -> None:
    """Copies cache rows byte for byte, in place on ``dst``: row ``src_rows[i]`` of ``src`` to row
    ``dst_rows[i]`` of ``dst`` (row ``r`` is row ``r % 64`` of page ``r // 64``).

    Args:
        dst, src: caches of the same format, any numbers of pages, not overlapping in memory:
            paged ``uint8 [P, 64 * row_bytes]`` (584-byte entries, 68-byte FP4 or 132-byte FP8
            indexer keys, told by the page width; a row's data and its scale bytes are both
            copied) or plain ``bfloat16``/``float32 [P, 64, D]`` rows.
        dst_rows, src_rows: ``int64 [n]`` row ids; ``-1`` in either skips that pair. On the CPU
            an id outside its cache raises IndexError and a destination row named by two copied
            pairs raises ValueError; on the GPU such ids are skipped (the kernel cannot raise
            without synchronizing) and the last writer of a repeated row is unspecified.
    """
    _copy_rows(as_tensor("dst", dst), as_tensor("dst_rows", dst_rows), as_tensor("src", src),
               as_tensor("src_rows", src_rows))


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
