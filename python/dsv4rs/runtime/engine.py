"""The engine: DeepSeek-V4 over the paged KV cache, a batch of sequences at a time (CPU or CUDA).

An :class:`Engine` owns a :class:`dsv4rs.cache.KVCacheManager` (which pages hold which
sequence's rows) and the device tensors it describes (:class:`.kv_cache.KVCache`). Each
:meth:`Engine.step` feeds a batch of sequences one chunk of tokens each (a whole prompt, a piece
of one, or one decode token; lengths may differ): the planner (:mod:`.planner`) appends the
tokens to the allocator and plans the step once, then the model
(:class:`dsv4rs.model.DeepseekV4`) runs every layer on that plan, and the LM head gives logits.
On a GPU a decode step (one token per sequence) replays a CUDA graph of the whole step
(:mod:`.graphs`) when the model's layers allow capture (bfloat16 experts).

A decode loop need not wait for the GPU: :meth:`Engine.sample` draws the next tokens on the
device (:class:`SampledTokens`), and :meth:`Engine.step` takes them as a step's chunks while they
are still on their way to the host. The allocator appends them by count and learns their ids
later (:meth:`dsv4rs.cache.KVCacheManager.append_unresolved`), so the host plans step ``i + 1``
while the device runs step ``i``.
"""

from __future__ import annotations

import contextlib
import numbers
import os
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from dsv4rs import ops
from dsv4rs.cache import MAX_PAGES, CacheConfig, KVCacheManager, PrefixHit, int_ids
from dsv4rs.model.layers.attention import AttentionMetadata
from dsv4rs.model.layers.moe import Experts
from dsv4rs.model.layers.packed import pack_projections_
from dsv4rs.model.layers.quant import QuantLinear
from dsv4rs.model.model import DeepseekV4
from dsv4rs.parallel import FIXED_MAX_TOKENS, ExpertExchange, ParallelConfig, attach, host_max
from dsv4rs.runtime.graphs import BUCKETS, DecodeGraphs
from dsv4rs.runtime.kv_cache import KVCache
from dsv4rs.runtime.memory import pages_per_sequence, plan_memory
from dsv4rs.runtime.planner import StepInputs, StepPlanner, metadata, tables_at_least
from dsv4rs.runtime.sampling import sample


