"""Several processes, one model: data-parallel attention and expert-parallel MoE over
``torch.distributed`` (NCCL between GPUs, gloo between CPU processes).

- **Data-parallel attention.** Each rank runs its own :class:`dsv4rs.runtime.Engine`: its own
  sequences, its own :class:`dsv4rs.cache.KVCacheManager` and cache pools, and a full copy of
  every weight but the routed experts. Attention, compressors and indexer run locally.
- **Expert-parallel MoE.** Rank ``r`` holds the routed experts ``ParallelConfig.expert_ranges[r]``
  (contiguous, by default an even split). In every MoE layer each rank sends each token's row,
  once, to every rank that holds one of its experts, with its expert ids and routing weights; an
  owner runs the choices it holds and sends back their weighted sum (float32), and the token adds
  the ranks' sums; the router and the shared expert run where the token lives. The ranks agree
  on each step first, on the host (one all-reduce of a few integers over a gloo group): when
  every rank runs at most :data:`FIXED_MAX_TOKENS` tokens (decode steps, MTP verification steps,
  short prefill chunks), the exchanges of the step and of the MTP draft after it take a fixed form
  (``all_to_all_single`` of ``T`` slots per pair of ranks, ``T`` the most tokens any rank runs:
  slot ``t`` token ``t``'s row, ids and weights, past a rank's tokens ids -1, then the sums) that
  reads nothing on the host; otherwise a variable one (the row counts first, read on the host,
  then exactly the rows and the sums). See :class:`ExpertExchange`.

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
calls :meth:`Engine.draft` after the same steps (``draft([])`` after an empty one).

**CUDA graphs.** With ``Engine(..., cuda_graphs=True)`` (a parallel engine steps eagerly by
default: the NCCL capture is new) a parallel engine on GPUs replays its decode steps from CUDA
graphs as one process does (:mod:`dsv4rs.runtime.graphs`), the collectives captured with the
layers (NCCL records them in the graph). Under ``"dp"`` a step replays when every rank decodes
and the largest batch fits a bucket: every rank replays that bucket, a rank with fewer sequences
padding to it (one with none on padding rows alone, which route to no expert), so the exchanges'
fixed form has one slot a row of the bucket on every rank; the agreement before each step checks
that the ranks hold the same buckets.
Under ``"tp"`` the ranks run the same batches, so the same buckets; before a bucket's capture
they check it on the host. A capture runs the step once first, collectives included, so the
ranks capture together: on the step that first needs a bucket, or all at once by
:meth:`Engine.capture_graphs` on every rank. Other steps (prefill, mixed, larger batches) run
eagerly. The ``received`` counts and the :class:`CommTimer` see eager calls only.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
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
        group: the ``torch.distributed`` process group (``None``: the default group). Under
            ``"dp"`` over NCCL the steps agree over a gloo group of the same ranks, which every
            process of the default group takes part in making: with a smaller group, call
            :func:`control_group` ``(group)`` on every process before the first step.
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


def collective(pc: ParallelConfig, what: str, call: Callable[[], Any]) -> Any:
    """``call()`` (a ``torch.distributed`` collective); its failure raises :class:`ParallelError`
    naming this rank and ``what`` (DistBackendError and gloo's errors are RuntimeErrors)."""
    try:
        return call()
    except (RuntimeError, ValueError) as e:
        raise _failed(pc, what, e) from None


class CommTimer:
    """Seconds spent in this process's collectives, and the bytes it put into them (``sent``: an
    all-to-all's input, an all-reduce's tensor), when ``enabled`` (a benchmark's switch: on a GPU
    each collective is then bracketed by device synchronizations)."""

    def __init__(self) -> None:
        self.enabled, self.seconds, self.sent = False, 0.0, 0
        self._timing = False

    def count(self, t: torch.Tensor) -> None:
        """Adds ``t``'s bytes to :attr:`sent` (when enabled)."""
        if self.enabled and not capturing():
            self.sent += t.numel() * t.element_size()

    def __enter__(self) -> CommTimer:
        self._timing = self.enabled and not capturing()  # a graph's capture runs nothing to time
        if self._timing:
            _sync()
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timing:
            _sync()
            self.seconds += time.perf_counter() - self._t0


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def capturing() -> bool:
    """Whether this thread's current CUDA stream is capturing a graph (then a call records work
    for later replays: nothing to count or time now)."""
    return torch.cuda.is_available() and torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


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
        self.timer.count(wide)
        with self.timer:
            collective(self.pc, what, lambda: dist.all_reduce(wide, group=self.pc.group))
        return wide.to(t.dtype)


class ReplicatedExperts:
    """The MoE under tensor parallelism: every rank holds every token, runs the pairs whose
    experts it holds, and an all-reduce sums the partial results (float32). ``received`` counts
    the pairs this rank ran, per call run eagerly (the last :data:`RECEIVED_KEPT` calls; a call
    captured in a CUDA graph, and so its replays, adds none).

    The pairs' counts stay on the device until ``received`` is read, and with MXFP4 experts
    nothing in the call waits for the host (:meth:`Experts.held_sum`), nor with bfloat16 ones."""

    def __init__(self, pc: ParallelConfig, reduce: AllReduce) -> None:
        self.pc, self.reduce, self.timer = pc, reduce, reduce.timer
        self._received: deque[torch.Tensor] = deque(maxlen=RECEIVED_KEPT)

    @property
    def received(self) -> list[int]:
        """Pairs this rank ran, per call, oldest first (reading them waits for the device)."""
        return [int(n) for n in self._received]

    def __call__(self, experts: Experts, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if not capturing():
            self._received.append(experts.holds(idx).sum())
        return self.reduce(experts.held_sum(x, idx, weights), "the MoE's all-reduce").to(x.dtype)


FIXED_MAX_TOKENS = 256
"""Most tokens per rank a step may exchange in the fixed form (:class:`ExpertExchange`): decode
steps of up to this many sequences (the largest CUDA-graph bucket), MTP verification steps and
prefill chunks of up to this many tokens."""


_CONTROL: list[tuple[Any, Any]] = []
"""``(group, its gloo twin)`` made by :func:`control_group` (the default group as
``torch.distributed.group.WORLD``)."""


def control_group(group: Any = None) -> Any:
    """A gloo group over the ranks of ``group`` (``None``: the default group) for the host's
    agreement on each step (:meth:`ExpertExchange.agree`): ``group`` itself if it is gloo's, else
    a new one. Making one is a collective call: every process of the default group makes it, in
    the same order. With the default group, the ranks' first step does; with a smaller group
    over NCCL, call this on every process (members or not) before the first step: the twin is
    kept, and the steps take it."""
    import torch.distributed as dist

    if not dist.is_initialized():
        raise ValueError("group: the process group is not initialized (dsv4rs.parallel.init)")
    if "gloo" in str(dist.get_backend(group)):
        return group
    key = dist.group.WORLD if group is None else group
    for known, twin in _CONTROL:
        if known is key:
            return twin
    twin = dist.new_group(ranks=None if group is None else dist.get_process_group_ranks(group), backend="gloo")
    _CONTROL.append((key, twin))
    return twin


def host_max(pc: ParallelConfig, values: Sequence[int], what: str) -> list[int]:
    """The element-wise maximum of ``values`` (ints) over the ranks, on the host (one all-reduce
    over :func:`control_group`; every rank calls it at the same point). ``what`` names it in
    the :class:`ParallelError` of a rank that does not."""
    import torch.distributed as dist

    t = torch.tensor(list(values), dtype=torch.int64)
    collective(pc, what, lambda: dist.all_reduce(t, op=dist.ReduceOp.MAX, group=control_group(pc.group)))
    return t.tolist()


@dataclass(frozen=True)
class Agreed:
    """What the ranks agreed on for a step (:meth:`ExpertExchange.agree`).

    Attributes:
        tokens: the fixed form's tokens per rank (the most any rank runs) when every rank runs
            at most :data:`FIXED_MAX_TOKENS` and some rank runs any; ``None``: the variable form.
        decode: whether every rank runs a decode step (one token a sequence, or none).
        most: the most tokens any rank runs.
    """

    tokens: int | None
    decode: bool
    most: int


class ExpertExchange:
    """The MoE layers' all-to-all. A token's row goes once to each rank that holds any of its
    experts, with all ``k`` of its expert ids and routing weights; the owner runs the choices it
    holds (:meth:`Experts.held_sum`, one call) and sends back their weighted sum in float32, and
    the token adds the ranks' sums in rank order. ``received`` counts the pairs this rank's
    experts ran, per call run eagerly (the last :data:`RECEIVED_KEPT` calls; none for a call
    captured in a CUDA graph, and so its replays; a rank whose experts no pair
    chose runs none and still takes part).

    Two forms, the same sums:

    - **Variable** (``tokens`` is ``None``): three exchanges, the rows' counts, then exactly the
      rows (each token to the ranks holding its choices) and the sums. The counts are read on the
      host, to size the next two.
    - **Fixed** (``tokens = T``, set by the engine for a step, and the MTP draft after it, in
      which every rank runs at most ``T`` tokens: :meth:`agree`): two exchanges of ``T`` slots per
      pair of ranks, slot ``t`` of every rank's block holding token ``t`` (past a rank's tokens,
      a row of no expert), then the sums of every slot; the receiver runs only the choices it
      holds. Nothing is read on the host, so the step could be captured in a CUDA graph. The
      wire carries ``world T`` rows each way: a row and ``k`` ids and weights out, a float32 sum
      back (a row for each (token, choice) pair would be ``world T k``).

    A pair of expert id -1 (a hash layer's table entry outside the experts) goes nowhere and adds
    nothing."""

    def __init__(self, pc: ParallelConfig, device: torch.device) -> None:
        self.pc, self.timer = pc, CommTimer()
        owner = torch.empty(pc.num_experts, dtype=torch.int64)
        for r, held in enumerate(pc.expert_ranges):
            owner[held.start : held.stop] = r
        self.owner = owner.to(device)
        self.tokens: int | None = None
        self.live: torch.Tensor | None = None
        """Which rows of the calls are tokens (bool ``[T]`` on the device; ``None``: all): the
        others, a replayed graph's padding rows, route to no expert."""
        self._received: deque[int | torch.Tensor] = deque(maxlen=RECEIVED_KEPT)

    @property
    def received(self) -> list[int]:
        """Pairs this rank's experts ran, per call, oldest first (reading them waits for the device)."""
        return [int(n) for n in self._received]

    def agree(self, tokens: int, decode: bool, buckets: Sequence[int] = ()) -> Agreed:
        """This step on every rank, agreed on the host before it runs: one all-reduce of four
        integers over a gloo group (:func:`host_max`; :func:`control_group` makes it at the first
        call, on every rank alike since every rank steps). ``tokens``: this rank's (0 for an
        empty step); ``decode``: whether its step is a decode step (one token a sequence; an empty
        one is); ``buckets``:
        the CUDA-graph buckets this rank replays (none: ``()``), which must be every rank's
        (ValueError on every rank otherwise: the ranks would replay different exchanges)."""
        sig = zlib.crc32(repr(tuple(buckets)).encode())
        with self.timer:
            prefill, most, high, low = host_max(self.pc, [0 if decode else 1, tokens, sig, -sig],
                                                "the step's agreement")
        if high != -low:
            raise ValueError("cuda_graphs: the ranks replay different graph buckets (every rank needs the same "
                             "cuda_graphs, graph_buckets and max_sequences)")
        return Agreed(most if 0 < most <= FIXED_MAX_TOKENS else None, not prefill, most)

    def _all_to_all(self, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int] | None,
                    in_splits: list[int] | None, what: str) -> None:
        import torch.distributed as dist

        self.timer.count(inp)
        with self.timer:
            collective(self.pc, f"the MoE exchange ({what})",
                       lambda: dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.pc.group))

    @contextlib.contextmanager
    def rows(self, tokens: int | None, live: torch.Tensor | None = None) -> Iterator[None]:
        """The calls inside take the fixed form of ``tokens`` slots (``None``: the variable form)
        and route only the ``live`` rows (:attr:`live`); the form before is restored after."""
        before = self.tokens, self.live
        self.tokens, self.live = tokens, live
        try:
            yield
        finally:
            self.tokens, self.live = before

    def __call__(self, experts: Experts, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``sum_k weights[t, k] expert_{idx[t, k]}(x_t)`` with the experts spread over the ranks:
        each rank's choices of a token summed in float32 by the rank that holds them, the ranks'
        sums added in rank order."""
        tokens = idx.shape[0]
        if self.tokens is not None and tokens > self.tokens:
            raise RuntimeError(f"the MoE exchange: {tokens} tokens in a step every rank agreed to keep within "
                               f"{self.tokens}")
        if self.live is not None:
            if self.live.shape != (tokens,):
                raise RuntimeError(f"the MoE exchange: {tokens} tokens, but live rows for {tuple(self.live.shape)}")
            idx = torch.where(self.live[:, None], idx, -1)
        form = self._variable if self.tokens is None else self._fixed
        sums = form(experts, x, idx, pack_rows(x, idx, weights))
        return sums.sum(0).to(x.dtype)

    def _held(self, experts: Experts, got: torch.Tensor, dtype: torch.dtype, d: int, k: int) -> torch.Tensor:
        """The received rows through the choices this rank holds: their weighted sums, float32."""
        rows, ids, weights = unpack_rows(got, dtype, d, k)
        if not capturing():
            self._received.append(experts.holds(ids).sum())
        return experts.held_sum(rows, ids, weights).contiguous()

    def _variable(self, experts: Experts, x: torch.Tensor, idx: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        """The ranks' sums ``float32 [world, T, d]`` (zero where a rank holds none of a token's
        choices): the rows' counts read on the host."""
        world, (tokens, k), d = self.pc.world, idx.shape, x.shape[1]
        dest = self.owner[idx.clamp(min=0)]
        goes = ((dest[..., None] == torch.arange(world, device=idx.device)) & (idx >= 0)[..., None]).any(1).T
        send = goes.sum(1)
        recv = torch.empty_like(send)
        self._all_to_all(recv, send, None, None, "row counts")
        send_n, recv_n = send.tolist(), recv.tolist()
        rank, token = goes.nonzero().T  # rank r's rows in rank, then token, order
        got = packed.new_empty(sum(recv_n), packed.shape[1])
        self._all_to_all(got, packed[token], recv_n, send_n, "token rows, expert ids and weights")
        ran = self._held(experts, got, x.dtype, d, k)
        back = ran.new_empty(token.shape[0], d)
        self._all_to_all(back, ran, send_n, recv_n, "expert sums")
        return ran.new_zeros(world * tokens, d).index_copy_(0, rank * tokens + token, back).view(world, tokens, d)

    def _fixed(self, experts: Experts, x: torch.Tensor, idx: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        """The ranks' sums ``float32 [world, T, d]`` through :attr:`tokens` slots per pair of ranks:
        the same rows to every rank, slot ``t`` token ``t``."""
        world, slots, (tokens, k), d = self.pc.world, self.tokens, idx.shape, x.shape[1]
        send = packed.new_zeros(world, slots, packed.shape[1])
        width = d * x.element_size()
        send[:, tokens:, width : width + 4 * k] = 255  # past the tokens: ids -1, no expert
        send[:, :tokens] = packed
        got = torch.empty_like(send).view(world * slots, -1)
        self._all_to_all(got, send.view(world * slots, -1), None, None, "token rows, expert ids and weights")
        ran = self._held(experts, got, x.dtype, d, k)
        back = torch.empty_like(ran)
        self._all_to_all(back, ran, None, None, "expert sums")
        return back.view(world, slots, d)[:, :tokens]


def pack_rows(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``uint8 [T, d * itemsize + 8 k]``: row ``t`` of ``x`` ``[T, d]``, its bytes as they are, then
    its ``k`` expert ids ``idx[t]`` (int32) and routing weights ``weights[t]`` (float32), so that
    one exchange carries all three (:func:`unpack_rows` undoes it)."""
    (tokens, k), width = idx.shape, x.shape[1] * x.element_size()
    out = torch.empty(tokens, width + 8 * k, dtype=torch.uint8, device=x.device)
    out[:, :width] = x.contiguous().view(torch.uint8)
    out[:, width : width + 4 * k] = idx.to(torch.int32).contiguous().view(torch.uint8)
    out[:, width + 4 * k :] = weights.to(torch.float32).contiguous().view(torch.uint8)
    return out


def unpack_rows(packed: torch.Tensor, dtype: torch.dtype, d: int, k: int) -> tuple[torch.Tensor, ...]:
    """The rows (``dtype [n, d]``), expert ids (``int64 [n, k]``) and weights (``float32 [n, k]``)
    of :func:`pack_rows`' output, bit for bit."""
    n, width = packed.shape[0], d * dtype.itemsize
    if packed.shape[1] != width + 8 * k:
        raise ValueError(f"packed: rows of {packed.shape[1]} bytes, not the {width + 8 * k} of {d} {dtype} "
                         f"values and {k} ids and weights")
    rows = torch.empty(n, d, dtype=dtype, device=packed.device)
    ids = torch.empty(n, k, dtype=torch.int32, device=packed.device)
    weights = torch.empty(n, k, dtype=torch.float32, device=packed.device)
    rows.view(torch.uint8).copy_(packed[:, :width])
    ids.view(torch.uint8).copy_(packed[:, width : width + 4 * k])
    weights.view(torch.uint8).copy_(packed[:, width + 4 * k :])
    return rows, ids.long(), weights
