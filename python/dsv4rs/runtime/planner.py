"""Planning a step once for every layer (the plan/run split of serving kernels).

The host does only what the allocator decides: :meth:`StepPlanner.append` appends the tokens to
the :class:`~dsv4rs.cache.KVCacheManager` and returns the step's integers (:class:`StepInputs`:
token ids, positions, per-token rows to write, per-sequence state slots, page tables), O(tokens).
Everything the layers read is then derived from those on the device (:func:`metadata`): window
candidates, visible counts, compressed candidates. A decode step therefore moves a few integers
per sequence to the GPU and synchronizes with nothing, and the same derivation runs inside a
captured CUDA graph. A step of longer chunks also stages each sequence's window rows before the
chunk (:func:`staging`), planned on the host.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields

import torch

from dsv4rs import ops
from dsv4rs.cache import KVCacheManager
from dsv4rs.model.config import CSA, HCA, V4Config
from dsv4rs.model.layers.attention import AttentionMetadata, Staging

FAMILIES = ("window", "csa", "hca")
"""The row families a step writes (compressor state slots travel apart)."""


@dataclass
class StepInputs:
    """A step's integers: what crosses from the host to the device.

    Attributes:
        ids, positions: ``int64 [T]`` token ids and positions.
        token_seq: ``int64 [T]`` batch row of each token.
        starts, origins, state_slots: ``int64 [B]`` first position of each chunk, first position
            the sequence holds in its window ring, compressor state slot (``-1``: none, or a
            padding row).
        cu_tokens: ``int64 [B + 1]`` token offsets of the sequences.
        window_slots, csa_slots, hca_slots: ``int64 [T]`` the row each token writes in the
            window ring, and the compressed rows of the entries it completes (``-1``: none).
        window_table, csa_table, hca_table: ``int32 [B, pages]`` page tables.
    """

    ids: torch.Tensor
    positions: torch.Tensor
    token_seq: torch.Tensor
    starts: torch.Tensor
    origins: torch.Tensor
    state_slots: torch.Tensor
    cu_tokens: torch.Tensor
    window_slots: torch.Tensor
    csa_slots: torch.Tensor
    hca_slots: torch.Tensor
    window_table: torch.Tensor
    csa_table: torch.Tensor
    hca_table: torch.Tensor

    def to(self, device: torch.device) -> StepInputs:
        """The step's integers on ``device`` (:func:`to_device`: one transfer on a GPU)."""
        names = [f.name for f in fields(self)]
        return StepInputs(**dict(zip(names, to_device([getattr(self, n) for n in names], device))))

    @property
    def lens(self) -> torch.Tensor:
        return self.cu_tokens.diff()


