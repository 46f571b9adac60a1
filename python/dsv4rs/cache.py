"""The paged KV-cache allocator (docs/model.md sections 3 and 5): which device rows hold each
sequence's sliding window, compressed entries and compressor state.

The manager does bookkeeping on the host; the caller owns the device tensors. Four cache
families, each a pool of pages; page 0 of every pool is the null page (it pads page tables and
is never handed out). One page id of a family addresses 64 rows in *every* layer of that family,
so a sequence has one page table per family and a page weighs ``64 * row bytes * layers``:

- ``"window"``: every layer's 128-token sliding window, a ring per sequence: token ``p`` lives
  at ring row ``p % window``; two pages per sequence, recycled, never growing.
- ``"csa"``: CSA rows (1 per 4 tokens) and their indexer keys, which share row ids: the same
  page id indexes the main-entry tensor and the indexer-key tensor.
- ``"hca"``: HCA rows (1 per 128 tokens).
- ``"state"``: compressor state, one slot per sequence holding the fp32 kv and score state of
  all its compressors (per CSA layer 64 KiB + 16 KiB for the indexer, per HCA layer 512 KiB).

Compressed entry ``i`` exists once token ``r*i + r - 1`` has been appended. Suggested device
tensors, each layer's slice in the layout of :mod:`dsv4rs.ops` (row ``r`` = row ``r % 64`` of
page ``r // 64``)::

    window     uint8 [num_layers, pages["window"], 64 * main_bytes]
    csa        uint8 [csa_layers, pages["csa"], 64 * main_bytes]  and  [..., 64 * key_bytes]
    hca        uint8 [hca_layers, pages["hca"], 64 * main_bytes]
    state      float32 per slot: CSA [csa_layers, slots, 2, 8, 1024] and [..., 2, 8, 256],
               HCA [hca_layers, slots, 2, 128, 512]

One step: :meth:`KVCacheManager.append` -> perform every ``copies`` pair (page ``src`` to
``dst`` in every layer of the family; all copies before any write) -> write the new rows at
``slots`` -> attend through :meth:`~KVCacheManager.page_tables` and
:meth:`~KVCacheManager.physical_rows`. A sequence's state slot is fresh at its first append:
initialize it (scores to -inf) before running the compressors. An append of several tokens
overwrites the oldest window rows: read the rows a chunk's queries need from before the chunk
before writing the chunk's own.

Prefix reuse: full 256-token units of token ids are hashed in a chain and registered when the
append completing them returns. :meth:`KVCacheManager.add_sequence` with a prompt shares the
compressed pages (CSA rows, indexer keys, HCA rows) of its longest registered prefix. Window
rings and compressor state are never shared: the caller re-runs the prompt from
``hit.recompute_from`` (``(window - 1)`` tokens per layer of depth before ``hit.cached_tokens``,
since each layer's window reaches one window further back; see
:attr:`CacheConfig.rebuild_tokens`). The compressed entries of that re-run come back with slot
``-1``: they are cached already. Registered pages stay findable after their sequences are
released, until the pool reallocates them (least recently released first).
"""

from __future__ import annotations

import dataclasses
import itertools
import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch

from dsv4rs import _core
from dsv4rs._tensor import as_tensor, spec

FamilyName = Literal["window", "csa", "hca", "state"]
FAMILIES: tuple[FamilyName, ...] = ("window", "csa", "hca", "state")
"""The cache families, in the order the extension uses."""

MAX_PAGES: int = _core.MAX_PAGES
"""Pages one pool of a :class:`KVCacheManager` holds at most (2^26)."""


