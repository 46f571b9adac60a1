"""Serving over several processes (``dsv4rs serve --world N``): rank 0 takes the requests and the
other ranks follow it, one lockstep step at a time.

- :class:`Leader` (rank 0) stands where the server's engine thread expects an :class:`~dsv4rs.LLM`
  (:class:`~dsv4rs.serve.worker.EngineWorker`): ``add_request``, ``abort``, ``step``,
  ``has_unfinished``, ``completion``, and the rest of the LLM's attributes. It gives each request
  a key and a rank to run on (under ``"dp"`` the rank with the fewest running requests; under
  ``"tp"`` every rank), and before each step broadcasts a :class:`Plan`: the requests to add and
  to abort.
- :func:`follow` (every other rank) receives each plan and does what rank 0 does with it
  (:class:`Ranks`): its adds and aborts, one :meth:`LLM.step` (so every rank steps together), and
  its deltas back to rank 0 (``gather_object``). Under ``"tp"`` every rank runs every request
  (drawing the same seeds) and rank 0's deltas are the ones delivered.
- While no request runs, rank 0 sends a plan that steps nothing every :data:`HEARTBEAT`
  seconds, so that the followers' wait stays within the process group's timeout; on shutdown it
  sends ``"stop"`` (:meth:`Leader.close`).

Plans and deltas travel over the gloo group of :func:`dsv4rs.parallel.control_group`; the
model's own collectives run on the process group (NCCL between GPUs).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

from dsv4rs.llm.outputs import Completion, Delta
from dsv4rs.llm.params import SamplingParams
from dsv4rs.parallel import collective

HEARTBEAT = 1.0
"""Seconds between rank 0's idle plans while no request runs."""


@dataclasses.dataclass
class Plan:
    """What rank 0 sends before a step. ``adds``: ``(key, rank, ids, params)``, the rank ``-1``
    for every rank (``"tp"``); ``aborts``: keys; ``command``: ``"step"``, ``"idle"`` (nothing to
    do: a heartbeat) or ``"stop"``."""

    adds: list[tuple[int, int, list[int], SamplingParams]]
    aborts: list[int]
    command: str = "step"


def _comm(llm) -> tuple[Any, int]:
    """The gloo group of the plans and the global rank of its first rank."""
    import torch.distributed as dist

    from dsv4rs.parallel import control_group

    group = control_group(llm.parallel.group)
    return group, 0 if group is None else dist.get_global_rank(group, 0)


class Ranks:
    """What every rank does with a :class:`Plan`: adds its requests and aborts them, steps (one
    lockstep :meth:`LLM.step`), and returns its deltas under the requests' keys (a finished
    request's completion comes with its last delta; the rank forgets it)."""

    def __init__(self, llm) -> None:
        self.llm, self.rid_of, self.key_of = llm, {}, {}
        self.added = 0  # requests this rank has run

    def apply(self, plan: Plan) -> list[Delta]:
        llm, rank = self.llm, self.llm.parallel.rank
        for key, owner, ids, params in plan.adds:
            if owner in (-1, rank):
                rid = llm.add_request(ids, params)
                self.rid_of[key], self.key_of[rid] = rid, key
                self.added += 1
        for key in plan.aborts:
            if key in self.rid_of:
                llm.abort(self.rid_of[key])
        out = []
        for d in llm.step():
            key = self.key_of[d.request_id]
            done = None
            if d.finished:
                done = dataclasses.replace(llm.completion(d.request_id), request_id=key)
                del self.rid_of[key], self.key_of[d.request_id]
            out.append(dataclasses.replace(d, request_id=key, completion=done))
        return out


