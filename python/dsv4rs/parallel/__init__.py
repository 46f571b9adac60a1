"""Several processes, one model: data-parallel attention and expert-parallel MoE over
``torch.distributed`` (NCCL between GPUs, gloo between CPU processes).

- **Data-parallel attention.** Each rank runs its own :class:`dsv4rs.runtime.Engine`: its own
  sequences, its own :class:`dsv4rs.cache.KVCacheManager` and cache pools, and a full copy of
  every weight but the routed experts. Attention, compressors and indexer run locally.
- **Expert-parallel MoE.** Rank ``r`` holds the routed experts ``ParallelConfig.expert_ranges[r]``
  (contiguous, by default an even split). In every MoE layer each rank sends each (token,
  choice) pair's row to the rank that holds its expert, the owners run the experts, and the
  results come back (``all_to_all_single``: the pair counts, then with variable splits each pair's
  row with its expert id in one message, and the results); the router and the shared
  expert run where the token lives. A token's result is its choices' outputs times their routing
  weights, summed in routing order.

- **Tensor-parallel attention** (``mode="tp"``, for small batches where latency matters). Every
  rank runs the same sequences: the attention heads and output groups are split over the ranks
  (contiguous), the shared latent K = V entry, the compressors and the indexer are computed on
  every rank, and one all-reduce sums the output projection's partial results. The routed experts
  are split as above; as every rank holds every token, each runs the pairs of its own experts
  and a second all-reduce sums the MoE's partial results (no all-to-all). The KV cache is
  replicated on every rank (V4 has one latent head), which is why data parallelism holds more
  sequences.

Every rank calls :meth:`Engine.step` the same number of times, in the same order (under ``"tp"``
with the same sequences and tokens): a rank with nothing to run steps an empty batch
(``engine.step([], [])``), which takes part in the MoE layers' exchanges with no tokens of its
own. A rank that dies, or stops stepping, ends every other rank's
step with :class:`ParallelError` within the process group's timeout (no hang).

Launch with ``torchrun --nproc-per-node N script.py`` and, in the script::

    pc = parallel.init(cfg)                                     # the process group, from torchrun's env
    model = load_checkpoint(path, device, experts=pc.experts)   # this rank's experts only
    engine = Engine(model, parallel=pc)

Under ``"tp"`` pass ``tp=(pc.rank, pc.world)`` to the loader as well: it then reads only the
rank's share of every attention layer (rows of ``q_b_proj`` and ``o_a_proj``, the sinks' entries,
columns of ``o_b_proj``; :meth:`Attention.head_share`). Or build a full model and keep a rank's
share with :func:`shard`, which keeps the same parts. MTP drafts run in lockstep too: every rank
calls :meth:`Engine.draft` after the same steps (``draft([])`` after an empty one). What is not
here yet: CUDA-graph capture of a parallel step (the exchange's split sizes are read on the host).
"""

from __future__ import annotations

import datetime
import os
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dsv4rs.model.config import V4Config
from dsv4rs.model.layers.attention import Attention
from dsv4rs.model.layers.moe import Experts
from dsv4rs.model.model import DeepseekV4

RECEIVED_KEPT = 4096
"""Calls whose pair counts an exchange keeps (``received``): the recent ones, so that a long run
does not grow a list a call at a time."""

DEFAULT_TIMEOUT = 300.0
"""Seconds a collective may wait for the other ranks before every rank's step fails."""


MODES = ("dp", "tp")
"""``"dp"``: data-parallel attention and expert-parallel MoE; ``"tp"``: tensor-parallel attention
and expert-parallel MoE over replicated tokens."""


class ParallelError(RuntimeError):
    """A collective did not complete: another rank died, or did not step within the timeout."""


