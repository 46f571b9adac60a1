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


def warm_up(device: torch.device | str | int = "cuda") -> None:
    """Loads the CUDA kernels on ``device`` now; call before capturing a CUDA graph."""
    dev = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    if dev.type != "cuda":
        raise ValueError(f"device: expected a CUDA device, got {dev}")
    _core.warm_up(dev.index if dev.index is not None else torch.cuda.current_device())


def attention_kernel(device: torch.device | str | int = "cuda") -> str:
    """The kernel :func:`sparse_attention` launches on ``device``: ``"wgmma"`` (Hopper, compute
    capability 9.0), ``"mma"`` (the 64-head mma.sync kernel, where 220 KiB of shared memory per
    block fit) or ``"portable"`` (every sm_80+ GPU). The environment variable
    ``DSV4RS_ATTENTION_KERNEL`` (``auto``, ``wgmma``, ``mma`` or ``portable``) forces one; forcing
    one the GPU cannot run raises ValueError."""
    dev = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    if dev.type != "cuda":
        raise ValueError(f"device: expected a CUDA device, got {dev}")
    return _core.attention_kernel(dev.index if dev.index is not None else torch.cuda.current_device())


# Attention ops (SPEC.md sections 2-4). CPU kernels; tensors on other devices are refused with a
# ValueError naming the argument.

Quant = Literal["none", "fp8", "fp4"]
ENTRY_SCALE = 512**-0.5
"""Default attention logit scale, ``head_dim ** -0.5``."""


def _ndim(name: str, t: torch.Tensor, n: int) -> None:
    """The checks Python needs before it can size an output; the kernels check the rest."""
    if t.dim() != n:
        raise ValueError(f"{name}: expected a {n}-d tensor, got shape {list(t.shape)}")


def _positive(name: str, v: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if v < 1:
        raise ValueError(f"{name}: must be >= 1, got {v}")
    return v


@torch.library.custom_op("dsv4rs::rope", mutates_args=())
def _rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, inverse: bool) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    _core.rope(spec("x", x), spec("positions", positions), spec("inv_freq", inv_freq), spec("out", out), inverse,
               stream(x))
    return out


@_rope.register_fake
def _(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, inverse: bool) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=torch.float32)


def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """RoPE (SPEC.md section 2) on the last ``2 * len(inv_freq)`` dims of ``x``, interleaved pairs.

    Args:
        x: ``float32``/``bfloat16 [T, ..., D]``.
        positions: ``int32``/``int64 [T]``, the position of each row of dim 0.
        inv_freq: ``float32``/``float64 [R/2]`` inverse frequencies (``reference.rope_inv_freq``),
            ``R <= D``.
        inverse: rotate by ``-position`` (undoes the rotation).

    Returns:
        ``float32``, the shape of ``x``. Angles, their sines and cosines and the rotation are
        computed in float64 (positions reach 2^20), on the CPU and on the GPU alike; the two
        agree to float32 rounding. Non-finite values raise on the CPU and propagate on the GPU.
    """
    return _rope(as_tensor("x", x), as_tensor("positions", positions), as_tensor("inv_freq", inv_freq), inverse)


