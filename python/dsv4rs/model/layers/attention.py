"""The attention layer over the paged KV cache (docs/model.md sections 2-4).

Per step, the runtime plans what every layer shares (:class:`AttentionMetadata`: positions, the
rows each family writes, page tables, window candidates) and hands each layer its slice of the
cache (:class:`LayerCache`). A layer then:

1. projects the query, the K=V entry and (on CSA/HCA layers) the compressor inputs, and rotates;
2. writes the entry into the window ring (a chunk of several tokens first stages the ring rows
   before it, which its own writes overwrite, and reads its window from that copy);
3. on CSA/HCA layers, feeds the compressors (:func:`.compressor.compress_chunks`) and writes the
   entries they complete; CSA also writes indexer keys and selects its top-k rows with
   :func:`dsv4rs.ops.indexer_topk`; HCA attends every visible row;
4. attends with :func:`dsv4rs.ops.sparse_attention` (sink, window as the second list, fused
   de-rotation) and applies the grouped output projection.

On a GPU, steps 1-3 run as chains on side streams beside the query's projection
(:meth:`Attention.forward`).

With quantized storage (uint8 caches) entries are 584-byte FP8 rows and indexer keys FP4 (or FP8)
after the Hadamard rotation, and the indexer queries take the keys' rotation and round trip, as
production does; otherwise rows are stored as they are (float32 on the CPU, bfloat16 on a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dsv4rs import ops
from dsv4rs.model.config import CSA, HCA, INDEX_DIM, SWA, V4Config
from dsv4rs.model.layers.compressor import Compressor, CSACompressor, HCACompressor, compress_tokens
from dsv4rs.model.layers.norm import RMSNorm, linear, rms_norm
from dsv4rs.model.layers import streams
from dsv4rs.model.layers.packed import project
from dsv4rs.model.layers.quant import QuantLinear, compute_dtype, split_blocker
from dsv4rs.model.layers.rotary import RotaryEmbedding
from dsv4rs.model.layers.rotary import inv_freq as rope_inv_freq


@dataclass
class Staging:
    """For a chunk longer than one token: the window rows before each chunk copied from the ring
    (``prior_src`` ring rows to ``prior_dst`` staging rows), then the chunk's own entries at
    ``new_dst``, in ``cache`` (a step-wide scratch cache in the ring's format)."""

    cache: torch.Tensor
    prior_src: torch.Tensor
    prior_dst: torch.Tensor
    new_dst: torch.Tensor


@dataclass
class AttentionMetadata:
    """What every layer of one step reads, planned once per step; device tensors, so that a
    decode step needs no host synchronization and can be captured in a CUDA graph.

    Attributes:
        positions: ``int64 [T]`` position of each token.
        token_seq: ``int64 [T]`` batch row of each token.
        starts, state_slots: ``int64 [B]`` first position of each sequence's chunk, its
            compressor state slot (``-1``: none, a padding row).
        cu_tokens: ``int64 [B + 1]`` token offsets of the sequences.
        window_slots: ``int64 [T]`` the ring row each token's entry goes to (``-1``: none).
        window_candidates: ``[T, window]`` each query's window rows (of the ring, or of
            ``staging.cache`` when set), ``-1`` masked.
        staging: the window staging of a step with multi-token chunks, else ``None``.
        slots: ``"csa"``/``"hca"``: ``int64 [T]`` the compressed row of the entry each token
            completes (``-1``: none, or one a cached prefix holds).
        tables: ``"csa"``: ``int32 [B, pages]`` page tables of the CSA rows and keys.
        visible: per compress ratio, ``[T]`` compressed entries each query sees.
        hca_candidates: ``[T, width]`` every visible HCA row of each query, ``-1`` masked.
    """

    positions: torch.Tensor
    token_seq: torch.Tensor
    starts: torch.Tensor
    cu_tokens: torch.Tensor
    state_slots: torch.Tensor
    window_slots: torch.Tensor
    window_candidates: torch.Tensor
    staging: Staging | None
    slots: dict[str, torch.Tensor]
    tables: dict[str, torch.Tensor]
    visible: dict[int, torch.Tensor]
    hca_candidates: torch.Tensor | None


@dataclass
class LayerCache:
    """One layer's slice of the KV cache: its window ring pages, its compressed rows, indexer keys
    and compressor states (``[slots, 2, coff r, coff D]``, kv then scores) where it has them.
    ``key_format`` is ``"fp4"``/``"fp8"`` for quantized indexer keys, ``None`` for plain rows."""

    window: torch.Tensor
    main: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    state: torch.Tensor | None = None
    index_state: torch.Tensor | None = None
    key_format: str | None = None


def write_rows(cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor, key_format: str | None = None) -> None:
    """Writes row ``i`` of ``values`` at row ``slots[i]`` (``-1``: not written) of ``cache``:
    quantized into a uint8 cache (KV entries, or indexer keys in ``key_format``), or stored as
    plain rows. Plain rows with slot ``-1`` go to row 0, which belongs to the null page every
    pool keeps and no sequence reads (masking them instead would need a host synchronization)."""
    if cache.dtype != torch.uint8:
        cache.view(-1, cache.shape[-1])[slots.clamp(min=0)] = values.to(cache.dtype)
    elif key_format is not None:
        ops.index_key_write(cache, slots, values.float(), key_format)
    else:
        ops.kv_write(cache, slots, values.float())


class GroupedLinear(nn.Module):
    """``W_oa``: each group of ``heads / g`` heads projected on its own."""

    def __init__(self, in_per_group: int, out_features: int, groups: int) -> None:
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.zeros(out_features, in_per_group))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [T, g, in]`` -> ``[T, g * out / g]``."""
        w = self.weight.to(x.dtype).view(self.groups, -1, x.shape[-1])
        return torch.einsum("tgi,goi->tgo", x, w).flatten(1)


class Attention(nn.Module):
    """One attention layer: weights under transformers' names, projections, and the forward pass
    over the paged cache."""

    def __init__(self, cfg: V4Config, layer_type: str) -> None:
        super().__init__()
        self.layer_type = layer_type
        self.heads, self.head_dim, self.groups, self.eps = cfg.num_attention_heads, cfg.head_dim, cfg.o_groups, cfg.rms_norm_eps
        self.q_a_proj = linear(cfg.hidden_size, cfg.q_lora_rank)
        self.q_a_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.q_b_proj = linear(cfg.q_lora_rank, self.heads * self.head_dim)
        self.kv_proj = linear(cfg.hidden_size, self.head_dim)
        self.kv_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.o_a_proj = GroupedLinear(self.heads * self.head_dim // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, cfg.o_groups)
        self.o_b_proj = linear(cfg.o_groups * cfg.o_lora_rank, cfg.hidden_size)
        self.sinks = nn.Parameter(torch.zeros(self.heads, dtype=torch.float32))
        self.rotary = RotaryEmbedding(rope_inv_freq(cfg, layer_type != SWA))
        self.reduce = None  # sums the output over tensor-parallel ranks (dsv4rs.parallel.attach)
        self.compressor: Compressor | None = None
        if layer_type == CSA:
            self.compressor = CSACompressor(cfg)
        elif layer_type == HCA:
            self.compressor = HCACompressor(cfg)

    def head_share(self, rank: int, world: int) -> dict[str, tuple[int, range]]:
        """What rank ``rank`` of ``world`` holds of this layer under tensor-parallel attention:
        its contiguous share of the output groups and the heads they project, as parameter name
        (relative to the layer) -> ``(dim, range)``: rows of ``q_b_proj.weight`` (``head_dim``
        per head), entries of ``sinks`` (one per head), rows of ``o_a_proj.weight`` and columns of
        ``o_b_proj.weight`` (``o_lora_rank`` per group). Read from the layer's current (full)
        shapes, so it works on the meta device as well. The one place this split is defined:
        :func:`dsv4rs.parallel.shard` and ``load_checkpoint(tp=...)`` both use it."""
        if world < 1 or not 0 <= rank < world or self.groups % world:
            raise ValueError(f"tensor-parallel share: rank {rank} of {world} ranks: expected 0 <= rank < world and world dividing the "
                             f"{self.groups} output groups (o_groups)")
        groups = range(self.groups * rank // world, self.groups * (rank + 1) // world)
        per_group = self.heads // self.groups
        heads = range(groups.start * per_group, groups.stop * per_group)
        dim = self.head_dim
        rank_out = self.o_a_proj.weight.shape[0] // self.groups
        out = range(groups.start * rank_out, groups.stop * rank_out)
        return {"q_b_proj.weight": (0, range(heads.start * dim, heads.stop * dim)), "sinks": (0, heads),
                "o_a_proj.weight": (0, out), "o_b_proj.weight": (1, out)}

    def check_share(self, rank: int, world: int) -> dict[str, tuple[int, range]]:
        """:meth:`head_share`, checked against the weights as held: a quantized weight
        (:class:`~dsv4rs.model.layers.quant.QuantLinear`) can only be cut with the scales
        covering its part, so the part must start and end on its scale blocks (128 values for
        FP8); ValueError naming the weight otherwise."""
        share = self.head_share(rank, world)
        for name, (dim, r) in share.items():
            owner = self.get_submodule(name.rpartition(".")[0])
            if isinstance(owner, QuantLinear):
                size = owner.out_features if dim == 0 else owner.in_features
                block = split_blocker(owner.fmt, dim, r, size)
                if block is not None:
                    raise ValueError(f"{name}: rank {rank} of {world} holds {'rows' if dim == 0 else 'columns'} "
                                     f"[{r.start}, {r.stop}) of this {owner.fmt.upper()} weight, which do not start "
                                     f"and end on its {block}-value scale blocks")
        return share

    def keep_heads(self, rank: int, world: int) -> dict[str, tuple[int, range]]:
        """Keeps only :meth:`head_share`'s parts of the weights (copies, not views, so the full
        tensors can be freed; on the meta device this allocates nothing) and sets the local
        head and group counts; returns the share. A quantized weight is cut with the scales
        covering its part (:meth:`check_share`, which raises before anything is cut)."""
        share = self.check_share(rank, world)
        for name, (dim, r) in share.items():
            owner, leaf = self.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
            if isinstance(owner, QuantLinear):
                owner.narrow_(dim, r)
                continue
            part = getattr(owner, leaf).detach().narrow(dim, r.start, len(r)).clone()
            setattr(owner, leaf, nn.Parameter(part, requires_grad=False))
        self.heads = len(share["sinks"][1])
        self.groups = self.o_a_proj.groups = self.groups // world
        return share

    def input_groups(self) -> list[tuple[nn.Module, ...]]:
        """The linears over the layer's input that :func:`.packed.project` runs as one: ``W_qa``
        with ``W_kv``, and (CSA/HCA) the compressor's ``W_kv`` and ``W_gate``, with (CSA) the
        indexer's ``W_kv``, ``W_gate`` and head weights."""
        groups: list[tuple[nn.Module, ...]] = [(self.q_a_proj, self.kv_proj)]
        comp = self.compressor
        if comp is not None:
            side: tuple[nn.Module, ...] = (comp.kv_proj, comp.gate_proj)
            if isinstance(comp, CSACompressor):
                ix = comp.indexer
                side += (ix.kv_proj, ix.gate_proj, ix.scorer.weights_proj)
            groups.append(side)
        return groups

    def projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(cQ [T, q_lora_rank], q [T, H, 512], e [T, 512])`` before RoPE; ``q`` per-head
        RMS-normalized without weight."""
        qa, kv = project(x, self.input_groups()[0])
        cq, q = self._query(qa, x.dtype)
        return cq, q, self.kv_norm(kv)

    def _query(self, qa: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cQ, q)`` of :meth:`projections` from ``W_qa x``."""
        cq = self.q_a_norm(qa)
        q = self.q_b_proj(cq).unflatten(-1, (self.heads, self.head_dim))
        return cq, rms_norm(q, None, self.eps, dtype)

    def output(self, o: torch.Tensor) -> torch.Tensor:
        """Grouped output projection of the de-rotated attention output ``o [T, H, 512]`` (float32,
        or already in the projection's dtype: :meth:`_out_dtype`)."""
        grouped = o.reshape(o.shape[0], self.groups, -1).to(compute_dtype(self.o_b_proj))
        y = self.o_b_proj(self.o_a_proj(grouped))
        return y if self.reduce is None else self.reduce(y)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, cache: LayerCache) -> torch.Tensor:
        """The layer's output ``[T, d]`` for the normalized input ``x [T, d]``.

        On a GPU the chains that read nothing of each other run on side streams beside the
        query's projection (:mod:`.streams`), all of them urgent (in CSA and HCA layers they are
        the longer path, and their small kernels would otherwise wait behind the query
        projection's blocks): the entry's norm, RoPE and window write, then (CSA, HCA) the main
        compressor and its write and (CSA) the indexer's head weights; the side projections,
        then (CSA) the indexer's compressor, its keys' write and the top-k; (CSA) the indexer's
        queries from cQ. The compressors read the projections in bfloat16 as they are."""
        groups = self.input_groups()
        qa, kv = project(x, groups[0])
        comp = self.compressor
        # Every tensor a side chain reads stays referenced until the joins at the end.
        entry = streams.fork(x, lane=2, urgent=True)
        with streams.on(entry):
            e = self.rotary.normed(kv, self.kv_norm.weight, self.kv_norm.eps, kv.dtype, meta.positions)
            window = self._window(e, meta, cache)
        rows = meta.hca_candidates
        if comp is not None:
            side_stream = streams.fork(x, urgent=True)
            with streams.on(side_stream):
                side = project(x, groups[1])
            with streams.on(entry):
                streams.join(side_stream)
                entries = compress_tokens(comp, side[0], side[1], cache.state, self.rotary, meta)
                write_rows(cache.main, meta.slots["csa" if self.layer_type == CSA else "hca"], entries)
                if self.layer_type == CSA:  # off the indexer's chain, which has none to spare
                    head = self.compressor.indexer.weigh(side[4]).float()
            if self.layer_type == CSA:
                with streams.on(side_stream):
                    self._index_keys(side[2:4], meta, cache)
        cq = self.q_a_norm(qa)
        if self.layer_type == CSA:
            queries_stream = streams.fork(cq, lane=1, urgent=True)
            with streams.on(queries_stream):
                queries = self._index_queries(cq, meta, cache)
            with streams.on(side_stream):
                streams.join(queries_stream)
                streams.join(entry)  # the head weights
                rows = self._select(head, queries, meta, cache)
        q = self.q_b_proj(cq).unflatten(-1, (self.heads, self.head_dim))
        q = self.rotary.normed(q, None, self.eps, x.dtype, meta.positions)  # `_query`'s norm, then RoPE
        streams.join(entry)
        if comp is not None:
            streams.join(side_stream)
        sinks, derotate, table = self.sinks.float(), (meta.positions, self.rotary.inv_freq), self.rotary.table
        out_dtype = self._out_dtype()
        if comp is None:
            o, _ = ops.sparse_attention(q, window, meta.window_candidates, sinks, derotate=derotate, rope_table=table,
                                        out_dtype=out_dtype)
            return self.output(o)
        o, _ = ops.sparse_attention(q, cache.main, rows, sinks, extra_cache=window,
                                    extra_indices=meta.window_candidates, derotate=derotate, rope_table=table,
                                    out_dtype=out_dtype)
        return self.output(o)

    def _out_dtype(self) -> torch.dtype:
        """The attention output's dtype: bfloat16 where the output projection computes in it (the
        bits :meth:`output`'s cast would give), else float32."""
        return torch.bfloat16 if compute_dtype(self.o_b_proj) == torch.bfloat16 else torch.float32

    def _window(self, e: torch.Tensor, meta: AttentionMetadata, cache: LayerCache) -> torch.Tensor:
        """Writes the tokens' entries into the ring; returns the cache the window candidates
        address (the ring, or the staging copy taken before the writes)."""
        window = cache.window
        st = meta.staging
        if st is not None:
            ops.copy_rows(st.cache, st.prior_dst, window, st.prior_src)
            write_rows(st.cache, st.new_dst, e)
            window = st.cache
        write_rows(cache.window, meta.window_slots, e)
        return window

    def _index_keys(self, side: list[torch.Tensor], meta: AttentionMetadata, cache: LayerCache) -> None:
        """CSA: writes the chunk's indexer keys; ``side`` the indexer compressor's projections of
        the layer's input (``W_kv``, ``W_gate``)."""
        indexer = self.compressor.indexer
        keys = compress_tokens(indexer, side[0], side[1], cache.index_state, self.rotary, meta)
        fmt = cache.key_format
        if fmt is not None:
            keys = ops.hadamard128(keys)
        write_rows(cache.keys, meta.slots["csa"], keys, fmt)

    def _index_queries(self, cq: torch.Tensor, meta: AttentionMetadata, cache: LayerCache) -> torch.Tensor:
        """CSA: the indexer's queries from ``cQ``, rotated, and in the keys' format where the
        cache holds them so (the keys' Hadamard rotation and FP4 or FP8 round trip)."""
        qi = self.rotary(self.compressor.indexer.queries(cq), meta.positions)
        fmt = cache.key_format
        if fmt is not None:
            qi = ops.index_key_round_trip(ops.hadamard128(qi.reshape(-1, INDEX_DIM)), fmt).view_as(qi)
        return qi

    def _select(self, weights: torch.Tensor, qi: torch.Tensor, meta: AttentionMetadata, cache: LayerCache) -> torch.Tensor:
        """CSA: the top-k CSA rows of each query (after :meth:`_index_keys`) for the indexer's
        queries ``qi`` (:meth:`_index_queries`) and head weights ``weights`` (float32,
        :meth:`Indexer.weigh` of the layer's input's projection)."""
        indexer = self.compressor.indexer
        return ops.indexer_topk(qi, weights, cache.keys, meta.tables["csa"], meta.token_seq,
                                meta.visible[indexer.ratio], indexer.topk, physical=True, tie_break=indexer.tie_break)
