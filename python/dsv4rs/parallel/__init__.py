"""Several processes, one model: data-parallel attention and expert-parallel MoE over
``torch.distributed`` (NCCL between GPUs, gloo between CPU processes).

- **Data-parallel attention.** Each rank runs its own :class:`dsv4rs.runtime.Engine`: its own
  sequences, its own :class:`dsv4rs.cache.KVCacheManager` and cache pools, and a full copy of
  every weight but the routed experts. Attention, compressors and indexer run locally.
- **Expert-parallel MoE.** Rank ``r`` holds the routed experts ``ParallelConfig.expert_ranges[r]``
  (contiguous, by default an even split). In every MoE layer each rank sends each (token,
  choice) pair's row to the rank that holds its expert, the owners run the experts, and the
  results come back (``all_to_all_single`` with variable splits, twice); the router and the shared
  expert run where the token lives. A token's result is its choices' outputs times their routing
  weights, summed in routing order.

Every rank calls :meth:`Engine.step` the same number of times, in the same order: a rank with
nothing to run steps an empty batch (``engine.step([], [])``), which takes part in the MoE layers'
exchanges with no tokens of its own. A rank that dies, or stops stepping, ends every other rank's
step with :class:`ParallelError` within the process group's timeout (no hang).

Launch with ``torchrun --nproc-per-node N script.py`` and, in the script::

    pc = parallel.init(cfg)                                     # the process group, from torchrun's env
    model = load_checkpoint(path, device, experts=pc.experts)   # this rank's experts only
    engine = Engine(model, parallel=pc)

or build a full model and keep a rank's share with :func:`shard`. What is not here yet: tensor-
parallel attention, MTP drafts under expert parallelism, and CUDA-graph capture of a parallel
step (the exchange's split sizes are read on the host).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dsv4rs.model.config import V4Config
from dsv4rs.model.layers.moe import Experts
from dsv4rs.model.model import DeepseekV4

DEFAULT_TIMEOUT = 300.0
"""Seconds a collective may wait for the other ranks before every rank's step fails."""


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
    """

    world: int
    rank: int
    expert_ranges: tuple[range, ...]
    group: Any = None
    timeout: float = DEFAULT_TIMEOUT

    def __post_init__(self) -> None:
        if isinstance(self.world, bool) or not isinstance(self.world, int) or self.world < 1:
            raise ValueError(f"world: expected an int >= 1, got {self.world!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 0 <= self.rank < self.world:
            raise ValueError(f"rank: expected an int in [0, {self.world}), got {self.rank!r}")
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
    def even(cls, cfg: V4Config, world: int, rank: int, group: Any = None,
             timeout: float = DEFAULT_TIMEOUT) -> ParallelConfig:
        """The experts split as evenly as possible: rank ``r`` holds
        ``[E r // world, E (r + 1) // world)``."""
        if isinstance(world, bool) or not isinstance(world, int) or world < 1:
            raise ValueError(f"world: expected an int >= 1, got {world!r}")
        e = cfg.n_routed_experts
        return cls(world, rank, tuple(range(e * r // world, e * (r + 1) // world) for r in range(world)), group, timeout)

    @property
    def experts(self) -> range:
        """This rank's routed experts."""
        return self.expert_ranges[self.rank]

    @property
    def num_experts(self) -> int:
        return self.expert_ranges[-1].stop


def init(cfg: V4Config, backend: str | None = None, timeout: float = DEFAULT_TIMEOUT,
         expert_ranges: Sequence[range] | None = None) -> ParallelConfig:
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
        return ParallelConfig.even(cfg, world, rank, timeout=timeout)
    pc = ParallelConfig(world, rank, tuple(expert_ranges), timeout=timeout)
    if pc.num_experts != cfg.n_routed_experts:
        raise ValueError(f"expert_ranges: cover {pc.num_experts} experts, the model has {cfg.n_routed_experts}")
    return pc


def _all_experts(model: DeepseekV4) -> list[Experts]:
    return [m for m in model.modules() if isinstance(m, Experts)]


def shard(model: DeepseekV4, pc: ParallelConfig) -> DeepseekV4:
    """Keeps only this rank's routed experts of a model that holds all of them (in place), and
    attaches the exchange (:func:`attach`)."""
    if pc.num_experts != model.config.n_routed_experts:
        raise ValueError(f"pc: its expert ranges cover {pc.num_experts} experts, the model has "
                         f"{model.config.n_routed_experts}")
    if model.experts != range(model.config.n_routed_experts):
        raise ValueError(f"model: holds experts {model.experts}, not all of them; build it with experts=pc.experts")
    held = pc.experts
    with torch.no_grad():
        for ex in _all_experts(model):
            ex.gate_up_proj = torch.nn.Parameter(ex.gate_up_proj[held.start : held.stop].clone(), requires_grad=False)
            ex.down_proj = torch.nn.Parameter(ex.down_proj[held.start : held.stop].clone(), requires_grad=False)
            ex.first = held.start
    model.experts = held
    return attach(model, pc)


def attach(model: DeepseekV4, pc: ParallelConfig) -> DeepseekV4:
    """Makes every MoE layer of ``model`` (which holds ``pc.experts``) exchange its pairs with the
    other ranks; returns ``model``."""
    if model.experts != pc.experts:
        raise ValueError(f"model: holds experts {model.experts}, but rank {pc.rank} owns {pc.experts}")
    if pc.num_experts != model.config.n_routed_experts:
        raise ValueError(f"pc: its expert ranges cover {pc.num_experts} experts, the model has "
                         f"{model.config.n_routed_experts}")
    device = model.lm_head.weight.device
    exchange = ExpertExchange(pc, device)
    for ex in _all_experts(model):
        ex.exchange = exchange
    return model


class ExpertExchange:
    """The MoE layers' all-to-all: a rank's (token, choice) pairs to their experts' owners and
    the results back. ``received`` counts the pairs this rank's experts ran, per call (a rank
    whose experts no pair chose runs none and still takes part)."""

    def __init__(self, pc: ParallelConfig, device: torch.device) -> None:
        self.pc = pc
        owner = torch.empty(pc.num_experts, dtype=torch.int64)
        for r, held in enumerate(pc.expert_ranges):
            owner[held.start : held.stop] = r
        self.owner = owner.to(device)
        self.received: list[int] = []

    def _all_to_all(self, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int] | None,
                    in_splits: list[int] | None, what: str) -> None:
        import torch.distributed as dist

        try:
            dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.pc.group)
        except (RuntimeError, ValueError) as e:  # DistBackendError and gloo's errors are RuntimeErrors
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ParallelError(
                f"rank {self.pc.rank}: the MoE exchange ({what}) did not complete: another rank died or did not "
                f"step within the timeout ({self.pc.timeout:g} s) [{first}]") from None

    def __call__(self, experts: Experts, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``sum_k weights[t, k] expert_{idx[t, k]}(x_t)`` with the experts spread over the ranks."""
        tokens, k = idx.shape
        d = x.shape[-1]
        flat = idx.flatten()
        dest = self.owner[flat]
        order = torch.argsort(dest, stable=True)
        send = torch.bincount(dest, minlength=self.pc.world)
        recv = torch.empty_like(send)
        self._all_to_all(recv, send, None, None, "pair counts")
        send_n, recv_n = send.tolist(), recv.tolist()
        rows = x[order // k].contiguous()
        ids = flat[order].contiguous()
        in_rows = x.new_empty(sum(recv_n), d)
        in_ids = ids.new_empty(sum(recv_n))
        self._all_to_all(in_rows, rows, recv_n, send_n, "token rows")
        self._all_to_all(in_ids, ids, recv_n, send_n, "expert ids")
        self.received.append(len(in_ids))
        ran = experts.local(in_rows, in_ids - experts.first)
        back = x.new_empty(tokens * k, d)
        self._all_to_all(back, ran.to(x.dtype).contiguous(), send_n, recv_n, "expert outputs")
        y = torch.empty_like(back).index_copy_(0, order, back).view(tokens, k, d)
        return (y.float() * weights[..., None].float()).sum(1).to(x.dtype)
