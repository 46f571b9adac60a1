"""DeepSeek-V4's forward pass over the paged KV cache, through the dsv4rs ops (CPU or CUDA).

An :class:`Engine` owns a :class:`dsv4rs.cache.KVCacheManager` and the device tensors it
describes. Each :meth:`Engine.step` feeds a batch of sequences one chunk of tokens each (a whole
prompt, a piece of one, or one decode token; lengths may differ) and returns logits. Per layer:

1. the mHC collapse and the query, KV-entry and compressor projections (:mod:`.modules`);
2. the compressors (:func:`dsv4rs.ops.compress`) advance each sequence's state slot and write the
   entries the chunk completes into the CSA/HCA rows (and the indexer keys);
3. the candidates: the 128-token window (for a chunk longer than one token, from a staging
   copy holding the ring rows before the chunk and the chunk's own entries, since the chunk's
   writes overwrite the ring), plus the indexer's top-k CSA rows
   (:func:`dsv4rs.ops.indexer_topk`) or every visible HCA row;
4. :func:`dsv4rs.ops.sparse_attention` with the sink and the fused de-rotation, then the
   grouped output projection; the chunk's entries go into the window ring;
5. the MoE sublayer.

``quant=True`` stores what production stores (584-byte FP8 entries, FP4 indexer keys with the
Hadamard rotation, FP4 indexer queries); ``quant=False`` stores float32 rows on the CPU and
bfloat16 rows on the GPU (whose kernels read those), to match an unquantized reference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dsv4rs import ops, reference
from dsv4rs.cache import CacheConfig, KVCacheManager, PrefixHit
from dsv4rs.model.config import CSA, HCA, INDEX_DIM, SWA, V4Config
from dsv4rs.model.modules import DeepseekV4, DecoderLayer, HyperConnection

PAGE = ops.PAGE_ROWS
MAIN_DATA_BYTES = 576
"""Data bytes of a 584-byte entry (448 FP8 + 64 BF16); its 8 scale bytes follow a page's data."""