@torch.library.custom_op("dsv4rs::mhc_weights", mutates_args=())
def _mhc_weights(mix: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, iters: int, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = _mhc_streams(mix.shape[-1])
    pre = torch.empty((mix.shape[0], n), dtype=torch.float32, device=mix.device)
    post = torch.empty_like(pre)
    comb = torch.empty((mix.shape[0], n, n), dtype=torch.float32, device=mix.device)
    _core.mhc_weights(spec("mix", mix), spec("scale", scale), spec("base", base), spec("pre", pre), spec("post", post),
                      spec("comb", comb), iters, eps, stream(mix))
    return pre, post, comb


@_mhc_weights.register_fake
def _(mix: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, iters: int, eps: float
      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = _mhc_streams(mix.shape[-1])
    return mix.new_empty((mix.shape[0], n)), mix.new_empty((mix.shape[0], n)), mix.new_empty((mix.shape[0], n, n))


def _mhc_streams(width: int) -> int:
    for n in range(1, 9):
        if (2 + n) * n == width:
            return n
    raise ValueError(f"mix: expected (2 + n) n columns for n streams in 1..8, got {width}")


def mhc_weights(mix: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, iters: int = 20, eps: float = 1e-6
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mHC weights of a sublayer (SPEC.md section 6) from ``mix = r * (Phi vec X)``.

    Args:
        mix: ``float32 [T, (2 + n) n]``, the projected, RMS-scaled streams of each token.
        scale: ``float32 [3]`` (``hc_scale``); base: ``float32 [(2 + n) n]`` (``hc_base``).
        iters: Sinkhorn iterations (``hc_sinkhorn_iters``), ``>= 1``.
        eps: ``hc_eps``.

    Returns:
        ``pre float32 [T, n]`` (``sigmoid(s0 mu + b) + eps``), ``post [T, n]``
        (``2 sigmoid(s1 mu + b)``) and ``comb [T, n, n]``: the rows of ``s2 mu + b`` softmaxed plus
        ``eps``, columns then ``iters - 1`` times rows and columns divided by their sums plus
        ``eps``. One kernel instead of some 130 small tensor ops; float32 in transformers' order.
    """
    iters = _positive("iters", iters)
    mix = as_tensor("mix", mix)
    _ndim("mix", mix, 2)
    return _mhc_weights(mix, as_tensor("scale", scale), as_tensor("base", base), iters, float(eps))


def compressor_state(ratio: int, dim: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Empty decode state of a compressor (SPEC.md section 3): ``(kv_state, score_state)``, both
    ``float32 [coff * ratio, coff * dim]`` (``coff`` = 2 for ratio 4, else 1), kv zeros and
    scores ``-inf``. :func:`compress` advances it in place."""
    ratio, dim = _positive("ratio", ratio), _positive("dim", dim)
    coff = 2 if ratio == 4 else 1
    shape = (coff * ratio, coff * dim)
    return (
        torch.zeros(shape, dtype=torch.float32, device=device),
        torch.full(shape, float("-inf"), dtype=torch.float32, device=device),
    )


def _entries_completed(start_pos: int, tokens: int, ratio: int) -> int:
    return (start_pos + tokens) // ratio - start_pos // ratio


@torch.library.custom_op("dsv4rs::compress", mutates_args=("kv_state", "score_state"))
def _compress(
    kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, norm_weight: torch.Tensor, inv_freq: torch.Tensor,
    kv_state: torch.Tensor, score_state: torch.Tensor, start_pos: int, ratio: int, eps: float, quant: str,
) -> torch.Tensor:
    n = _entries_completed(start_pos, kv.shape[0], ratio)
    out = torch.empty((n, norm_weight.shape[0]), dtype=torch.float32, device=kv.device)
    _core.compress(
        spec("kv", kv), spec("score", score), spec("ape", ape), spec("norm_weight", norm_weight),
        spec("inv_freq", inv_freq), spec("kv_state", kv_state), spec("score_state", score_state), spec("out", out),
        start_pos, ratio, eps, quant, stream(kv),
    )
    return out


@_compress.register_fake
def _(
    kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, norm_weight: torch.Tensor, inv_freq: torch.Tensor,
    kv_state: torch.Tensor, score_state: torch.Tensor, start_pos: int, ratio: int, eps: float, quant: str,
) -> torch.Tensor:
    n = _entries_completed(start_pos, kv.shape[0], ratio)
    return kv.new_empty((n, norm_weight.shape[0]), dtype=torch.float32)


def compress(
    kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, norm_weight: torch.Tensor, inv_freq: torch.Tensor,
    kv_state: torch.Tensor, score_state: torch.Tensor, start_pos: int, ratio: int, eps: float = 1e-6,
    quant: Quant = "none",
) -> torch.Tensor:
    """Feeds tokens ``start_pos .. start_pos + S - 1`` to a compressor (SPEC.md section 3) and
    returns the entries they complete. One form serves prefill (all tokens at once) and decode
    (one token a call): any split of a sequence into calls gives the same entries, bit for bit.

    Args:
        kv, score: ``float32 [S, coff * D]``, the projections ``W_kv x`` and ``W_gate x``
            (``coff`` = 2 for ratio 4, whose entries overlap, else 1).
        ape: ``float32 [ratio, coff * D]`` positional bias of the logits.
        norm_weight: ``float32 [D]`` RMSNorm weight.
        inv_freq: ``float32``/``float64 [R/2]``, RoPE on the last ``R`` dims at position
            ``ratio * i`` for entry ``i``.
        kv_state, score_state: the sequence's state from :func:`compressor_state`, advanced in
            place; ``start_pos`` must be the number of tokens it has seen.
        start_pos: position of the first token.
        ratio: compression ratio (4: CSA, 128: HCA; any ``>= 1``).
        eps: RMSNorm epsilon.
        quant: ``"none"``; ``"fp8"``, the round trip through the 584-byte cache entry (D = 512);
            or ``"fp4"``, Hadamard-128 then the FP4 indexer-key round trip (D = 128).

    Returns:
        ``float32 [E, D]``: entries ``start_pos // ratio ..``, one for each position ``p`` of
        the call with ``(p + 1) % ratio == 0``, pooled, RMS-normalized (in float32, without
        the bf16 cast SPEC.md puts before the norm, as ``reference.compressor_prefill``),
        rotated and quantized. Scores may hold ``-inf`` (a token without a
        vote); other non-finite inputs raise before the state changes.
    """
    ratio = _positive("ratio", ratio)
    if isinstance(start_pos, bool) or not isinstance(start_pos, int) or start_pos < 0:
        raise ValueError(f"start_pos: expected an int >= 0, got {start_pos!r}")
    if quant not in ("none", "fp8", "fp4"):
        raise ValueError(f'quant: expected "none", "fp8" or "fp4", got {quant!r}')
    args = [as_tensor(n, t) for n, t in (("kv", kv), ("score", score), ("ape", ape), ("norm_weight", norm_weight),
                                         ("inv_freq", inv_freq), ("kv_state", kv_state), ("score_state", score_state))]
    _ndim("kv", args[0], 2)
    _ndim("norm_weight", args[3], 1)
    if args[5].data_ptr() == args[6].data_ptr() and args[5].numel() > 0:
        raise ValueError("kv_state, score_state: must be distinct tensors")
    return _compress(*args, start_pos, ratio, float(eps), quant)


@torch.library.custom_op("dsv4rs::indexer_topk", mutates_args=())
def _indexer_topk(
    q: torch.Tensor, weights: torch.Tensor, key_cache: torch.Tensor, block_table: torch.Tensor,
    seq_ids: torch.Tensor, visible: torch.Tensor, k: int, physical: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    indices = torch.empty((q.shape[0], k), dtype=torch.int32, device=q.device)
    scores = torch.empty((q.shape[0], k), dtype=torch.float32, device=q.device)
    workspace = None
    if q.device.type == "cuda" and q.dim() == 3 and block_table.dim() == 2:
        size = _core.indexer_workspace_bytes(q.shape[0], block_table.shape[1] * PAGE_ROWS, k)
        workspace = torch.empty(size, dtype=torch.uint8, device=q.device)
    _core.indexer_topk(
        spec("q", q), spec("weights", weights), spec("key_cache", key_cache), spec("block_table", block_table),
        spec("seq_ids", seq_ids), spec("visible", visible), spec("indices", indices), spec("scores", scores),
        k, physical, None if workspace is None else spec("workspace", workspace), stream(q),
    )
    return indices, scores


@_indexer_topk.register_fake
def _(
    q: torch.Tensor, weights: torch.Tensor, key_cache: torch.Tensor, block_table: torch.Tensor,
    seq_ids: torch.Tensor, visible: torch.Tensor, k: int, physical: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return q.new_empty((q.shape[0], k), dtype=torch.int32), q.new_empty((q.shape[0], k), dtype=torch.float32)


def indexer_topk(
    q: torch.Tensor, weights: torch.Tensor, key_cache: torch.Tensor, block_table: torch.Tensor,
    seq_ids: torch.Tensor, visible: torch.Tensor, k: int, return_scores: bool = False, physical: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The Lightning Indexer's selection (SPEC.md section 4), fused: scores
    ``I_ts = sum_h w_th ReLU(q_th . k_s)`` are computed a key tile at a time and never stored for
    all keys; memory is ``O(T * k)`` whatever the context.

    Args:
        q: ``float32``/``bfloat16 [T, H, 128]`` indexer queries (any ``H >= 1``).
        weights: ``float32 [T, H]`` head weights ``w_t``.
        key_cache: paged indexer keys, 64 rows a page: ``uint8 [P, 64 * 68]`` (FP4, see
            :func:`new_index_key_cache`), ``uint8 [P, 64 * 132]`` (FP8), or plain
            ``bfloat16``/``float32 [P, 64, 128]``.
        block_table: ``int32 [B, max_pages]``: key ``s`` of sequence ``b`` is row ``s % 64`` of
            page ``block_table[b, s // 64]``.
        seq_ids: ``int32``/``int64 [T]``, the sequence of each query.
        visible: ``int32``/``int64 [T]``, how many keys of its sequence each query sees
            (at most ``max_pages * 64``).
        k: keys to select.
        return_scores: also return the selected scores.
        physical: return cache rows (``page * 64 + offset``) instead of key numbers.

    Returns:
        ``int32 [T, k]``: the top ``min(k, visible[t])`` keys by score, descending, ties to the
        lower key, then ``-1``; with ``return_scores``, also ``float32 [T, k]`` (``-inf``
        padding).
    """
    k = _positive("k", k)
    q = as_tensor("q", q)
    _ndim("q", q, 3)
    indices, scores = _indexer_topk(
        q, as_tensor("weights", weights), as_tensor("key_cache", key_cache), as_tensor("block_table", block_table),
        as_tensor("seq_ids", seq_ids), as_tensor("visible", visible), k, physical,
    )
    return (indices, scores) if return_scores else indices


@torch.library.custom_op("dsv4rs::sparse_attention", mutates_args=())
def _sparse_attention(
    q: torch.Tensor, cache: torch.Tensor, indices: torch.Tensor, sink: torch.Tensor, scale: float,
    lengths: torch.Tensor | None, extra_cache: torch.Tensor | None, extra_indices: torch.Tensor | None,
    extra_lengths: torch.Tensor | None, derotate_positions: torch.Tensor | None,
    derotate_inv_freq: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    opt = lambda name, t: None if t is None else spec(name, t)  # noqa: E731
    workspace = None
    if q.device.type == "cuda" and q.dim() == 3 and indices.dim() == 2:
        width = indices.shape[1] + (extra_indices.shape[1] if extra_indices is not None and extra_indices.dim() == 2 else 0)
        size = _core.attention_workspace_bytes(q.shape[0], q.shape[1], width)
        workspace = torch.empty(max(size, 16), dtype=torch.uint8, device=q.device)
    _core.sparse_attention(
        spec("q", q), spec("cache", cache), spec("indices", indices), opt("lengths", lengths),
        opt("extra_cache", extra_cache), opt("extra_indices", extra_indices), opt("extra_lengths", extra_lengths),
        spec("sink", sink), scale, opt("derotate positions", derotate_positions),
        opt("derotate inv_freq", derotate_inv_freq), spec("out", out), spec("lse", lse), opt("workspace", workspace),
        stream(q),
    )
    return out, lse


@_sparse_attention.register_fake
def _(
    q: torch.Tensor, cache: torch.Tensor, indices: torch.Tensor, sink: torch.Tensor, scale: float,
    lengths: torch.Tensor | None, extra_cache: torch.Tensor | None, extra_indices: torch.Tensor | None,
    extra_lengths: torch.Tensor | None, derotate_positions: torch.Tensor | None,
    derotate_inv_freq: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return q.new_empty(q.shape, dtype=torch.float32), q.new_empty(q.shape[:2], dtype=torch.float32)


def sparse_attention(
    q: torch.Tensor, cache: torch.Tensor, indices: torch.Tensor, sink: torch.Tensor, scale: float | None = None,
    lengths: torch.Tensor | None = None, extra_cache: torch.Tensor | None = None,
    extra_indices: torch.Tensor | None = None, extra_lengths: torch.Tensor | None = None,
    derotate: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with a sink over per-query candidate rows (SPEC.md section 2), K = V = the row.

    ``out_th = sum_j exp(z_hj) e_j / (sum_j exp(z_hj) + exp(sink_h))`` with
    ``z_hj = scale * q_th . e_j``, one softmax over the valid candidates of both lists. Rows are
    decoded once per query and shared by all heads; the softmax is computed online.

    Args:
        q: ``float32``/``bfloat16 [T, H, 512]`` (any ``H >= 1``).
        cache: the rows: ``uint8 [P, 37376]`` (584-byte FP8 entries, :func:`new_kv_cache`) or
            plain ``bfloat16``/``float32 [P, 64, 512]``.
        indices: ``int32``/``int64 [T, K]`` cache rows (``page * 64 + offset``), ``-1`` masked;
            a repeated row counts each time; other rows outside the cache raise IndexError.
        sink: ``float32 [H]``, unscaled.
        scale: logit scale, default ``512 ** -0.5``.
        lengths: ``int32 [T]``: only the first ``lengths[t]`` columns of ``indices`` count.
        extra_cache, extra_indices, extra_lengths: a second candidate list in its own cache
            (e.g. the sliding window beside the compressed rows), joining the same softmax.
        derotate: ``(positions int64 [T], inv_freq)``: inverse RoPE of each head's output at
            the query position (the last ``2 * len(inv_freq)`` dims).

    Returns:
        ``(out float32 [T, H, 512], lse float32 [T, H])``: ``lse`` is the log-sum-exp of the
        candidates' logits without the sink; a query without candidates gets ``-inf`` and a zero
        output.
    """
    q = as_tensor("q", q)
    _ndim("q", q, 3)
    if (extra_cache is None) != (extra_indices is None):
        raise ValueError("extra_cache, extra_indices: give both or neither")
    if extra_lengths is not None and extra_indices is None:
        raise ValueError("extra_lengths: needs extra_cache and extra_indices")
    opt = lambda name, t: None if t is None else as_tensor(name, t)  # noqa: E731
    positions, inv_freq = (None, None) if derotate is None else derotate
    return _sparse_attention(
        q, as_tensor("cache", cache), as_tensor("indices", indices), as_tensor("sink", sink),
        ENTRY_SCALE if scale is None else float(scale), opt("lengths", lengths), opt("extra_cache", extra_cache),
        opt("extra_indices", extra_indices), opt("extra_lengths", extra_lengths), opt("positions", positions),
        opt("inv_freq", inv_freq),
    )