@dataclass(frozen=True)
class ParallelConfig:
    """How ranks share the model.

    Attributes:
        world: number of ranks (processes).
        rank: this process's rank.
        expert_ranges: the routed experts each rank holds, contiguous and covering
            ``[0, n_routed_experts)`` in rank order (a rank may hold none).
        group: the ``torch.distributed`` process group (``None``: the default group).
        timeout: the group's collective timeout in seconds (for error messages).
        mode: ``"dp"`` (data-parallel attention, experts by all-to-all) or ``"tp"``
            (tensor-parallel attention, experts by all-reduce).
    """

    world: int
    rank: int
    expert_ranges: tuple[range, ...]
    group: Any = None
    timeout: float = DEFAULT_TIMEOUT
    mode: str = "dp"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {self.mode!r}")
        if isinstance(self.world, bool) or not isinstance(self.world, int) or self.world < 1:
            raise ValueError(f"world: expected an int >= 1, got {self.world!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 0 <= self.rank < self.world:
            raise ValueError(f"rank: expected an int in [0, {self.world}), got {self.rank!r}")
        if not isinstance(self.timeout, (int, float)) or isinstance(self.timeout, bool) or not self.timeout > 0:
            raise ValueError(f"timeout: expected a number of seconds > 0, got {self.timeout!r}")
        if isinstance(self.expert_ranges, range) or not isinstance(self.expert_ranges, Sequence):
            raise ValueError(f"expert_ranges: expected one range per rank, got {self.expert_ranges!r}")
        ranges = tuple(self.expert_ranges)
        if len(ranges) != self.world:
            raise ValueError(f"expert_ranges: expected one range per rank ({self.world}), got {len(ranges)}")
        at = 0
        for r, held in enumerate(ranges):
            if not isinstance(held, range) or held.step != 1 or held.start != at or held.stop < held.start:
                raise ValueError(f"expert_ranges: rank {r}'s range must be contiguous and start at {at}, got {held!r}")
            at = held.stop
        object.__setattr__(self, "expert_ranges", ranges)

    @classmethod
    def even(cls, cfg: V4Config, world: int, rank: int, group: Any = None, timeout: float = DEFAULT_TIMEOUT,
             mode: str = "dp") -> ParallelConfig:
        """The experts split as evenly as possible: rank ``r`` holds
        ``[E r // world, E (r + 1) // world)``."""
        if isinstance(world, bool) or not isinstance(world, int) or world < 1:
            raise ValueError(f"world: expected an int >= 1, got {world!r}")
        e = cfg.n_routed_experts
        ranges = tuple(range(e * r // world, e * (r + 1) // world) for r in range(world))
        return cls(world, rank, ranges, group, timeout, mode)

    @property
    def experts(self) -> range:
        """This rank's routed experts."""
        return self.expert_ranges[self.rank]

    @property
    def num_experts(self) -> int:
        """Routed experts over all ranks."""
        return self.expert_ranges[-1].stop


def init(cfg: V4Config, backend: str | None = None, timeout: float = DEFAULT_TIMEOUT,
         expert_ranges: Sequence[range] | None = None, mode: str = "dp") -> ParallelConfig:
    """Joins the default process group (from torchrun's environment: ``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``) if it is not joined yet, and returns this rank's
    :class:`ParallelConfig`. ``backend``: ``"nccl"`` when CUDA is available, else ``"gloo"``. On
    a GPU, call ``torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))`` first."""
    import torch.distributed as dist

    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
        raise ValueError(f"timeout: expected a number of seconds > 0, got {timeout!r}")
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ValueError(f"init: {', '.join(missing)} not set; launch with torchrun, or call "
                             "torch.distributed.init_process_group yourself")
        dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"),
                                timeout=datetime.timedelta(seconds=timeout))
    world, rank = dist.get_world_size(), dist.get_rank()
    if expert_ranges is None:
        return ParallelConfig.even(cfg, world, rank, timeout=timeout, mode=mode)
    pc = ParallelConfig(world, rank, tuple(expert_ranges), timeout=timeout, mode=mode)
    _check_covers(pc, cfg, "expert_ranges")
    return pc


def _check_covers(pc: ParallelConfig, cfg: V4Config, name: str) -> None:
    """The ranks' expert ranges cover the model's routed experts (ValueError naming ``name``)."""
    if pc.num_experts != cfg.n_routed_experts:
        raise ValueError(f"{name}: the expert ranges cover {pc.num_experts} experts, the model has "
                         f"{cfg.n_routed_experts}")


def _all_experts(model: DeepseekV4) -> list[Experts]:
    return [m for m in model.modules() if isinstance(m, Experts)]


def shard(model: DeepseekV4, pc: ParallelConfig) -> DeepseekV4:
    """Keeps only this rank's share of a model that holds every weight (in place): its routed
    experts (dense or quantized), and under ``"tp"`` its attention heads and output groups
    (a quantized weight with the scales covering its part, which must start and end on its
    scale blocks: 128 values for FP8; ValueError naming ``pc`` otherwise, before anything is
    cut); then attaches the collectives (:func:`attach`)."""
    cfg = model.config
    _check_covers(pc, cfg, "pc")  # before anything is cut
    if model.experts != range(cfg.n_routed_experts):
        raise ValueError(f"model: holds experts {model.experts}, not all of them; build it with experts=pc.experts")
    if pc.mode == "tp" and cfg.o_groups % pc.world:
        raise ValueError(f"pc: tensor-parallel attention splits the {cfg.o_groups} output groups (o_groups) over the "
                         f"ranks, which {pc.world} does not divide")
    if pc.mode == "tp":
        for attn in _all_attention(model):  # quantized weights cut on their scale blocks only
            try:
                attn.check_share(pc.rank, pc.world)
            except ValueError as e:
                raise ValueError(f"pc: tensor-parallel attention over {pc.world} ranks cuts {e}; load the model with "
                                 f"quantized=False to split dequantized weights") from None
    held = pc.experts
    with torch.no_grad():
        for ex in _all_experts(model):
            ex.keep(held)
        if pc.mode == "tp":
            for attn in _all_attention(model):  # the split load_checkpoint(tp=...) reads
                attn.keep_heads(pc.rank, pc.world)
    model.experts = held
    return attach(model, pc)


def attach(model: DeepseekV4, pc: ParallelConfig) -> DeepseekV4:
    """Makes every MoE layer of ``model`` (which holds ``pc.experts``) exchange its pairs with the
    other ranks; returns ``model``."""
    if model.experts != pc.experts:
        raise ValueError(f"model: holds experts {model.experts}, but rank {pc.rank} owns {pc.experts}")
    _check_covers(pc, model.config, "pc")
    device = model.lm_head.weight.device
    if pc.mode == "tp":
        reduce = AllReduce(pc, CommTimer())
        for attn in _all_attention(model):
            if attn.heads * pc.world != model.config.num_attention_heads:
                raise ValueError(f"model: its attention holds {attn.heads} of {model.config.num_attention_heads} "
                                 f"heads, not a tensor-parallel share over {pc.world} ranks; build it with shard()")
            attn.reduce = reduce
        exchange: ExpertExchange | ReplicatedExperts = ReplicatedExperts(pc, reduce)
    else:
        exchange = ExpertExchange(pc, device)
    for ex in _all_experts(model):
        ex.exchange = exchange
    return model


def _all_attention(model: DeepseekV4) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


def _failed(pc: ParallelConfig, what: str, e: BaseException) -> ParallelError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ParallelError(f"rank {pc.rank}: {what} did not complete: another rank died or did not step within the "
                         f"timeout ({pc.timeout:g} s) [{first}]")


class CommTimer:
    """Seconds spent in this process's collectives, when ``enabled`` (a benchmark's switch: on a
    GPU each collective is then bracketed by device synchronizations)."""

    def __init__(self) -> None:
        self.enabled, self.seconds = False, 0.0

    def __enter__(self) -> CommTimer:
        if self.enabled:
            _sync()
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            _sync()
            self.seconds += time.perf_counter() - self._t0


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timer(model: DeepseekV4) -> CommTimer:
    """The collectives' timer of an attached model (one per model)."""
    ex = _all_experts(model)[0].exchange
    if ex is None:
        raise ValueError("model: not attached to other ranks (dsv4rs.parallel.attach)")
    return ex.timer


class AllReduce:
    """Sums a tensor over the ranks in place (float32 on the wire for lower precisions)."""

    def __init__(self, pc: ParallelConfig, comm: CommTimer) -> None:
        self.pc, self.timer = pc, comm

    def __call__(self, t: torch.Tensor, what: str = "the attention output's all-reduce") -> torch.Tensor:
        import torch.distributed as dist

        wide = t.float() if t.dtype != torch.float32 and t.dtype != torch.float64 else t.contiguous()
        try:
            with self.timer:
                dist.all_reduce(wide, group=self.pc.group)
        except (RuntimeError, ValueError) as e:
            raise _failed(self.pc, what, e) from None
        return wide.to(t.dtype)


class ReplicatedExperts:
    """The MoE under tensor parallelism: every rank holds every token, runs the pairs whose
    experts it holds, and an all-reduce sums the partial results (float32). ``received`` counts
    the pairs this rank ran, per call (the last :data:`RECEIVED_KEPT` calls).

    The pairs' counts stay on the device until ``received`` is read, and with MXFP4 experts
    nothing in the call waits for the host (:meth:`Experts.held_sum`)."""

    def __init__(self, pc: ParallelConfig, reduce: AllReduce) -> None:
        self.pc, self.reduce, self.timer = pc, reduce, reduce.timer
        self._received: deque[torch.Tensor] = deque(maxlen=RECEIVED_KEPT)

    @property
    def received(self) -> list[int]:
        """Pairs this rank ran, per call, oldest first (reading them waits for the device)."""
        return [int(n) for n in self._received]

    def __call__(self, experts: Experts, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        self._received.append(experts.holds(idx).sum())
        return self.reduce(experts.held_sum(x, idx, weights), "the MoE's all-reduce").to(x.dtype)


class ExpertExchange:
    """The MoE layers' all-to-all: a rank's (token, choice) pairs to their experts' owners and
    the results back. ``received`` counts the pairs this rank's experts ran, per call (the last
    :data:`RECEIVED_KEPT` calls; a rank whose experts no pair chose runs none and still takes part)."""

    def __init__(self, pc: ParallelConfig, device: torch.device) -> None:
        self.pc, self.timer = pc, CommTimer()
        owner = torch.empty(pc.num_experts, dtype=torch.int64)
        for r, held in enumerate(pc.expert_ranges):
            owner[held.start : held.stop] = r
        self.owner = owner.to(device)
        self.received: deque[int] = deque(maxlen=RECEIVED_KEPT)

    def _all_to_all(self, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int] | None,
                    in_splits: list[int] | None, what: str) -> None:
        import torch.distributed as dist

        try:
            with self.timer:
                dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.pc.group)
        except (RuntimeError, ValueError) as e:  # DistBackendError and gloo's errors are RuntimeErrors
            raise _failed(self.pc, f"the MoE exchange ({what})", e) from None

    def __call__(self, experts: Experts, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``sum_k weights[t, k] expert_{idx[t, k]}(x_t)`` with the experts spread over the ranks.
        Three exchanges: the pair counts, the pairs (each row with its expert id in one message),
        the results."""
        tokens, k = idx.shape
        d = x.shape[-1]
        flat = idx.flatten()
        dest = self.owner[flat]
        order = torch.argsort(dest, stable=True)
        send = torch.bincount(dest, minlength=self.pc.world)
        recv = torch.empty_like(send)
        self._all_to_all(recv, send, None, None, "pair counts")
        send_n, recv_n = send.tolist(), recv.tolist()
        pairs = pack_rows(x, order // k, flat[order])
        got = pairs.new_empty(sum(recv_n), pairs.shape[1])
        self._all_to_all(got, pairs, recv_n, send_n, "token rows and expert ids")
        in_rows, in_ids = unpack_rows(got, x.dtype, d)
        self.received.append(len(in_ids))
        ran = experts.local(in_rows, in_ids - experts.first)
        back = x.new_empty(tokens * k, d)
        self._all_to_all(back, ran.to(x.dtype).contiguous(), send_n, recv_n, "expert outputs")
        y = torch.empty_like(back).index_copy_(0, order, back).view(tokens, k, d)
        return (y.float() * weights[..., None].float()).sum(1).to(x.dtype)


ID_BYTES = 8
"""Bytes of an expert id (int64) at the end of a packed row (:func:`pack_rows`)."""


def pack_rows(x: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``uint8 [n, d * itemsize + 8]``: row ``rows[i]`` of ``x`` ``[T, d]``, its bytes as they are,
    then ``ids[i]`` (int64), so that one exchange carries both (:func:`unpack_rows` undoes it)."""
    width = x.shape[1] * x.element_size()
    out = torch.empty(rows.shape[0], width + ID_BYTES, dtype=torch.uint8, device=x.device)
    out[:, :width] = x.contiguous().view(torch.uint8)[rows]
    out[:, width:] = ids.to(torch.int64).contiguous().view(torch.uint8).view(-1, ID_BYTES)
    return out


def unpack_rows(packed: torch.Tensor, dtype: torch.dtype, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows (``dtype [n, d]``) and ids (``int64 [n]``) of :func:`pack_rows`' output, bit for bit."""
    n, width = packed.shape[0], packed.shape[1] - ID_BYTES
    rows = torch.empty(n, d, dtype=dtype, device=packed.device)
    ids = torch.empty(n, dtype=torch.int64, device=packed.device)
    rows.view(torch.uint8).copy_(packed[:, :width])
    ids.view(torch.uint8).view(n, ID_BYTES).copy_(packed[:, width:])
    return rows, ids