def _split_rows(cache: torch.Tensor, data_bytes: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The data and scale parts of a paged uint8 cache as ``[P, 64, bytes]`` views; ``None``
    for a plain ``[P, 64, D]`` row cache."""
    if cache.dtype != torch.uint8:
        return None
    p = cache.shape[0]
    return cache[:, : PAGE * data_bytes].view(p, PAGE, data_bytes), cache[:, PAGE * data_bytes :].view(p, PAGE, -1)


def copy_rows(dst: torch.Tensor, dst_rows: torch.Tensor, src: torch.Tensor, src_rows: torch.Tensor, data_bytes: int) -> None:
    """Copies cache rows byte for byte (``row = page * 64 + offset``), plain or paged uint8."""
    if dst_rows.numel() == 0:
        return
    s, d = _split_rows(src, data_bytes), _split_rows(dst, data_bytes)
    if s is None or d is None:
        dst.view(-1, dst.shape[-1])[dst_rows] = src.view(-1, src.shape[-1])[src_rows]
        return
    for sp, dp in zip(s, d):
        dp[dst_rows // PAGE, dst_rows % PAGE] = sp[src_rows // PAGE, src_rows % PAGE]


def rope(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE on the last ``2 * len(inv_freq)`` dims, float32 out: :func:`dsv4rs.ops.rope` on the CPU;
    on a GPU the same math in torch (angles in float64, as the op computes them)."""
    if x.device.type == "cpu":
        return ops.rope(x, pos, inv_freq)
    angle = pos.double()[:, None] * inv_freq.double()
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (inv_freq.shape[0],)
    cos, sin = angle.cos().float().view(shape), angle.sin().float().view(shape)
    x = x.float()
    r = 2 * inv_freq.shape[0]
    pairs = x[..., x.shape[-1] - r :].unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    return torch.cat((x[..., : x.shape[-1] - r], rotated), dim=-1)


@dataclass
class _Batch:
    """Per-step metadata, on the engine's device unless noted."""

    seq_ids: list[int]
    starts: list[int]  # first position of each chunk (host)
    lens: list[int]  # chunk lengths (host)
    origins: list[int]  # first position each sequence holds in its window ring (host)
    ids: torch.Tensor  # [T] token ids
    pos: torch.Tensor  # [T] int64 positions
    tok_seq: torch.Tensor  # [T] batch row of each token
    slots: dict[str, tuple[torch.Tensor | None, torch.Tensor]]  # per family: (kept rows or None for all, slots >= 0)
    state_slots: list[int]  # host
    max_pos: int  # host
    staging_rows: int  # rows of the window staging copy (0 when decode reads the ring)
    tables: dict[str, torch.Tensor]  # int32 page tables
    window_src: dict[str, torch.Tensor]  # staging rows: "prior_src", "prior_dst", "new_dst", "cand"


class Engine:
    """Runs a :class:`DeepseekV4` over a paged KV cache.

    Args:
        model: the weights (on the device to run on; float32 or bfloat16).
        max_sequences: sequences the cache holds at once (forks count).
        max_len: the longest sequence, in tokens.
        quant: production storage (FP8 entries, FP4 indexer keys and queries) or plain rows.
        index_format: ``"fp4"`` or ``"fp8"`` indexer keys when ``quant``.
    """

    def __init__(self, model: DeepseekV4, max_sequences: int = 4, max_len: int = 4096, quant: bool = False,
                 index_format: str = "fp4") -> None:
        if max_sequences < 1 or max_len < 1:
            raise ValueError(f"max_sequences, max_len: must be >= 1, got {max_sequences}, {max_len}")
        if index_format not in ("fp4", "fp8"):
            raise ValueError(f'index_format: expected "fp4" or "fp8", got {index_format!r}')
        self.model, self.cfg, self.quant, self.index_format = model, model.config, quant, index_format
        cfg = self.cfg
        self.device = model.lm_head.weight.device
        self.row_dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
        self.cache_config = CacheConfig(cfg.compress_ratios, window=cfg.sliding_window,
                                        index_format=index_format if quant else "bf16",
                                        main_format="fp8" if quant else "bf16")
        ratios = cfg.compress_ratios
        per_seq = {
            "window": -(-cfg.sliding_window // PAGE),
            "csa": -(-(max_len // cfg.compress_rates[0]) // PAGE) if CSA in cfg.layer_types else 0,
            "hca": -(-(max_len // cfg.compress_rates[1]) // PAGE) if HCA in cfg.layer_types else 0,
            "state": 1 if any(ratios) else 0,
        }
        pages = {f: 1 + max_sequences * n for f, n in per_seq.items()}
        self.manager = KVCacheManager(self.cache_config, pages)
        self.max_len = max_len

        # Layer index inside each family.
        self.family_index: list[int] = []
        counts = {SWA: 0, CSA: 0, HCA: 0}
        for t in cfg.layer_types:
            self.family_index.append(counts[t])
            counts[t] += 1
        n_csa, n_hca, n_win = counts[CSA], counts[HCA], len(ratios)
        dev = self.device
        self.window = self._main_cache(n_win, pages["window"])
        self.csa = self._main_cache(n_csa, pages["csa"])
        self.csa_keys = self._key_cache(n_csa, pages["csa"])
        self.hca = self._main_cache(n_hca, pages["hca"])
        r_csa, r_hca, d = cfg.compress_rates[0], cfg.compress_rates[1], cfg.head_dim
        f32 = torch.float32
        self.csa_state = torch.zeros(n_csa, pages["state"], 2, 2 * r_csa, 2 * d, dtype=f32, device=dev)
        self.index_state = torch.zeros(n_csa, pages["state"], 2, 2 * r_csa, 2 * INDEX_DIM, dtype=f32, device=dev)
        self.hca_state = torch.zeros(n_hca, pages["state"], 2, r_hca, d, dtype=f32, device=dev)
        self.inv_freq = {c: cfg.inv_freq(c).to(dev) for c in (False, True)}
        self._origin: dict[int, int] = {}
        self._fresh: set[int] = set()
        self._mtp_pos: dict[int, int] = {}
        self._last: tuple[_Batch, torch.Tensor] | None = None

    # -- cache tensors ---------------------------------------------------------------------------

    def _main_cache(self, layers: int, pages: int) -> torch.Tensor:
        if self.quant:
            return torch.zeros(layers, pages, PAGE * ops.MAIN_ENTRY_BYTES, dtype=torch.uint8, device=self.device)
        return torch.zeros(layers, pages, PAGE, self.cfg.head_dim, dtype=self.row_dtype, device=self.device)

    def _key_cache(self, layers: int, pages: int) -> torch.Tensor:
        if self.quant:
            return torch.zeros(layers, pages, PAGE * ops.INDEX_KEY_BYTES[self.index_format], dtype=torch.uint8,
                               device=self.device)
        return torch.zeros(layers, pages, PAGE, INDEX_DIM, dtype=self.row_dtype, device=self.device)

    def _keep(self, slots: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Host slots -> (device indices of the rows to write, or None for all; device slots >= 0)."""
        keep = slots >= 0
        if bool(keep.all()):
            return None, slots.to(self.device)
        return keep.nonzero().flatten().to(self.device), slots[keep].to(self.device)

    def _write(self, cache: torch.Tensor, where: tuple[torch.Tensor | None, torch.Tensor], rows: torch.Tensor,
               keys: bool = False) -> None:
        """Writes KV entries (or, with ``keys``, indexer keys) at the slots of ``where``
        (:meth:`_keep`): quantized into the paged layout, or as plain rows."""
        keep, slots = where
        rows = rows if keep is None else rows[keep]
        if slots.numel() == 0:
            return
        if not self.quant:
            cache.view(-1, cache.shape[-1])[slots] = rows.to(cache.dtype)
        elif keys:
            ops.index_key_write(cache, slots, rows.float(), self.index_format)
        else:
            ops.kv_write(cache, slots, rows.float())

    # -- sequences -------------------------------------------------------------------------------

    def add_sequence(self, prompt: Sequence[int] | torch.Tensor = ()) -> tuple[int, PrefixHit]:
        """A new sequence. With a ``prompt``, it reuses the compressed rows of the longest cached
        prefix: feed ``prompt[hit.recompute_from:]`` next."""
        seq, hit = self.manager.add_sequence(self._check_ids("prompt", prompt).tolist())
        self._origin[seq] = self._mtp_pos[seq] = hit.recompute_from
        self._fresh.add(seq)
        return seq, hit

    def fork(self, seq_id: int) -> int:
        """A copy of ``seq_id`` sharing its pages (copy on write)."""
        child = self.manager.fork(seq_id)
        self._origin[child] = self._origin[seq_id]
        if seq_id in self._mtp_pos:
            self._mtp_pos[child] = self._mtp_pos[seq_id]
        if seq_id in self._fresh:
            self._fresh.add(child)
        return child

    def release(self, seq_id: int) -> None:
        self.manager.release(seq_id)
        self._origin.pop(seq_id, None)
        self._mtp_pos.pop(seq_id, None)
        self._fresh.discard(seq_id)

    def _check_ids(self, name: str, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(ids if len(ids) else [], dtype=torch.int64).flatten()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.cfg.vocab_size):
            raise ValueError(f"{name}: token ids must lie in [0, {self.cfg.vocab_size}), got "
                             f"{int(t.min())}..{int(t.max())}")
        return t

    # -- the forward pass ------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, seq_ids: Sequence[int], chunks: Sequence[Sequence[int] | torch.Tensor],
             all_logits: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Feeds ``chunks[i]`` to sequence ``seq_ids[i]`` and returns float32 logits: of the last
        token of each chunk ``[B, vocab]``, or with ``all_logits`` one ``[len, vocab]`` per chunk."""
        if len(seq_ids) != len(chunks):
            raise ValueError(f"seq_ids, chunks: {len(seq_ids)} sequences but {len(chunks)} chunks")
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError("seq_ids: a sequence appears twice in one step")
        ids = [self._check_ids(f"chunks[{i}]", c) for i, c in enumerate(chunks)]
        if any(t.numel() == 0 for t in ids):
            raise ValueError("chunks: every chunk needs at least one token")
        for s, t in zip(seq_ids, ids):
            if s not in self._origin:
                raise ValueError(f"seq_ids: unknown sequence {s}")
            if self.manager.length(s) + t.numel() > self.max_len:
                raise ValueError(f"chunks: sequence {s} would exceed max_len = {self.max_len}")
        batch = self._prepare(list(seq_ids), ids)
        x = self.model.embed(batch.ids)
        for i, layer in enumerate(self.model.model.layers):
            x = self._attention_block(i, layer, x, batch)
            x = layer.ffn(x, batch.ids)
        self._last = (batch, x) if len(self.model.mtp) else None
        if not all_logits:
            ends = torch.tensor(batch.lens, device=self.device).cumsum(0) - 1
            return self.model.head(x[ends]).float()
        return list(self.model.head(x).float().split(batch.lens))

    @torch.no_grad()
    def draft(self, next_ids: Sequence[int]) -> torch.Tensor:
        """The MTP block's logits ``[B, vocab]`` for the token after ``next_ids`` (SPEC.md section 8).

        Call it after every :meth:`step` of the sequences it drafts for, with the token that
        follows each chunk (e.g. the one sampled from the step's logits): the block runs over the
        whole chunk (position ``t`` sees the embedding of token ``t + 1``) and keeps its own
        128-token window, which must not miss a step.
        """
        if not len(self.model.mtp):
            raise ValueError("draft: the model has no MTP block")
        if self._last is None:
            raise ValueError("draft: call step first")
        b, x = self._last
        nxt = self._check_ids("next_ids", next_ids)
        if nxt.numel() != len(b.seq_ids):
            raise ValueError(f"next_ids: expected {len(b.seq_ids)} ids (one per sequence of the last step), got {nxt.numel()}")
        for s, start in zip(b.seq_ids, b.starts):
            if self._mtp_pos.get(s) != start:
                raise ValueError(f"draft: the MTP window of sequence {s} missed tokens "
                                 f"({self._mtp_pos.get(s)} fed, the last step began at {start})")
        self._last = None
        ids = b.ids.clone()
        ends = torch.tensor(b.lens, device=self.device).cumsum(0) - 1
        ids[:-1] = b.ids[1:]
        ids[ends] = nxt.to(self.device)
        mtp = self.model.mtp[0]
        h = mtp.inputs(x, self.model.model.embed_tokens(ids))
        post, comb, y = mtp.attn_hc(h)
        h = HyperConnection.combine(h, self._attention(self.cfg.num_hidden_layers, mtp, mtp.input_layernorm(y), b),
                                    post, comb)
        h = mtp.ffn(h, ids)
        for s, start, n in zip(b.seq_ids, b.starts, b.lens):
            self._mtp_pos[s] = start + n
        return self.model.head(h[ends], mtp.hc_head, mtp.norm).float()

    def _prepare(self, seq_ids: list[int], ids: list[torch.Tensor]) -> _Batch:
        m, dev, w = self.manager, self.device, self.cfg.sliding_window
        starts = [m.length(s) for s in seq_ids]
        lens = [t.numel() for t in ids]
        res = m.append(seq_ids, [t.tolist() for t in ids])
        self._apply_copies(res.copies)
        tables = {}
        for f in ("window", "csa", "hca"):
            t = m.page_tables(seq_ids, f)
            tables[f] = (t if t.shape[1] else m.page_tables(seq_ids, f, width=1)).to(dev)
        for i, s in enumerate(seq_ids):
            if s in self._fresh:
                slot = int(res.slots["state"][i])
                if slot >= 0:
                    for state in (self.csa_state, self.index_state, self.hca_state):
                        state[:, slot, 0] = 0
                        state[:, slot, 1] = -math.inf
                self._fresh.discard(s)
        origins = [self._origin[s] for s in seq_ids]
        pos = torch.cat([torch.arange(a, a + n) for a, n in zip(starts, lens)])
        tok_seq = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])
        ring = tables["window"].cpu().long()

        def ring_row(b: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
            r = p % w
            return ring[b, r // PAGE] * PAGE + r % PAGE

        # Window candidates of every query: positions p - w + 1 .. p not before the origin.
        cand_pos = pos[:, None] - w + 1 + torch.arange(w)
        origin_t = torch.tensor(origins)[tok_seq]
        valid = cand_pos >= origin_t[:, None]
        window_src: dict[str, torch.Tensor] = {}
        staging_rows = 0
        if max(lens) == 1:  # decode: the new row goes into the ring first, then the ring is read
            cand = torch.where(valid, ring_row(tok_seq[:, None].expand_as(cand_pos), cand_pos.clamp(min=0)), -1)
        else:  # staging rows per sequence: the ring's rows before the chunk, then the chunk's
            prior_src, prior_dst, new_dst, base = [], [], [], 0
            cand = torch.full_like(cand_pos, -1)
            for b, (a, n, o) in enumerate(zip(starts, lens, origins)):
                first = max(o, a - w + 1)
                prior = torch.arange(first, a)
                prior_src.append(ring_row(torch.full_like(prior, b), prior))
                prior_dst.append(base + torch.arange(a - first))
                new_dst.append(base + (a - first) + torch.arange(n))
                q = tok_seq == b
                cand[q] = torch.where(valid[q], base + cand_pos[q] - first, -1)
                base += a - first + n
            window_src = {"prior_src": torch.cat(prior_src), "prior_dst": torch.cat(prior_dst),
                          "new_dst": torch.cat(new_dst)}
            staging_rows = base
        window_src["cand"] = cand
        slots = {f: self._keep(res.slots[f]) for f in ("window", "csa", "hca")}
        return _Batch(seq_ids, starts, lens, origins, torch.cat(ids).to(dev), pos.to(dev), tok_seq.to(dev), slots,
                      res.slots["state"].tolist(), int(pos.max()), staging_rows, tables,
                      {k: v.to(dev) for k, v in window_src.items()})

    def _apply_copies(self, copies: dict[str, torch.Tensor]) -> None:
        groups = {"window": (self.window,), "csa": (self.csa, self.csa_keys), "hca": (self.hca,),
                  "state": (self.csa_state, self.index_state, self.hca_state)}
        for family, pairs in copies.items():
            if pairs.numel():
                src, dst = pairs[:, 0].to(self.device), pairs[:, 1].to(self.device)
                for t in groups[family]:
                    t[:, dst] = t[:, src]

    def _attention_block(self, i: int, layer: DecoderLayer, x: torch.Tensor, b: _Batch) -> torch.Tensor:
        post, comb, y = layer.attn_hc(x)
        out = self._attention(i, layer, layer.input_layernorm(y), b)
        return HyperConnection.combine(x, out, post, comb)

    def _attention(self, i: int, layer: DecoderLayer, x: torch.Tensor, b: _Batch) -> torch.Tensor:
        attn, cfg = layer.self_attn, self.cfg
        kind = attn.layer_type
        inv = self.inv_freq[kind != SWA]
        cq, q, e = attn.projections(x)
        q = rope(q, b.pos, inv)
        e = rope(e, b.pos, inv)
        ring = self.window[i]

        # Window source: the ring itself (decode) or a staging copy (chunks), taken before the
        # chunk's rows overwrite the ring.
        win_cache = ring
        if "new_dst" in b.window_src:
            win_cache = torch.zeros(-(-b.staging_rows // PAGE), *ring.shape[1:], dtype=ring.dtype, device=self.device)
            copy_rows(win_cache, b.window_src["prior_dst"], ring, b.window_src["prior_src"], MAIN_DATA_BYTES)
            self._write(win_cache, (None, b.window_src["new_dst"]), e)
        self._write(ring, b.slots["window"], e)
        win_idx = b.window_src["cand"]

        derotate = (b.pos, inv)
        if kind == SWA:
            o, _ = ops.sparse_attention(q, win_cache, win_idx, attn.sinks.float(), derotate=derotate)
            return attn.output(o)

        comp = attn.compressor
        j = self.family_index[i]
        main = self.csa[j] if kind == CSA else self.hca[j]
        family = "csa" if kind == CSA else "hca"
        state = self.csa_state[j] if kind == CSA else self.hca_state[j]
        entries = self._compress(comp, x, state, inv, b)
        self._write(main, b.slots[family], entries)

        visible = (b.pos + 1) // comp.ratio
        if kind == CSA:
            keys = self._compress(comp.indexer, x, self.index_state[j], inv, b)
            if self.quant:
                keys = ops.hadamard128(keys)
            self._write(self.csa_keys[j], b.slots["csa"], keys, keys=True)
            qi = rope(comp.indexer.queries(cq), b.pos, inv)
            if self.quant:  # queries take the keys' rotation and FP4 (or FP8) round trip
                flat = ops.hadamard128(qi.reshape(-1, INDEX_DIM))
                qi = ops.index_key_read(ops.quantize_index_keys(flat, self.index_format),
                                        torch.arange(flat.shape[0], device=self.device), self.index_format).view_as(qi)
            cand = ops.indexer_topk(qi, comp.indexer.head_weights(x).float(), self.csa_keys[j], b.tables["csa"],
                                    b.tok_seq, visible, cfg.index_topk, physical=True)
            lengths = None
        else:
            width = max(1, (b.max_pos + 1) // comp.ratio)
            k = torch.arange(width, device=self.device)
            table = b.tables["hca"].long()
            rows = table[b.tok_seq[:, None], (k // PAGE).clamp(max=table.shape[1] - 1)] * PAGE + k % PAGE
            cand = torch.where(k < visible[:, None], rows, -1)
            lengths = None
        o, _ = ops.sparse_attention(q, main, cand, attn.sinks.float(), lengths=lengths, extra_cache=win_cache,
                                    extra_indices=win_idx, derotate=derotate)
        return attn.output(o)

    def _compress(self, comp, x: torch.Tensor, state: torch.Tensor, inv: torch.Tensor, b: _Batch) -> torch.Tensor:
        """Feeds each sequence's chunk to its compressor state; the completed entries, in batch order."""
        kv, score = comp.project(x)
        kv, score = kv.float(), score.float()
        ape, norm = comp.position_bias.float(), comp.kv_norm.weight.float()
        out, at = [], 0
        for n, (start, length) in enumerate(zip(b.starts, b.lens)):
            slot = b.state_slots[n]
            out.append(ops.compress(kv[at : at + length], score[at : at + length], ape, norm, inv, state[slot, 0],
                                    state[slot, 1], start, comp.ratio, self.cfg.rms_norm_eps))
            at += length
        return torch.cat(out)
