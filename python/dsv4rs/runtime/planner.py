"""Planning a step once for every layer (the plan/run split of serving kernels): the allocator's
append, then on the host what only the batch decides (positions, rows to write, window
candidates and staging), uploaded once, and the compressed-row candidates built on the device.
The layers only run kernels on what this returns
(:class:`~dsv4rs.model.layers.attention.AttentionMetadata`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dsv4rs import ops
from dsv4rs.cache import AppendResult, KVCacheManager
from dsv4rs.model.config import CSA, HCA, V4Config
from dsv4rs.model.layers.attention import AttentionMetadata, Rows, Staging
from dsv4rs.runtime.kv_cache import KVCache


@dataclass
class Step:
    """One planned step: what the layers read, and what the allocator asks of the cache first."""

    seq_ids: list[int]
    meta: AttentionMetadata
    ids: torch.Tensor
    appended: AppendResult


class StepPlanner:
    """Plans steps of one model over one allocator and cache."""

    def __init__(self, cfg: V4Config, manager: KVCacheManager, cache: KVCache) -> None:
        self.cfg, self.manager, self.cache, self.device = cfg, manager, cache, cache.device
        self.ratios = {t: r for t, r in ((CSA, cfg.compress_rates[0]), (HCA, cfg.compress_rates[1]))
                       if t in cfg.layer_types}

    def plan(self, seq_ids: Sequence[int], ids: Sequence[torch.Tensor], origins: Sequence[int]) -> Step:
        """Appends ``ids[i]`` to sequence ``seq_ids[i]`` (all or nothing: an allocator error
        leaves every sequence as it was) and plans the step. ``origins[i]`` is the first position
        the sequence holds in its window ring (a prefix hit starts past 0)."""
        m, dev, w, page = self.manager, self.device, self.cfg.sliding_window, ops.PAGE_ROWS
        starts = [m.length(s) for s in seq_ids]
        lens = [t.numel() for t in ids]
        appended = m.append(seq_ids, [t.tolist() for t in ids])
        tables = {f: m.page_tables(seq_ids, f) for f in ("window", "csa", "hca")}
        pos = torch.cat([torch.arange(a, a + n) for a, n in zip(starts, lens)])
        tok_seq = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])
        ring = tables["window"].long()

        def ring_row(b: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
            r = p % w
            return ring[b, r // page] * page + r % page

        # Window candidates of every query: positions p - w + 1 .. p not before the origin.
        cand_pos = pos[:, None] - w + 1 + torch.arange(w)
        valid = cand_pos >= torch.tensor(origins)[tok_seq][:, None]
        staging = None
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
            staging = Staging(self.cache.new_staging(base), torch.cat(prior_src).to(dev), torch.cat(prior_dst).to(dev),
                              torch.cat(new_dst).to(dev))
        pos, tok_seq = pos.to(dev), tok_seq.to(dev)
        visible = {r: (pos + 1) // r for r in self.ratios.values()}
        meta = AttentionMetadata(
            positions=pos, token_seq=tok_seq, starts=starts, lens=lens,
            state_slots=appended.slots["state"].tolist(),
            window_writes=self._rows(appended.slots["window"]), window_candidates=cand.to(dev), staging=staging,
            writes={f: self._rows(appended.slots[f]) for f in ("csa", "hca")},
            tables={"csa": self._table(tables["csa"])}, visible=visible,
            hca_candidates=self._hca_candidates(tables["hca"], tok_seq, visible, max(a + n for a, n in zip(starts, lens))),
        )
        return Step(list(seq_ids), meta, torch.cat(ids).to(dev), appended)

    def _rows(self, slots: torch.Tensor) -> Rows:
        """Host slots (``-1``: a row not to write) as device :class:`Rows`."""
        keep = slots >= 0
        if bool(keep.all()):
            return Rows(None, slots.to(self.device))
        return Rows(keep.nonzero().flatten().to(self.device), slots[keep].to(self.device))

    def _table(self, table: torch.Tensor) -> torch.Tensor:
        """A page table on the device, at least one page wide (kernels take ``[B, >= 1]``)."""
        if table.shape[1] == 0:
            table = torch.zeros(table.shape[0], 1, dtype=table.dtype)
        return table.to(self.device)

    def _hca_candidates(self, table: torch.Tensor, tok_seq: torch.Tensor, visible: dict[int, torch.Tensor],
                        end: int) -> torch.Tensor | None:
        """Every visible HCA row of each query (``-1`` past the visible ones)."""
        if HCA not in self.ratios:
            return None
        ratio, page = self.ratios[HCA], ops.PAGE_ROWS
        table = self._table(table).long()
        k = torch.arange(max(1, end // ratio), device=self.device)
        rows = table[tok_seq[:, None], (k // page).clamp(max=table.shape[1] - 1)] * page + k % page
        return torch.where(k < visible[ratio][:, None], rows, -1)
