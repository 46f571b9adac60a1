"""The engine: DeepSeek-V4 over the paged KV cache, a batch of sequences at a time (CPU or CUDA).

An :class:`Engine` owns a :class:`dsv4rs.cache.KVCacheManager` (which pages hold which
sequence's rows) and the device tensors it describes (:class:`.kv_cache.KVCache`). Each
:meth:`Engine.step` feeds a batch of sequences one chunk of tokens each (a whole prompt, a piece
of one, or one decode token; lengths may differ): the planner (:mod:`.planner`) appends the
tokens to the allocator and plans the step once, then the model
(:class:`dsv4rs.model.DeepseekV4`) runs every layer on that plan, and the LM head gives logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dsv4rs import ops
from dsv4rs.cache import CacheConfig, KVCacheManager, PrefixHit
from dsv4rs.model.config import CSA, HCA
from dsv4rs.model.model import DeepseekV4
from dsv4rs.runtime.kv_cache import KVCache
from dsv4rs.runtime.planner import Step, StepPlanner


class Engine:
    """Runs a :class:`DeepseekV4` over a paged KV cache.

    Args:
        model: the weights (on the device to run on; float32 or bfloat16).
        max_sequences: sequences the cache holds at once (forks count).
        max_len: the longest sequence, in tokens.
        quant: production storage (584-byte FP8 entries, FP4 or FP8 indexer keys and queries) or
            plain rows (float32 on the CPU, bfloat16 on a GPU).
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
        per_seq = {
            "window": -(-cfg.sliding_window // ops.PAGE_ROWS),
            "csa": -(-(max_len // cfg.compress_rates[0]) // ops.PAGE_ROWS) if CSA in cfg.layer_types else 0,
            "hca": -(-(max_len // cfg.compress_rates[1]) // ops.PAGE_ROWS) if HCA in cfg.layer_types else 0,
            "state": 1 if any(cfg.compress_ratios) else 0,
        }
        pages = {f: 1 + max_sequences * n for f, n in per_seq.items()}
        self.manager = KVCacheManager(self.cache_config, pages)
        self.cache = KVCache(cfg, pages, self.device, index_format if quant else None, self.row_dtype)
        self.planner = StepPlanner(cfg, self.manager, self.cache)
        self.max_len = max_len
        self._origin: dict[int, int] = {}
        self._fresh: set[int] = set()
        self._mtp_pos: dict[int, int] = {}
        self._last: tuple[Step, torch.Tensor] | None = None

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
        step = self.planner.plan(list(seq_ids), ids, [self._origin[s] for s in seq_ids])
        self.cache.copy_pages(step.appended.copies)
        for s, slot in zip(seq_ids, step.meta.state_slots):
            if s in self._fresh:
                if slot >= 0:
                    self.cache.reset_state(slot)
                self._fresh.discard(s)
        n = self.cfg.num_hidden_layers
        x = self.model(step.ids, step.meta, self.cache.layers[:n])
        self._last = (step, x) if len(self.model.mtp) else None
        lens = step.meta.lens
        if not all_logits:
            ends = torch.tensor(lens, device=self.device).cumsum(0) - 1
            return self.model.head(x[ends]).float()
        return list(self.model.head(x).float().split(lens))

    @torch.no_grad()
    def draft(self, next_ids: Sequence[int]) -> torch.Tensor:
        """The MTP block's logits ``[B, vocab]`` for the token after ``next_ids`` (docs/model.md
        section 8).

        Call it after every :meth:`step` of the sequences it drafts for, with the token that
        follows each chunk (e.g. the one sampled from the step's logits): the block runs over the
        whole chunk (position ``t`` sees the embedding of token ``t + 1``) and keeps its own
        128-token window, which must not miss a step.
        """
        if not len(self.model.mtp):
            raise ValueError("draft: the model has no MTP block")
        if self._last is None:
            raise ValueError("draft: call step first")
        step, x = self._last
        meta = step.meta
        nxt = self._check_ids("next_ids", next_ids)
        if nxt.numel() != len(meta.lens):
            raise ValueError(f"next_ids: expected {len(meta.lens)} ids (one per sequence of the last step), got "
                             f"{nxt.numel()}")
        for s, start in zip(step.seq_ids, meta.starts):
            if self._mtp_pos.get(s) != start:
                raise ValueError(f"draft: the MTP window of sequence {s} missed tokens "
                                 f"({self._mtp_pos.get(s)} fed, the last step began at {start})")
        self._last = None
        ends = torch.tensor(meta.lens, device=self.device).cumsum(0) - 1
        shifted = step.ids.clone()
        shifted[:-1] = step.ids[1:]
        shifted[ends] = nxt.to(self.device)
        h = self.model.draft(x, shifted, meta, self.cache.layers[self.cfg.num_hidden_layers])
        for s, start, n in zip(step.seq_ids, meta.starts, meta.lens):
            self._mtp_pos[s] = start + n
        mtp = self.model.mtp[0]
        return self.model.head(h[ends], mtp.hc_head, mtp.norm).float()