class Engine:
    """Runs a :class:`DeepseekV4` over a paged KV cache.

    Args:
        model: the weights (on the device to run on; float32 or bfloat16).
        max_sequences: sequences the cache holds at once (forks count).
        max_len: the longest sequence, in tokens. Leave either (or both) out and the memory
            planner (:mod:`.memory`) makes the cache as large as ``memory_fraction`` of the
            device's free memory allows.
        quant: production storage (584-byte FP8 entries, FP4 or FP8 indexer keys and queries) or
            plain rows (float32 on the CPU, bfloat16 on a GPU).
        index_format: ``"fp4"`` or ``"fp8"`` indexer keys when ``quant``.
        cuda_graphs: replay decode steps from CUDA graphs (:mod:`.graphs`). ``None`` (default):
            on a GPU for the batch sizes whose step can be captured (bfloat16 experts, or float32
            experts small enough to gather; otherwise a loop reads expert counts on the host);
            ``True`` insists (ValueError if no bucket can be); ``False``: never.
        graph_buckets: the batch sizes captured (a decode batch runs padded to the smallest
            bucket that holds it; larger batches run eagerly), captured on first use.
        memory_fraction: the share of the free device memory the planner may give the cache
            (default 0.9 on a GPU, 0.1 on the CPU).
        parallel: this rank's :class:`dsv4rs.parallel.ParallelConfig` when several processes
            share the model (data-parallel attention, expert-parallel MoE): ``model`` holds
            ``parallel.experts`` only, the cache holds this rank's sequences, and every rank
            calls :meth:`step` in lockstep (an empty batch when it has nothing to run). Under
            data-parallel attention the ranks agree on each step first (one small all-reduce on
            the host): when every rank runs at most 256 tokens, the MoE exchanges of the step
            and of its MTP draft take their fixed form, which reads nothing on the host
            (:class:`dsv4rs.parallel.ExpertExchange`).
            With ``cuda_graphs=True`` (a parallel engine's default is eager steps: the NCCL
            capture is new) decode steps replay CUDA graphs, the collectives captured with
            them, when every rank decodes: under data-parallel attention all ranks replay the
            bucket of the largest batch (a rank with fewer sequences, or none, pads to it), its
            exchanges in their fixed form of one slot a row. Every rank calls :meth:`draft`
            after the same steps (``draft([])`` after an empty one), and
            :meth:`capture_graphs` at the same point.
        weight_tiles: on a GPU, hold the model's quantized weights (MXFP4 experts, FP8 and MXFP4
            linears) in :func:`dsv4rs.ops.weight_tiles`'s layout, which the GPU reads in whole
            kilobytes: the same values and results, in place (the model's state dict keeps
            DeepSeek's rows). ``False`` leaves them as they are.

    The linears that share an input (an attention layer's ``W_qa`` with ``W_kv``, a compressed
    layer's compressor and indexer projections, the shared expert's ``W_gate`` with ``W_up``) are
    packed into one storage a group and run as one GEMM
    (:func:`dsv4rs.model.layers.packed.pack_projections_`): in place, the same parameters and
    state dict, values equal up to the order of the sums.
    """

    def __init__(self, model: DeepseekV4, max_sequences: int | None = None, max_len: int | None = None,
                 quant: bool = False, index_format: str = "fp4", cuda_graphs: bool | None = None,
                 graph_buckets: Sequence[int] = BUCKETS, memory_fraction: float | None = None,
                 parallel: ParallelConfig | None = None, weight_tiles: bool = True) -> None:
        self._exchange: ExpertExchange | None = None
        self._agreed_tokens: int | None = None  # the fixed form's tokens of the last agreed step (None: variable)
        self._graph_bucket: int | None = None  # the bucket every rank replays in the last agreed step
        if parallel is not None:
            if not isinstance(parallel, ParallelConfig):
                raise ValueError(f"parallel: expected a dsv4rs.parallel.ParallelConfig, got {type(parallel).__name__}")
            attach(model, parallel)
            if cuda_graphs is None:
                cuda_graphs = False  # eager unless asked
            ex = model.model.layers[0].mlp.experts.exchange
            self._exchange = ex if isinstance(ex, ExpertExchange) else None  # "dp": the steps agree
        elif model.experts != range(model.config.n_routed_experts):
            raise ValueError(f"model: holds experts {model.experts} of {model.config.n_routed_experts}; "
                             "pass this rank's parallel=ParallelConfig")
        self.parallel = parallel
        for name, v in (("max_sequences", max_sequences), ("max_len", max_len)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name}: expected an int >= 1 or None, got {v!r}")
        if not isinstance(quant, bool):
            raise ValueError(f"quant: expected a bool, got {quant!r}")
        if cuda_graphs is not None and not isinstance(cuda_graphs, bool):
            raise ValueError(f"cuda_graphs: expected a bool or None, got {cuda_graphs!r}")
        if memory_fraction is not None and (isinstance(memory_fraction, bool) or not isinstance(
                memory_fraction, numbers.Real) or not 0 < memory_fraction <= 1):
            raise ValueError(f"memory_fraction: expected a number in (0, 1], got {memory_fraction!r}")
        if isinstance(graph_buckets, (str, bytes)) or not isinstance(graph_buckets, Sequence) or any(
                isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in graph_buckets):
            raise ValueError(f"graph_buckets: expected a sequence of batch sizes >= 1, got {graph_buckets!r:.80}")
        if index_format not in ("fp4", "fp8"):
            raise ValueError(f'index_format: expected "fp4" or "fp8", got {index_format!r}')
        self.model, self.cfg, self.quant, self.index_format = model, model.config, quant, index_format
        cfg = self.cfg
        self.device = model.lm_head.weight.device
        if not isinstance(weight_tiles, bool):
            raise ValueError(f"weight_tiles: expected a bool, got {type(weight_tiles).__name__}")
        pack_projections_(model)  # before the cache takes its share (a group's bytes at a time)
        if weight_tiles and self.device.type == "cuda":
            # Before the cache takes its share (in place: the weights take no more memory).
            for module in model.modules():
                if isinstance(module, (Experts, QuantLinear)):
                    module.tile()
        self.row_dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
        self.cache_config = CacheConfig(cfg.compress_ratios, window=cfg.sliding_window,
                                        index_format=index_format if quant else "bf16",
                                        main_format="fp8" if quant else "bf16")
        if max_sequences is None or max_len is None:
            plan = plan_memory(cfg, self._free_bytes(memory_fraction), self.cache_config, 0, max_len=max_len,
                               max_sequences=max_sequences, graph_batch=max(graph_buckets, default=0))
            max_sequences, max_len = plan.max_sequences, plan.max_len
        per_seq = pages_per_sequence(cfg, max_len)
        pages = {f: 1 + max_sequences * n for f, n in per_seq.items()}
        for f, n in pages.items():
            if n > MAX_PAGES:
                raise ValueError(f"max_sequences, max_len: {max_sequences:,} sequences of {max_len:,} tokens need "
                                 f"{n:,} pages of the {f} pool, more than the {MAX_PAGES:,} a pool holds")
        self.manager = KVCacheManager(self.cache_config, pages)
        self.cache = KVCache(cfg, pages, self.device, index_format if quant else None, self.row_dtype)
        self.planner = StepPlanner(cfg, self.manager)
        self.max_len, self.max_sequences = max_len, max_sequences
        self.table_widths = {f: max(n, 1) for f, n in per_seq.items() if f != "state"}
        self.graphs = self._graphs(cuda_graphs, [b for b in graph_buckets if b <= max_sequences] or [1])
        self._origin: dict[int, int] = {}
        self._fresh: set[int] = set()
        self._mtp_pos: dict[int, int] = {}
        self._last: _Last | None = None
        self._idled = False  # the last step was an empty one (a parallel engine's idle rank)
        self.steps = 0
        """Steps run (empty ones too): what keeps a parallel engine's ranks in lockstep."""
        self.drafts = 0
        """MTP drafts run (empty ones too)."""
        # Per sequence, in order: the sampled tokens fed but not yet resolved in the allocator
        # (the SampledTokens and the row of this sequence's token in it).
        self._pending: dict[int, deque[tuple[SampledTokens, int]]] = {}

    def _free_bytes(self, fraction: float | None) -> int:
        """The memory the cache may take when the engine sizes it: ``fraction`` (default 0.9 on a
        GPU, 0.1 on the CPU) of the device's free memory (the weights are already resident)."""
        if self.device.type == "cuda":
            free = torch.cuda.mem_get_info(self.device)[0]
            return int(free * (0.9 if fraction is None else fraction))
        return int(_available_ram() * (0.1 if fraction is None else fraction))

    def _graphs(self, enable: bool | None, buckets: list[int]) -> DecodeGraphs | None:
        """The decode graphs of the buckets whose step can be captured: on a CUDA device, with
        experts that read nothing on the host at that batch (quantized or bfloat16 experts, or
        float32 ones small enough to gather; see :class:`dsv4rs.model.layers.moe.Experts`)."""
        k = self.cfg.num_experts_per_tok
        experts = [layer.mlp.experts for layer in self.model.model.layers]
        # Under data-parallel attention a rank's experts run the rows of every rank's bucket.
        rows = self.parallel.world if self._exchange is not None else 1
        buckets = [b for b in buckets if all(e.capturable(b * rows, k) for e in experts)]
        if self._exchange is not None:  # the exchange's fixed form, whose shapes the graph holds
            buckets = [b for b in buckets if b <= FIXED_MAX_TOKENS]
        capturable = self.device.type == "cuda" and bool(buckets)
        if enable and not capturable:
            raise ValueError("cuda_graphs: a decode step can be captured on a CUDA device with quantized (MXFP4) or "
                             "bfloat16 experts, or float32 experts small enough to gather (device "
                             f"{self.device}, experts {experts[0].storage})")
        if enable is False or not capturable:
            return None
        ops.warm_up(self.device)
        tensor_parallel = self.parallel is not None and self._exchange is None
        return DecodeGraphs(self._graph_step, buckets, self.table_widths, self.device,
                            before_capture=self._same_bucket if tensor_parallel else None)

    def _same_bucket(self, bucket: int) -> None:
        """Before a tensor-parallel engine captures ``bucket``: every rank captures the same one
        (their steps run the same batches; a rank that did not would wait in a collective of
        another size). One all-reduce on the host; ValueError on every rank if they differ."""
        high, low = host_max(self.parallel, [bucket, -bucket], "the CUDA graph bucket's agreement")
        if high != -low:
            raise ValueError(f"cuda_graphs: the ranks capture different graph buckets ({-low} to {high} sequences): "
                             "every rank of a tensor-parallel engine steps the same sequences")

    def capture_graphs(self) -> None:
        """Captures every bucket's decode graph now (else each is captured on its first use). A
        parallel engine's ranks call it at the same point: a capture runs the step once first,
        collectives included."""
        if self.graphs is not None:
            self.graphs.capture_all()

    def _hca_width(self, end: int) -> int:
        """Width of the HCA candidate lists of a step whose longest sequence ends at ``end``."""
        return max(1, end // self.cfg.compress_rates[1])

    # -- sequences -------------------------------------------------------------------------------

    def add_sequence(self, prompt: Sequence[int] | torch.Tensor = ()) -> tuple[int, PrefixHit]:
        """A new sequence. With a ``prompt``, it reuses the compressed rows of the longest cached
        prefix: feed ``prompt[hit.recompute_from:]`` next."""
        ids = self._check_ids("prompt", prompt).tolist()
        self._settle()  # the prefix units of tokens already on the host become findable
        seq, hit = self.manager.add_sequence(ids)
        self._origin[seq] = self._mtp_pos[seq] = hit.recompute_from
        self._fresh.add(seq)
        return seq, hit

    def fork(self, seq_id: int) -> int:
        """A copy of ``seq_id`` sharing its pages (copy on write)."""
        child = self.manager.fork(seq_id)
        self._origin[child] = self._origin[seq_id]
        if seq_id in self._pending:  # the child shares the unresolved tokens
            self._pending[child] = deque(self._pending[seq_id])
        if seq_id in self._mtp_pos:
            self._mtp_pos[child] = self._mtp_pos[seq_id]
        if seq_id in self._fresh:
            self._fresh.add(child)
        return child

    def release(self, seq_id: int) -> None:
        """Ends a sequence: its pages go back to the pools (those a fork or the prefix cache still
        shares stay), and what the engine kept of it is dropped."""
        self.manager.release(seq_id)
        self._origin.pop(seq_id, None)
        self._pending.pop(seq_id, None)
        self._mtp_pos.pop(seq_id, None)
        self._fresh.discard(seq_id)

    @staticmethod
    def _seq_ids(seq_ids: object) -> list[int]:
        """A batch's sequence ids as a list of ints (a sequence of ints or a 1-d integer tensor on
        the CPU; bools and floats refused): TypeError naming ``seq_ids``."""
        if not isinstance(seq_ids, (Sequence, torch.Tensor)) and not hasattr(seq_ids, "__array_interface__"):
            raise TypeError(f"seq_ids: expected a sequence of sequence ids, got {type(seq_ids).__name__}")
        v = int_ids("seq_ids", seq_ids)
        return v.tolist() if isinstance(v, torch.Tensor) else list(v)

    def _check_ids(self, name: str, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        t = token_ids(name, ids)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.cfg.vocab_size):
            raise ValueError(f"{name}: token ids must lie in [0, {self.cfg.vocab_size}), got "
                             f"{int(t.min())}..{int(t.max())}")
        return t

    # -- sampling on the device, and the sampled tokens fed back ------------------------------

    def _settle(self, seq_ids: Sequence[int] | None = None, wait: bool = False) -> None:
        """Resolves in the allocator the ids of fed sampled tokens that have reached the host
        (with ``wait``: all of them, waiting), of ``seq_ids`` or of every sequence."""
        for s in list(self._pending if seq_ids is None else seq_ids):
            queue = self._pending.get(s)
            if not queue:
                continue
            ids = []
            while queue and (wait or queue[0][0].ready()):
                tokens, row = queue.popleft()
                ids.append(tokens.tolist()[row])
            if ids:
                self.manager.resolve(s, ids)
            if not queue:
                del self._pending[s]

    @torch.no_grad()
    def sample(self, seq_ids: Sequence[int], logits: torch.Tensor, temperature: float | Sequence[float] = 1.0,
               top_k: int | Sequence[int] = 0, top_p: float | Sequence[float] = 1.0,
               min_p: float | Sequence[float] = 0.0, seed: int | Sequence[int] = 0) -> SampledTokens:
        """The next token of each sequence, drawn on the device from ``logits`` (``[B, vocab]``,
        row ``b`` for ``seq_ids[b]``, e.g. a decode step's logits) without waiting for the GPU.

        :func:`dsv4rs.runtime.sampling.sample` draws them (temperature ``0``: greedy; then top-k,
        top-p, min-p; each a number or one per row), or :func:`dsv4rs.ops.sample_gumbel` (one
        kernel, the same tokens) when nothing is filtered; row ``b``'s random numbers depend only on
        ``seed[b]`` and the sequence's length, so a sequence's tokens do not depend on the batch.
        Feed the result to :meth:`step` as its ``chunks``; read the ids with
        :meth:`SampledTokens.tolist`.
        """
        seq_ids = self._seq_ids(seq_ids)
        b = len(seq_ids)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape != (b, self.cfg.vocab_size):
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"logits: expected [{b}, {self.cfg.vocab_size}] (one row per sequence), got {shape}")
        if not logits.is_floating_point() or logits.device != self.device:
            raise ValueError(f"logits: expected floating-point logits on {self.device}, got {logits.dtype} on "
                             f"{logits.device}")
        if b == 0:
            raise ValueError("seq_ids: no sequences to sample for")
        for s in seq_ids:
            if s not in self._origin:
                raise ValueError(f"seq_ids: unknown sequence {s}")

        temps, ks, ps, mins, seeds = self.sampling_settings(b, temperature, top_k, top_p, min_p, seed)
        steps = [self.manager.length(s) for s in seq_ids]
        pin = self.device.type == "cuda"
        ints = torch.tensor([ks, seeds, steps], dtype=torch.int64, pin_memory=pin).to(self.device, non_blocking=True)
        floats = torch.tensor([temps, ps, mins], dtype=torch.float32, pin_memory=pin).to(self.device, non_blocking=True)
        x = logits.float().contiguous()
        if all(k == 0 for k in ks) and all(p == 1 for p in ps) and all(m == 0 for m in mins):
            ids = ops.sample_gumbel(x, floats[0], ints[1], ints[2])  # no filter: one kernel, no sort
        else:
            ids = sample(x, floats[0], ints[0], floats[1], ints[1], ints[2], floats[2] if any(mins) else None)
        return SampledTokens(self, seq_ids, ids)

    def sampling_settings(self, b: int, temperature: float | Sequence[float] = 1.0, top_k: int | Sequence[int] = 0,
                          top_p: float | Sequence[float] = 1.0, min_p: float | Sequence[float] = 0.0,
                          seed: int | Sequence[int] = 0) -> tuple[list[float], list[int], list[float], list[float],
                                                                  list[int]]:
        """:meth:`sample`'s settings for ``b`` rows (each a number or one per row), checked
        (``ValueError`` naming the setting) and as lists: ``(temperature, top_k, top_p, min_p,
        seed)``. A ``top_k`` of the vocabulary's size or more keeps every token: it becomes ``0``,
        so any int is taken."""
        def rows(name: str, v: object, kind: type, ok, what: str) -> list:
            vals = list(v) if isinstance(v, Sequence) else [v] * b
            if len(vals) != b:
                raise ValueError(f"{name}: expected one value or {b} (one per sequence), got {len(vals)}")
            for x in vals:  # (NumPy scalars are numbers too)
                number = isinstance(x, numbers.Real if kind is float else numbers.Integral)
                if isinstance(x, bool) or not number or not ok(x):
                    raise ValueError(f"{name}: expected {what}, got {x!r}")
            return [kind(x) for x in vals]

        temps = rows("temperature", temperature, float, lambda x: 0 <= x < float("inf"), "a finite number >= 0")
        ks = rows("top_k", top_k, int, lambda x: x >= 0, "an int >= 0 (0: all tokens)")
        ps = rows("top_p", top_p, float, lambda x: 0 < x <= 1, "a number in (0, 1]")
        mins = rows("min_p", min_p, float, lambda x: 0 <= x <= 1, "a number in [0, 1]")
        seeds = rows("seed", seed, int, lambda x: 0 <= x < 1 << 63, "an int in [0, 2^63)")
        vocab = self.cfg.vocab_size
        return temps, [0 if k >= vocab else k for k in ks], ps, mins, seeds

    # -- the forward pass ------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, seq_ids: Sequence[int],
             chunks: Sequence[Sequence[int] | torch.Tensor] | torch.Tensor | SampledTokens, all_logits: bool = False,
             last: Sequence[int] | None = None) -> torch.Tensor | list[torch.Tensor]:
        """Feeds ``chunks[i]`` to sequence ``seq_ids[i]`` and returns float32 logits: of the last
        token of each chunk ``[B, vocab]``, or with ``all_logits`` one ``[len, vocab]`` per chunk,
        or with ``last`` one ``[last[i], vocab]`` per chunk, of its last ``last[i]`` tokens (``0``:
        none; the LM head runs on those rows only, e.g. a speculative step's verified tokens).
        A chunk is a sequence of ints or a 1-d integer tensor; ``chunks`` may be a 2-d integer
        tensor, its rows the chunks.

        ``chunks`` may also be :class:`SampledTokens` of this engine (from :meth:`sample`) that
        hold a token for each of ``seq_ids``: a decode step fed on the device, which does not
        wait for the tokens to reach the host."""
        seq_ids = self._seq_ids(seq_ids)
        sampled = chunks if isinstance(chunks, SampledTokens) else None
        if sampled is not None:
            rows = sampled._rows(self, seq_ids)
            chunks = [[0]] * len(seq_ids)  # one token each, its id on the device
        elif (isinstance(chunks, torch.Tensor) or hasattr(chunks, "__array_interface__")) and len(
                getattr(chunks, "shape", ())) == 2:
            chunks = list(chunks)  # a 2-d tensor or array: its rows, chunks of one length
        elif isinstance(chunks, (str, bytes)) or not isinstance(chunks, Sequence):
            raise TypeError(f"chunks: expected a sequence of token-id chunks, a 2-d tensor of them or "
                            f"SampledTokens, got {type(chunks).__name__}")
        if len(seq_ids) != len(chunks):
            raise ValueError(f"seq_ids, chunks: {len(seq_ids)} sequences but {len(chunks)} chunks")
        if not len(seq_ids):
            if self.parallel is None:
                raise ValueError("seq_ids: an empty step (only ranks of a parallel engine step with nothing)")
            self.steps += 1
            self._agree(0, True)
            with self._exchanging():
                if self._graph_bucket is not None:  # the other ranks replay this bucket: so does this one
                    self.graphs.run(None, bucket=self._graph_bucket)
                    self._last = None
                else:
                    self._idle(self.model.model.layers)
            self._idled = True
            return [] if all_logits or last is not None else torch.empty(0, self.cfg.vocab_size, device=self.device)
        # Sampled tokens are in the vocabulary by construction: only host chunks are checked.
        ids = None if sampled is not None else [self._check_ids(f"chunks[{i}]", c) for i, c in enumerate(chunks)]
        lengths = [1] * len(seq_ids) if ids is None else [t.numel() for t in ids]
        if last is not None:
            last = int_ids("last", last)  # ints, not bools: checked before anything runs
            if len(last) != len(chunks) or any(not 0 <= n <= length for n, length in zip(last, lengths)):
                raise ValueError("last: expected one count per chunk, each between 0 and the chunk's length")
            last = [int(n) for n in last]
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError("seq_ids: a sequence appears twice in one step")
        if 0 in lengths:
            raise ValueError("chunks: every chunk needs at least one token")
        for s, n in zip(seq_ids, lengths):
            if s not in self._origin:
                raise ValueError(f"seq_ids: unknown sequence {s}")
            if self.manager.length(s) + n > self.max_len:
                raise ValueError(f"chunks: sequence {s} would exceed max_len = {self.max_len}")
        self._settle()
        if sampled is None:  # ids follow a sequence's sampled tokens only once those are resolved
            self._settle([s for s in seq_ids if s in self._pending], wait=True)
        self._idled = False
        origins = [self._origin[s] for s in seq_ids]
        inputs, copies = self.planner.append(list(seq_ids), ids, origins)
        fed = None
        if sampled is not None:
            for s, r in zip(seq_ids, rows):
                self._pending.setdefault(s, deque()).append((sampled, r))
            fed = sampled._device_ids(rows)
        self.cache.copy_pages(copies)
        for s, slot in zip(seq_ids, inputs.state_slots.tolist()):
            if s in self._fresh:
                if slot >= 0:
                    self.cache.reset_state(slot)
                self._fresh.discard(s)
        lens = inputs.lens.tolist()
        decode = max(lens) == 1
        self.steps += 1
        self._agree(sum(lens), decode)
        with self._exchanging():
            logits, x, meta, ids_dev = self._forward(inputs, decode, fed)
        n = len(lens)
        self._last = _Last(list(seq_ids), inputs.starts.tolist(), lens, ids_dev, meta, x) if len(self.model.mtp) else None
        if logits is not None:  # a replayed graph's output is overwritten by the next replay: copy it
            logits = logits[:n].clone()
            if last is not None:
                return [logits[i : i + k] for i, k in enumerate(last)]
            return logits if not all_logits else list(logits.split(1))
        if last is not None:
            ends = inputs.cu_tokens[1:].tolist()
            rows = torch.tensor([r for e, k in zip(ends, last) for r in range(e - k, e)], dtype=torch.int64)
            return list(self.model.head(x[self._to_device(rows)]).float().split(list(last)))
        if not all_logits:
            return self.model.head(x[self._to_device(inputs.cu_tokens[1:] - 1)]).float()
        return list(self.model.head(x).float().split(lens))

    def _agree(self, tokens: int, decode: bool) -> None:
        """A data-parallel engine's step, agreed with the other ranks' (:meth:`ExpertExchange.agree`):
        the exchanges of the step (and of the MTP draft after it) take the fixed form when every
        rank runs few enough tokens (kept in ``_agreed_tokens`` for :meth:`_exchanging`). When
        every rank decodes and the largest batch fits a graph, every rank replays that batch's
        bucket (``_graph_bucket``; the ranks' buckets are the same, which the agreement checks),
        and the fixed form's tokens are the bucket's rows, as captured."""
        self._graph_bucket = None
        if self._exchange is None:
            return
        graphs = self.graphs
        agreed = self._exchange.agree(tokens, decode, graphs.buckets if graphs is not None else ())
        self._agreed_tokens = agreed.tokens
        if graphs is not None and agreed.decode and agreed.tokens is not None and agreed.most <= graphs.max_batch:
            self._graph_bucket = self._agreed_tokens = graphs.bucket(agreed.most)

    @contextlib.contextmanager
    def _exchanging(self, live: torch.Tensor | None = None) -> Iterator[None]:
        """The MoE layers run inside take the exchange's form that the last :meth:`_agree` set:
        a step right after it, then the MTP draft after that step (the same tokens on every rank,
        without agreeing again); ``live``: the rows that are tokens (:attr:`ExpertExchange.live`)."""
        if self._exchange is None:
            yield
            return
        with self._exchange.rows(self._agreed_tokens, live):
            yield

    def _forward(self, inputs: StepInputs, decode: bool, fed: torch.Tensor | None
                 ) -> tuple[torch.Tensor | None, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """The step's layers: ``(logits of a decode step or None, last hidden states, metadata,
        token ids on the device)``."""
        lens = inputs.lens.tolist()
        bucket = self._graph_bucket
        if self._exchange is None and decode and self.graphs is not None and len(lens) <= self.graphs.max_batch:
            bucket = self.graphs.bucket(len(lens))
        if bucket is not None:
            logits, x, meta = self.graphs.run(inputs, ids=fed, bucket=bucket)
            ids_dev = self.graphs.views[bucket].ids[: x.shape[0]]
        elif decode:  # the captured step's own shapes (full table widths), eagerly
            dev = tables_at_least(inputs, self.table_widths).to(self.device)
            if fed is not None:
                dev.ids = fed
            logits, x, meta = self._decode(dev)
            ids_dev = dev.ids
        else:
            inputs = tables_at_least(inputs, {})
            staging = self.planner.staging(inputs, self.cache.new_staging)
            end = int((inputs.starts + inputs.lens).max())
            dev = inputs.to(self.device)
            meta = metadata(self.cfg, dev, self._hca_width(end), staging)
            x = self.model(dev.ids, meta, self.cache.layers[: self.cfg.num_hidden_layers])
            logits, ids_dev = None, dev.ids
        return logits, x, meta, ids_dev

    def _idle(self, layers: Sequence[torch.nn.Module]) -> None:
        """An empty step (or draft) of a parallel engine: the layers' MoE exchanges with no
        tokens of this rank's own (the other ranks' pairs for this rank's experts still run
        here)."""
        d, k = self.cfg.hidden_size, self.cfg.num_experts_per_tok
        dtype = self.model.lm_head.weight.dtype
        x = torch.empty(0, d, dtype=dtype, device=self.device)
        idx = torch.empty(0, k, dtype=torch.int64, device=self.device)
        w = torch.empty(0, k, dtype=torch.float32, device=self.device)
        for layer in layers:
            layer.mlp.experts(x, idx, w)
        self._last = None

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A host tensor on the engine's device, without waiting for the device."""
        return t.to(self.device, non_blocking=True)

    def _graph_step(self, x: StepInputs) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """The step a graph captures: :meth:`_decode`, with a data-parallel engine's MoE exchanges
        in their fixed form of one slot a row of the bucket (every rank replays the same one),
        the padding rows (a window origin past the token, :mod:`.graphs`) routed to no expert."""
        ex = self._exchange
        if ex is None:
            return self._decode(x)
        with ex.rows(x.ids.shape[0], x.origins <= x.starts):
            return self._decode(x)

    def _decode(self, x: StepInputs) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """The decode step the graphs capture: metadata, every layer, the LM head (one token a
        sequence, so every row's logits are its sequence's)."""
        meta = metadata(self.cfg, x, self._hca_width(self.max_len))
        h = self.model(x.ids, meta, self.cache.layers[: self.cfg.num_hidden_layers])
        return self.model.head(h).float(), h, meta

    @torch.no_grad()
    def draft(self, next_ids: Sequence[int] | SampledTokens) -> torch.Tensor:
        """The MTP block's logits ``[B, vocab]`` for the token after ``next_ids`` (docs/model.md
        section 8).

        Call it after every :meth:`step` of the sequences it drafts for, with the token that
        follows each chunk (e.g. the one sampled from the step's logits): the block runs over the
        whole chunk (position ``t`` sees the embedding of token ``t + 1``) and keeps its own
        128-token window, which must not miss a step. ``next_ids`` may be this engine's
        :class:`SampledTokens` holding a token for every sequence of the last step: then nothing
        waits for the GPU. In a parallel engine every rank drafts after the same step, a rank
        that stepped an empty batch with ``draft([])``.
        """
        if not len(self.model.mtp):
            raise ValueError("draft: the model has no MTP block")
        if self.parallel is not None and self._idled and not len(next_ids):
            self._idled = False
            self.drafts += 1
            with self._exchanging():
                self._idle([self.model.mtp[0]])
            return torch.empty(0, self.cfg.vocab_size, device=self.device)
        if self._last is None:
            raise ValueError("draft: call step first")
        last = self._last
        if isinstance(next_ids, SampledTokens):
            nxt = next_ids._device_ids(next_ids._rows(self, last.seq_ids, "next_ids"))
        else:
            nxt = self._check_ids("next_ids", next_ids)
            if nxt.numel() != len(last.lens):
                raise ValueError(f"next_ids: expected {len(last.lens)} ids (one per sequence of the last step), got "
                                 f"{nxt.numel()}")
        for s, start in zip(last.seq_ids, last.starts):
            if s not in self._origin:
                raise ValueError(f"draft: sequence {s} of the last step was released")
            if self._mtp_pos.get(s) != start:
                raise ValueError(f"draft: the MTP window of sequence {s} missed tokens "
                                 f"({self._mtp_pos.get(s)} fed, the last step began at {start})")
        self._last = None
        self.drafts += 1
        ends = self._to_device(torch.tensor(last.lens).cumsum(0) - 1)
        shifted = last.ids.clone()
        shifted[:-1] = last.ids[1:]
        shifted[ends] = self._to_device(nxt)
        # After a replayed step the rows past the batch's tokens are the graph's padding: no expert runs them.
        rows, tokens = last.streams.shape[0], sum(last.lens)
        live = torch.arange(rows, device=self.device) < tokens if self._exchange is not None and rows > tokens else None
        with self._exchanging(live):
            h = self.model.draft(last.streams, shifted, last.meta, self.cache.layers[self.cfg.num_hidden_layers])
        for s, start, n in zip(last.seq_ids, last.starts, last.lens):
            self._mtp_pos[s] = start + n
        mtp = self.model.mtp[0]
        return self.model.head(h[ends], mtp.hc_head, mtp.norm).float()


class SampledTokens:
    """One token for each of some sequences, sampled on an engine's device by
    :meth:`Engine.sample`; feed them to :meth:`Engine.step` as its ``chunks`` (the same
    sequences or some of them, in any order) before the host has seen them. Their ids are in
    the vocabulary by construction, so the step takes them unchecked, on the device. They reach
    the host by an asynchronous copy: :meth:`tolist` waits for it, :meth:`ready` tells whether
    it has landed."""

    def __init__(self, engine: Engine, seq_ids: Sequence[int], ids: torch.Tensor) -> None:
        self._engine = engine
        self.seq_ids: tuple[int, ...] = tuple(seq_ids)
        self._ids = ids
        self._row = {s: i for i, s in enumerate(self.seq_ids)}
        self._list: list[int] | None = None
        if ids.device.type == "cuda":
            self._host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
            self._host.copy_(ids, non_blocking=True)
            self._event: torch.cuda.Event | None = torch.cuda.Event()
            self._event.record()
        else:
            self._host, self._event = ids, None

    def __len__(self) -> int:
        return len(self.seq_ids)

    def ready(self) -> bool:
        """Whether the ids have reached the host (:meth:`tolist` would not wait)."""
        return self._list is not None or self._event is None or self._event.query()

    def tolist(self) -> list[int]:
        """The ids, row ``b`` for ``seq_ids[b]`` (waits for their copy to the host)."""
        if self._list is None:
            if self._event is not None:
                self._event.synchronize()
            self._list = self._host.tolist()
        return self._list

    @property
    def ids(self) -> torch.Tensor:
        """A copy of the ids on the device (``int64 [B]``)."""
        return self._ids.clone()

    def _rows(self, engine: Engine, seq_ids: Sequence[int], name: str = "chunks") -> list[int]:
        """The row of each of ``seq_ids`` (a step's batch), checked; errors name ``name``."""
        if engine is not self._engine:
            raise ValueError(f"{name}: these sampled tokens belong to another engine")
        missing = [s for s in seq_ids if s not in self._row]
        if missing:
            raise ValueError(f"{name}: the sampled tokens hold no token for sequence(s) {missing} "
                             f"(they are for {list(self.seq_ids)})")
        return [self._row[s] for s in seq_ids]

    def _device_ids(self, rows: list[int]) -> torch.Tensor:
        """The ids of ``rows``, in that order, on the device, without waiting for it."""
        if rows == list(range(len(self.seq_ids))):
            return self._ids
        pin = self._ids.device.type == "cuda"
        index = torch.tensor(rows, dtype=torch.int64, pin_memory=pin).to(self._ids.device, non_blocking=True)
        return self._ids.index_select(0, index)


def token_ids(name: str, ids: object) -> torch.Tensor:
    """Token ids given as a sequence of ints or a 1-d integer tensor or array, as an int64 tensor
    (on the tensor's device; not checked against a vocabulary). Anything else is a TypeError
    naming ``name`` (the rules of :func:`dsv4rs.cache.int_ids`); ids past int64 are a ValueError."""
    if not isinstance(ids, (torch.Tensor, Sequence)) and not hasattr(ids, "__array_interface__"):
        raise TypeError(f"{name}: expected a sequence of token ids, got {type(ids).__name__}")
    v = int_ids(name, ids, cpu=False)
    if isinstance(v, torch.Tensor):
        return v.to(torch.int64)
    try:
        return torch.tensor(v, dtype=torch.int64)
    except (OverflowError, RuntimeError, ValueError):
        raise ValueError(f"{name}: token ids must lie in [0, 2^63)") from None


def _available_ram() -> int:
    """Memory the system can give without swapping: ``MemAvailable`` (free plus reclaimable
    caches), else the free pages."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass
class _Last:
    """What :meth:`Engine.draft` needs of the last step: its sequences, chunk starts and lengths
    (host), and its token ids, metadata and final streams (device; a replayed graph's are padded
    to the bucket)."""

    seq_ids: list[int]
    starts: list[int]
    lens: list[int]
    ids: torch.Tensor
    meta: AttentionMetadata
    streams: torch.Tensor