class Leader:
    """Rank 0 of a parallel :class:`~dsv4rs.LLM`, as the server's engine thread drives an LLM
    (see the module docstring). Its request ids are the keys it gives."""

    def __init__(self, llm) -> None:
        pc = llm.parallel
        if pc is None or pc.rank != 0:
            raise ValueError("llm: a Leader needs rank 0 of a parallel LLM (LLM(..., parallel=pc))")
        self.llm, self.ranks = llm, Ranks(llm)
        self._group, self._root = _comm(llm)
        self._load = [0] * pc.world  # running requests per rank
        self._owner: dict[int, int] = {}
        self._next = 0
        self._adds: list[tuple[int, int, list[int], SamplingParams]] = []
        self._aborts: list[int] = []
        self._done: dict[int, Completion] = {}
        self._sent = time.monotonic()
        self._closed = False

    def __getattr__(self, name: str) -> Any:  # encode, tokenizer, max_len, model_name, engine, ...
        if name == "llm":  # not set yet (a copy or an unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.llm, name)

    def add_request(self, prompt: Sequence[int], params: SamplingParams | None = None) -> int:
        """Checks the request as :meth:`LLM.add_request` does (ValueError, nothing queued), gives
        it a key and a rank; it joins at the next step."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params: expected SamplingParams or None, got {type(params).__name__}")
        ids = self.llm.encode(prompt)
        self.llm.max_tokens(len(ids), params)
        key, self._next = self._next, self._next + 1
        owner = -1 if self.llm.parallel.mode == "tp" else min(range(len(self._load)), key=self._load.__getitem__)
        if owner >= 0:
            self._load[owner] += 1
        self._owner[key] = owner
        self._adds.append((key, owner, ids, params))
        return key

    def abort(self, key: int) -> None:
        """Ends a running request at the next step (an unknown or finished key is ignored)."""
        if key in self._owner and key not in self._aborts:
            self._aborts.append(key)

    def has_unfinished(self) -> bool:
        """Whether any request runs or waits to join; while none does, every :data:`HEARTBEAT`
        seconds, the followers get an idle plan."""
        busy = bool(self._owner)
        if not busy and not self._closed and time.monotonic() - self._sent > HEARTBEAT:
            self._send(Plan([], [], "idle"))
        return busy

    def step(self) -> list[Delta]:
        """One step on every rank: this step's adds and aborts, then every rank's deltas."""
        import torch.distributed as dist

        plan, self._adds, self._aborts = Plan(self._adds, self._aborts), [], []
        self._send(plan)
        mine = self.ranks.apply(plan)
        parts: list = [None] * self.llm.parallel.world
        collective(self.llm.parallel, "the ranks' deltas",
                   lambda: dist.gather_object(mine, parts, dst=self._root, group=self._group))
        deltas = mine if self.llm.parallel.mode == "tp" else [d for part in parts for d in part]
        for d in deltas:
            if d.finished:
                owner = self._owner.pop(d.request_id)
                if owner >= 0:
                    self._load[owner] -= 1
                self._done[d.request_id] = d.completion
        return deltas

    def completion(self, key: int) -> Completion:
        """A finished request's result (and forgets it)."""
        if key not in self._done:
            raise ValueError(f"rid: no finished request {key!r}")
        return self._done.pop(key)

    def close(self) -> None:
        """Tells the followers to stop (once)."""
        if not self._closed:
            self._closed = True
            self._send(Plan([], [], "stop"))

    def _send(self, plan: Plan) -> None:
        import torch.distributed as dist

        collective(self.llm.parallel, "the plan",
                   lambda: dist.broadcast_object_list([plan], src=self._root, group=self._group))
        self._sent = time.monotonic()


def follow(llm) -> Ranks:
    """Every rank but 0 of a served parallel LLM: does what each plan says until ``"stop"``;
    returns what it did."""
    import torch.distributed as dist

    group, root = _comm(llm)
    ranks = Ranks(llm)
    while True:
        got: list = [None]
        collective(llm.parallel, "the plan", lambda: dist.broadcast_object_list(got, src=root, group=group))
        plan = got[0]
        if plan.command == "stop":
            return ranks
        if plan.command == "step":
            mine = ranks.apply(plan)
            collective(llm.parallel, "the ranks' deltas", lambda: dist.gather_object(mine, None, dst=root, group=group))