def _tensor(buf: bytearray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Wraps a ``bytearray`` from the extension as a tensor, sharing its memory; a ``-1`` in
    ``shape`` is inferred."""
    if not buf:  # torch.frombuffer refuses empty buffers
        return torch.empty(tuple(max(s, 0) for s in shape), dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).view(shape)


_U64 = (1 << 64) - 1
_TOKEN_IDS = 1 << 32
"""Token ids are unsigned 32-bit in the allocator (prefix hashing)."""


def _int(name: str, value: Any, low: int = 0, high: int = (1 << 63) - 1) -> int:
    """``value`` as an int in ``[low, high]``; TypeError or ValueError naming ``name``."""
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected an int, got bool")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}") from None
    if not low <= v <= high:
        raise ValueError(f"{name}: expected an int in [{low}, {high}], got {v}")
    return v


def int_ids(name: str, x: object, *, cpu: bool = True) -> list[int] | torch.Tensor:
    """Ids given as an iterable of ints, or a 1-d integer tensor or array: the list of ints, or the
    tensor (on the CPU unless ``cpu=False``), not range-checked. Anything else is a TypeError naming
    ``name``: bools and floats are refused rather than truncated, a 2-d tensor rather than
    flattened. The allocator's ids and the engine's token ids both take these rules."""
    if isinstance(x, torch.Tensor) or hasattr(x, "__array_interface__"):
        try:
            t = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{name}: expected a 1-d integer tensor of ids ({e})") from None
        if t.dim() != 1 or t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
            raise TypeError(f"{name}: expected a 1-d integer tensor of ids, got {t.dtype} {list(t.shape)}")
        if cpu and t.device.type != "cpu":
            raise TypeError(f"{name}: expected ids on the CPU, got a tensor on {t.device}")
        return t
    if isinstance(x, (str, bytes, bytearray)) or not isinstance(x, Iterable):
        raise TypeError(f"{name}: expected a sequence of ints, got {type(x).__name__}")
    if type(x) is list and all(type(v) is int for v in x):
        return x  # plain ints (a decode step's ids): no per-item conversion
    vals = []
    for v in x:
        if isinstance(v, bool):
            raise TypeError(f"{name}: ids must be ints, got bool")
        try:
            vals.append(operator.index(v))
        except TypeError:
            raise TypeError(f"{name}: ids must be ints, got {type(v).__name__}") from None
    return vals


def _ids(name: str, x: Iterable[int] | torch.Tensor, high: int = 1 << 63) -> list[int]:
    """:func:`int_ids` on the CPU as a new list of ints, each in ``[0, high)`` (else a ValueError
    naming ``name``): what the extension takes."""
    v = int_ids(name, x)
    vals = v.tolist() if isinstance(v, torch.Tensor) else list(v)
    if vals and (min(vals) < 0 or max(vals) >= high):
        raise ValueError(f"{name}: ids must lie in [0, {high}), got {min(vals)}..{max(vals)}")
    return vals


@dataclasses.dataclass(frozen=True)
class Footprint:
    """Bytes by part of the cache; CSA pages hold main rows and indexer keys, reported apart."""

    window: int
    csa_main: int
    csa_index: int
    hca: int
    state: int

    @property
    def compressed(self) -> int:
        """CSA rows and keys plus HCA rows: the part that grows with context."""
        return self.csa_main + self.csa_index + self.hca

    @property
    def total(self) -> int:
        """Bytes of every part."""
        return self.window + self.compressed + self.state


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """A model's cache geometry.

    Args:
        compress_ratios: one entry per layer in depth order, as the Hugging Face config lists
            them (the last one is the SWA-only MTP layer): 0 = sliding window only, 4 = CSA,
            128 = HCA (docs/model.md section 1).
        window: sliding-window tokens per layer (current token included).
        index_format: CSA indexer keys: ``"fp4"`` (68 B), ``"fp8"`` (132 B) or ``"bf16"`` (256 B).
        main_format: main entries: ``"fp8"`` (584 B) or ``"bf16"`` (1024 B).
    """

    compress_ratios: tuple[int, ...]
    window: int = 128
    index_format: Literal["fp4", "fp8", "bf16"] = "fp4"
    main_format: Literal["fp8", "bf16"] = "fp8"
    _layout: Any = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ratios = tuple(_ids("compress_ratios", self.compress_ratios, 1 << 16))
        object.__setattr__(self, "compress_ratios", ratios)
        object.__setattr__(self, "window", _int("window", self.window))
        layout = _core.CacheLayout(list(ratios), self.window, self.main_format, self.index_format)
        object.__setattr__(self, "_layout", layout)

    @classmethod
    def v4_pro(cls, **overrides: Any) -> CacheConfig:
        """DeepSeek-V4-Pro: 61 layers (30 CSA + 31 HCA) and the MTP layer."""
        return cls(tuple(_core.CacheLayout.v4_pro_ratios()), **overrides)

    @classmethod
    def v4_flash(cls, **overrides: Any) -> CacheConfig:
        """DeepSeek-V4-Flash: 43 layers (21 CSA + 20 HCA + 2 SWA-only) and the MTP layer."""
        return cls(tuple(_core.CacheLayout.v4_flash_ratios()), **overrides)

    @property
    def num_layers(self) -> int:
        """Layers with a window (all of them, the MTP layer included)."""
        return len(self.compress_ratios)

    @property
    def csa_layers(self) -> int:
        """Layers with compress ratio 4 (CSA)."""
        return int(self._layout.layers("csa"))

    @property
    def hca_layers(self) -> int:
        """Layers with compress ratio 128 (HCA)."""
        return int(self._layout.layers("hca"))

    @property
    def rebuild_tokens(self) -> int:
        """Tokens before the end of a cached prefix that a sequence reusing it must re-run.

        Window rings are not shared, and layer ``l``'s window rows depend on layer ``l - 1``'s
        rows of the ``window - 1`` tokens before them: exact rows at every layer need
        ``window - 1`` tokens per layer (``127 * 62 = 7874`` for V4-Pro)."""
        return int(self._layout.rebuild_tokens())

    def page_bytes(self, family: FamilyName) -> int:
        """Bytes of one page (one state slot) of ``family`` across all its layers."""
        return int(self._layout.page_bytes(family))

    def footprint(self, seq_len: int) -> Footprint:
        """Bytes a sequence of ``seq_len`` tokens holds, from the pages it reserves."""
        return Footprint(*self._layout.footprint(_int("seq_len", seq_len, high=_U64)))

    def bytes_per_token(self, seq_len: int = 1 << 20) -> float:
        """Compressed-family bytes per token at ``seq_len`` (docs/model.md section 5: 5,031 for V4-Pro
        and 3,514 for V4-Flash at 2^20 tokens with FP4 keys); window and state are per
        sequence (see :meth:`footprint`)."""
        return float(self._layout.bytes_per_token(_int("seq_len", seq_len, high=_U64)))

    def sequences_that_fit(self, seq_len: int, budget_bytes: int) -> int:
        """How many sequences of ``seq_len`` tokens fit in pools of ``budget_bytes`` in total
        (each pool's null page included)."""
        return int(self._layout.sequences_that_fit(_int("seq_len", seq_len, high=_U64),
                                                   _int("budget_bytes", budget_bytes, high=_U64)))

    def longest_context(self, budget_bytes: int) -> int | None:
        """The longest single sequence that fits in ``budget_bytes`` of pools; ``None`` when any
        length fits (a model without compressed layers)."""
        return self._layout.longest_context(_int("budget_bytes", budget_bytes, high=_U64))

    def pages_for_budget(self, budget_bytes: int, seq_len: int) -> dict[str, int]:
        """Pages per family (null page included) holding as many ``seq_len``-token sequences
        as ``budget_bytes`` allows: the budget split in the proportion such sequences use."""
        return dict(zip(FAMILIES, self._layout.pages_for_budget(_int("budget_bytes", budget_bytes, high=_U64),
                                                               _int("seq_len", seq_len, high=_U64))))


@dataclasses.dataclass(frozen=True)
class PrefixHit:
    """What a new sequence reuses from the prefix cache.

    Attributes:
        cached_tokens: leading prompt tokens whose compressed entries are shared (a multiple
            of 256; 0 for no hit).
        recompute_from: the sequence's length after the hit. Append ``prompt[recompute_from:]``:
            the tokens up to ``cached_tokens`` rebuild the window and compressor state.
    """

    cached_tokens: int
    recompute_from: int


@dataclasses.dataclass(frozen=True)
class AppendResult:
    """What the caller does on the device after an append, in this order.

    Attributes:
        copies: per family, ``int64 [k, 2]`` pairs ``(src, dst)``: copy page ``src`` to ``dst``
            in every layer of the family (copy on write of shared pages).
        slots: per family, ``int64`` physical rows to write, concatenated over the batch in
            order: ``"window"`` one per appended token (-1 for a token the same append
            overwrites), ``"csa"``/``"hca"`` one per entry the append completes (-1 for an entry
            a cached prefix already holds), ``"state"`` each sequence's state slot (-1 when the
            model has no compressor).
    """

    copies: dict[str, torch.Tensor]
    slots: dict[str, torch.Tensor]


class KVCacheManager:
    """Pages of one model's KV cache and the sequences using them. Thread-safe: calls are
    serialized by a lock and run without the GIL.

    Args:
        config: the model's cache geometry.
        pages: pages per family, the null page included (so ``n`` pages hand out ``n - 1``);
            see :meth:`from_budget`.
    """

    def __init__(self, config: CacheConfig, pages: Mapping[str, int]) -> None:
        if not isinstance(pages, Mapping):
            raise TypeError(f"pages: expected a mapping of family to page count, got {type(pages).__name__}")
        unknown = set(pages) - set(FAMILIES)
        if unknown or len(pages) != len(FAMILIES):
            raise ValueError(f"pages: expected one count for each of {FAMILIES}, got {dict(pages)}")
        self._config = config
        self._core = _core.CacheManager(config._layout, [_int(f"pages[{f!r}]", pages[f]) for f in FAMILIES])

    @classmethod
    def from_budget(cls, config: CacheConfig, budget_bytes: int, seq_len: int) -> KVCacheManager:
        """A manager whose pools total at most ``budget_bytes``, sized for sequences of
        ``seq_len`` tokens (see :meth:`CacheConfig.pages_for_budget`)."""
        return cls(config, config.pages_for_budget(budget_bytes, seq_len))

    @property
    def config(self) -> CacheConfig:
        """The cache geometry this manager allocates for."""
        return self._config

    def num_pages(self) -> dict[str, int]:
        """Pages per pool, the null page included."""
        return {f: n for f, (n, _) in zip(FAMILIES, self._core.pages())}

    def free_pages(self) -> dict[str, int]:
        """Pages per pool without a reference (some still hold a cached prefix)."""
        return {f: free for f, (_, free) in zip(FAMILIES, self._core.pages())}

    def used_pages(self) -> dict[str, int]:
        """Pages per pool with at least one reference."""
        return {f: n - 1 - free for f, (n, free) in zip(FAMILIES, self._core.pages())}

    def add_sequence(self, prompt: Iterable[int] | torch.Tensor = ()) -> tuple[int, PrefixHit]:
        """Adds an empty sequence and returns its id. With a ``prompt``, the sequence shares the
        compressed pages of its longest cached prefix; it then appends
        ``prompt[hit.recompute_from:]``. Never allocates, so it cannot run out of pages."""
        seq_id, cached, start = self._core.add_sequence(_ids("prompt", prompt, _TOKEN_IDS))
        return seq_id, PrefixHit(cached, start)

    def lookup_prefix(self, prompt: Iterable[int] | torch.Tensor) -> PrefixHit:
        """What :meth:`add_sequence` would reuse for ``prompt``, without taking anything."""
        return PrefixHit(*self._core.lookup_prefix(_ids("prompt", prompt, _TOKEN_IDS)))

    def append(self, seq_ids: Sequence[int], tokens: Sequence[Iterable[int] | torch.Tensor]) -> AppendResult:
        """Appends ``tokens[i]`` (token ids) to sequence ``seq_ids[i]`` for every ``i``.

        All or nothing: when a pool is short, :class:`dsv4rs.OutOfPagesError` says which, and
        nothing changed. An unknown or released sequence raises :class:`dsv4rs.CacheStateError`.
        """
        ids = _ids("seq_ids", seq_ids)
        if isinstance(tokens, (str, bytes)) or len(tokens) != len(ids):
            raise ValueError(f"tokens: expected one token list per sequence ({len(ids)} sequences), got "
                             f"{len(tokens) if not isinstance(tokens, (str, bytes)) else type(tokens).__name__}")
        chunks = [_ids(f"tokens[{i}]", t, _TOKEN_IDS) for i, t in enumerate(tokens)]
        return _appended(*self._core.append(ids, chunks))

    def append_unresolved(self, seq_ids: Sequence[int], counts: Sequence[int]) -> AppendResult:
        """Appends ``counts[i]`` tokens whose ids are not known yet (e.g. sampled on the device
        and still on their way to the host) to sequence ``seq_ids[i]``: the same pages, slots
        and copies as :meth:`append` of that many ids. Give the ids with :meth:`resolve`; until
        then the prefix units they complete are not registered, and the sequence takes no
        :meth:`append` of ids (ValueError). All or nothing, as :meth:`append`."""
        ids = _ids("seq_ids", seq_ids)
        if isinstance(counts, (str, bytes)) or len(counts) != len(ids):
            raise ValueError(f"counts: expected one count per sequence ({len(ids)} sequences)")
        ns = [_int(f"counts[{i}]", n, 0, (1 << 32) - 1) for i, n in enumerate(counts)]
        return _appended(*self._core.append_unresolved(ids, ns))

    def resolve(self, seq_id: int, ids: Iterable[int] | torch.Tensor) -> None:
        """The ids of the first ``len(ids)`` unresolved tokens of ``seq_id``, in order; registers
        the prefix units they complete. More ids than unresolved tokens raise ValueError and
        change nothing."""
        self._core.resolve(_int("seq_id", seq_id), _ids("ids", ids, _TOKEN_IDS))

    def unresolved(self, seq_id: int) -> int:
        """Tokens of ``seq_id`` appended by count whose ids are not resolved yet."""
        return int(self._core.unresolved(_int("seq_id", seq_id)))

    def fork(self, seq_id: int) -> int:
        """A new sequence sharing all pages of ``seq_id``; the first append of either that
        writes into a shared page gets a copy (reported in :attr:`AppendResult.copies`)."""
        return int(self._core.fork(_int("seq_id", seq_id)))

    def release(self, seq_id: int) -> None:
        """Drops the sequence. Its pages go back to the pools' free lists (cached prefixes stay
        findable until reallocated); releasing twice raises :class:`dsv4rs.CacheStateError`."""
        self._core.release(_int("seq_id", seq_id))

    def length(self, seq_id: int) -> int:
        """Tokens appended to the sequence."""
        return int(self._core.length(_int("seq_id", seq_id)))

    def sequence_ids(self) -> list[int]:
        """Live sequences, in increasing id order."""
        return list(self._core.sequence_ids())

    def page_tables(self, seq_ids: Sequence[int], family: FamilyName, width: int | None = None) -> torch.Tensor:
        """``int32 [len(seq_ids), width]`` page tables padded with the null page 0.

        ``width`` defaults to the longest table; pass a fixed width for CUDA graphs. The window
        table lists ring pages (token ``p`` at ring row ``p % window``); the state table holds
        the state slot."""
        width = None if width is None else _int("width", width)
        buf, w = self._core.page_tables(family, _ids("seq_ids", seq_ids), width)
        return _tensor(buf, torch.int32, (len(seq_ids), w))

    def physical_rows(self, seq_ids: Sequence[int], family: FamilyName, logical: torch.Tensor) -> torch.Tensor:
        """Physical row ids (``page * 64 + offset``) of logical indices.

        Args:
            seq_ids: the sequence of each row of ``logical`` (ids may repeat).
            family: ``"window"`` (logical index = token position; valid for the last
                ``window`` positions), ``"csa"`` or ``"hca"`` (entry index; valid for
                complete entries).
            logical: ``int64 [len(seq_ids), k]`` on the CPU.

        Returns ``int64 [len(seq_ids), k]``; -1 where the index is negative or out of range.
        """
        logical = as_tensor("logical", logical)
        out = torch.empty(logical.shape, dtype=torch.int64)
        self._core.physical_rows(family, _ids("seq_ids", seq_ids), spec("logical", logical), spec("out", out))
        return out

    def sequence_footprint(self, seq_id: int) -> Footprint:
        """Bytes of the pages the sequence references (shared pages counted in full)."""
        return Footprint(*self._core.sequence_footprint(_int("seq_id", seq_id)))

    def used_footprint(self) -> Footprint:
        """Bytes of the pages in use, each counted once."""
        return Footprint(*self._core.used_footprint())

    def pool_footprint(self) -> Footprint:
        """Bytes of all pages of all pools, null pages included: the device memory to allocate."""
        return Footprint(*self._core.pool_footprint())

    def refcounts(self, family: FamilyName) -> torch.Tensor:
        """``int32 [num_pages]``: references to each page of ``family`` (0 = free)."""
        return _tensor(self._core.refcounts(family), torch.int32, (-1,))

    def cached_units(self) -> int:
        """Registered 256-token prefix units, in use or cached."""
        return int(self._core.cached_units())

    def check(self) -> None:
        """Checks every invariant of the pools, tables and prefix index (O(pages)); raises
        :class:`dsv4rs.CacheStateError` naming the first violation."""
        self._core.check()


def _appended(buf: bytearray, slot_counts: list[int], copy_counts: list[int]) -> AppendResult:
    """An append's result from the core's one int64 buffer of slots, then copy pairs."""
    flat = _tensor(buf, torch.int64, (-1,))
    bounds = itertools.accumulate([*slot_counts, *(2 * c for c in copy_counts)], initial=0)
    parts = [flat[a:b] for a, b in itertools.pairwise(bounds)]
    return AppendResult(
        copies={f: p.view(-1, 2) for f, p in zip(FAMILIES, parts[4:])},
        slots=dict(zip(FAMILIES, parts[:4])),
    )