class StepPlanner:
    """Plans steps of one model over one allocator."""

    def __init__(self, cfg: V4Config, manager: KVCacheManager) -> None:
        self.cfg, self.manager = cfg, manager
        self.shortcut = True  # decode steps computed from Python ints (tests compare both ways)
        self.ratios = {t: r for t, r in ((CSA, cfg.compress_rates[0]), (HCA, cfg.compress_rates[1]))
                       if t in cfg.layer_types}

    def append(self, seq_ids: Sequence[int], ids: Sequence[torch.Tensor] | None, origins: Sequence[int]
               ) -> tuple[StepInputs, dict[str, torch.Tensor]]:
        """Appends ``ids[i]`` to sequence ``seq_ids[i]`` (all or nothing: an allocator error
        leaves every sequence as it was) and returns the step's integers, on the host, and the
        page copies (copy on write) to make before the step writes anything.
        ``origins[i]`` is the first position the sequence holds in its window ring (a prefix hit
        starts past 0). ``ids=None``: one token a sequence whose id is not known yet (sampled on
        the device): appended by count (:meth:`KVCacheManager.append_unresolved`), the returned
        ``ids`` zeros for the caller to replace on the device."""
        m = self.manager
        start_list = [m.length(s) for s in seq_ids]
        if ids is None:
            len_list = [1] * len(seq_ids)
            appended = m.append_unresolved(seq_ids, len_list)
            flat_ids = torch.zeros(len(seq_ids), dtype=torch.int64)
        else:
            len_list = [t.numel() for t in ids]
            appended = m.append(seq_ids, [t.tolist() for t in ids])
            flat_ids = torch.cat(ids)
        starts = torch.tensor(start_list, dtype=torch.int64)
        if self.shortcut and all(n == 1 for n in len_list):
            # A decode step (one token a sequence): the same values, from Python ints.
            b = len(seq_ids)
            cu, token_seq, positions = torch.arange(b + 1), torch.arange(b), starts.clone()
            done = {r: [i for i, p in enumerate(start_list) if (p + 1) % r == 0] for r in set(self.ratios.values())}
        else:
            lens = torch.tensor(len_list, dtype=torch.int64)
            cu = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])
            token_seq = torch.repeat_interleave(torch.arange(len(seq_ids)), lens)
            positions = starts[token_seq] + torch.arange(int(cu[-1])) - cu[token_seq]
            done = {r: (positions + 1) % r == 0 for r in set(self.ratios.values())}
        slots = {"window": appended.slots["window"]}
        for t, family in ((CSA, "csa"), (HCA, "hca")):
            # The allocator lists the rows of the entries the step completes, in batch order:
            # the k-th completing token writes the k-th row.
            slots[family] = torch.full_like(positions, -1)
            if t in self.ratios:
                slots[family][done[self.ratios[t]]] = appended.slots[family]
        return StepInputs(
            ids=flat_ids, positions=positions, token_seq=token_seq, starts=starts,
            origins=torch.tensor(origins, dtype=torch.int64), state_slots=appended.slots["state"], cu_tokens=cu,
            window_slots=slots["window"], csa_slots=slots["csa"], hca_slots=slots["hca"],
            **{f"{f}_table": m.page_tables(seq_ids, f, width=None) for f in FAMILIES},
        ), appended.copies

    def staging(self, inputs: StepInputs, scratch: Callable[[int], torch.Tensor]) -> tuple[Staging, torch.Tensor]:
        """For a step with chunks longer than one token: each sequence's window rows before its
        chunk, copied into a scratch cache (``scratch(rows)``, on the device) ahead of the
        chunk's own rows, since the chunk's writes overwrite the ring; and every query's window
        candidates as rows of that copy. Host tensors in, device tensors out."""
        w, page = self.cfg.sliding_window, ops.PAGE_ROWS
        ring = inputs.window_table.long()
        pos, tok_seq = inputs.positions, inputs.token_seq
        cand_pos = pos[:, None] - w + 1 + torch.arange(w)
        valid = cand_pos >= inputs.origins[tok_seq][:, None]
        prior_src, prior_dst, new_dst, base = [], [], [], 0
        cand = torch.full_like(cand_pos, -1)
        for b, (a, n, o) in enumerate(zip(inputs.starts.tolist(), inputs.lens.tolist(), inputs.origins.tolist())):
            first = max(o, a - w + 1)
            prior = torch.arange(first, a)
            r = prior % w
            prior_src.append(ring[b, r // page] * page + r % page)
            prior_dst.append(base + torch.arange(a - first))
            new_dst.append(base + (a - first) + torch.arange(n))
            q = tok_seq == b
            cand[q] = torch.where(valid[q], base + cand_pos[q] - first, -1)
            base += a - first + n
        cache = scratch(base)
        src, dst, new, cand = to_device([torch.cat(prior_src), torch.cat(prior_dst), torch.cat(new_dst), cand],
                                        cache.device)
        return Staging(cache, src, dst, new), cand


def to_device(tensors: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Host tensors on ``device``. On a GPU one pinned buffer holds them all (each at a 16-byte
    aligned offset) and crosses in one asynchronous copy, and the results are views of its device
    copy: a step's dozen small index tensors take one transfer instead of one pageable copy each
    (which also waits on the host). Elsewhere each tensor's own ``to``."""
    device = torch.device(device)
    if device.type != "cuda":
        return [t.to(device) for t in tensors]
    host, spans = packed(tensors, pin=True)
    return unpacked(host.to(device, non_blocking=True), tensors, spans)


def packed(tensors: Sequence[torch.Tensor], pin: bool = False) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The bytes of ``tensors`` in one uint8 buffer (pinned if ``pin``), each at a 16-byte aligned
    offset, and the ``(offset, bytes)`` of each."""
    spans, at = [], 0
    for t in tensors:
        n = t.numel() * t.element_size()
        spans.append((at, n))
        at += -(-n // 16) * 16
    buf = torch.empty(max(at, 16), dtype=torch.uint8, pin_memory=pin)
    for t, (off, n) in zip(tensors, spans):
        buf[off : off + n].view(t.dtype).view(t.shape).copy_(t)
    return buf, spans


def unpacked(buf: torch.Tensor, like: Sequence[torch.Tensor], spans: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """Views of ``buf`` (what :func:`packed` filled, or a copy of it) shaped as ``like``."""
    return [buf[off : off + n].view(t.dtype).view(t.shape) for t, (off, n) in zip(like, spans)]


def metadata(cfg: V4Config, x: StepInputs, hca_width: int, staging: tuple[Staging, torch.Tensor] | None = None
             ) -> AttentionMetadata:
    """The layers' metadata from a step's integers on the device: the candidate rows in one
    :func:`dsv4rs.ops.step_rows`, the visible counts in tensor ops (no host synchronization: it
    runs eagerly and inside a CUDA graph alike). ``hca_width`` is the width
    of the HCA candidate lists (at least the most entries a query of the step sees). Without
    ``staging``, every chunk is one token and the window is read from the ring after its write."""
    pos, tok_seq = x.positions, x.token_seq
    ratios = {t: r for t, r in ((CSA, cfg.compress_rates[0]), (HCA, cfg.compress_rates[1])) if t in cfg.layer_types}
    visible = {r: (pos + 1) // r for r in ratios.values()}
    # The window's rows in the ring (without staging) and the HCA rows: one op.
    rows, hca = ops.step_rows(pos, tok_seq, x.origins, x.window_table if staging is None else None, cfg.sliding_window,
                              x.hca_table if HCA in ratios else None, ratios.get(HCA, 1), hca_width)
    stage, candidates = (None, rows) if staging is None else staging
    return AttentionMetadata(
        positions=pos, token_seq=tok_seq, starts=x.starts, cu_tokens=x.cu_tokens, state_slots=x.state_slots,
        window_slots=x.window_slots, window_candidates=candidates, staging=stage,
        slots={"csa": x.csa_slots, "hca": x.hca_slots}, tables={"csa": x.csa_table}, visible=visible,
        hca_candidates=hca,
    )


def padded_table(table: torch.Tensor, width: int) -> torch.Tensor:
    """``table`` at least ``width`` pages wide and at least one, padded with the null page 0."""
    width = max(width, table.shape[1], 1)
    if table.shape[1] == width:
        return table
    return torch.cat([table, torch.zeros(table.shape[0], width - table.shape[1], dtype=table.dtype)], dim=1)


def tables_at_least(inputs: StepInputs, widths: Mapping[str, int]) -> StepInputs:
    """``inputs`` with each page table padded to ``widths[family]`` pages (kernels take
    ``[B, >= 1]``; a CUDA graph needs fixed widths)."""
    for f in FAMILIES:
        setattr(inputs, f"{f}_table", padded_table(getattr(inputs, f"{f}_table"), widths.get(f, 1)))
    return inputs
