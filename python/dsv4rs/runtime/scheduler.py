"""Continuous batching with chunked prefill: requests join and leave the running batch between
steps, and every step carries one token of each running decode plus prefill chunks of waiting
prompts, up to a token budget (as vLLM and SGLang schedule), so a long prompt never stalls the
sequences already generating. Tokens are sampled on the device (:mod:`.sampling`); the host
reads one token per sequence per step, which the allocator needs anyway (prefix hashing).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from dsv4rs.runtime.engine import Engine
from dsv4rs.runtime.sampling import sample


@dataclass
class Request:
    """One generation: its prompt, limits and sampling settings, and what it produced.

    Attributes:
        prompt: token ids.
        max_new_tokens: tokens to generate (at least 1).
        stop_ids: token ids that end the generation (the stop token is kept in ``output``).
        temperature, top_k, top_p, seed: sampling (``temperature`` 0: greedy).
        output: generated token ids.
        logits: with ``Scheduler(keep_logits=True)``, the logits each token was sampled from.
    """

    prompt: list[int]
    max_new_tokens: int
    stop_ids: frozenset[int] = frozenset()
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    output: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    seq: int | None = None
    fed: int = 0  # prompt tokens fed (from the prefix hit on)

    @property
    def done(self) -> bool:
        return len(self.output) >= self.max_new_tokens or bool(self.output and self.output[-1] in self.stop_ids)


class Scheduler:
    """Schedules requests on an :class:`Engine`.

    Args:
        engine: the engine (its ``max_sequences`` bounds the running requests).
        token_budget: the most tokens one step feeds (decode tokens first, then prefill chunks).
        keep_logits: keep every sampled token's logits on its request (for checks and logprobs).
    """

    def __init__(self, engine: Engine, token_budget: int = 512, keep_logits: bool = False) -> None:
        if token_budget < 1:
            raise ValueError(f"token_budget: must be >= 1, got {token_budget}")
        self.engine, self.budget, self.keep_logits = engine, token_budget, keep_logits
        self.requests: dict[int, Request] = {}
        self.waiting: list[int] = []
        self.running: list[int] = []
        self._ids = itertools.count()

    def add(self, prompt: Sequence[int], max_new_tokens: int, **sampling) -> int:
        """Queues a request (see :class:`Request` for the keyword arguments); returns its id."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
        if not len(prompt):
            raise ValueError("prompt: needs at least one token")
        if len(prompt) + max_new_tokens > self.engine.max_len:
            raise ValueError(f"prompt: {len(prompt)} tokens + max_new_tokens {max_new_tokens} exceed the engine's "
                             f"max_len = {self.engine.max_len}")
        rid = next(self._ids)
        self.requests[rid] = Request(list(prompt), max_new_tokens, **sampling)
        self.waiting.append(rid)
        return rid

    def step(self) -> list[tuple[int, int]]:
        """One engine step; returns the ``(request id, token)`` pairs it generated. Finished
        requests release their sequence."""
        self._admit()
        batch: list[tuple[int, list[int]]] = []
        budget = self.budget
        for rid in self.running:  # decodes first: one token each
            r = self.requests[rid]
            if r.fed == len(r.prompt) and budget:
                batch.append((rid, [r.output[-1]]))
                budget -= 1
        for rid in self.running:  # then prefill chunks, first come first served
            r = self.requests[rid]
            if r.fed < len(r.prompt) and budget:
                chunk = r.prompt[r.fed : r.fed + budget]
                batch.append((rid, chunk))
                budget -= len(chunk)
        if not batch:
            return []
        logits = self.engine.step([self.requests[rid].seq for rid, _ in batch], [c for _, c in batch])
        sampled = [(i, rid) for i, (rid, chunk) in enumerate(batch)
                   if self.requests[rid].fed == len(self.requests[rid].prompt)
                   or self.requests[rid].fed + len(chunk) == len(self.requests[rid].prompt)]
        for rid, chunk in batch:
            r = self.requests[rid]
            r.fed = min(len(r.prompt), r.fed + len(chunk)) if r.fed < len(r.prompt) else r.fed
        rows = [i for i, _ in sampled]
        tokens = self._sample(logits[rows], [self.requests[rid] for _, rid in sampled]).tolist()
        out = []
        for (i, rid), tok in zip(sampled, tokens):
            r = self.requests[rid]
            r.output.append(tok)
            if self.keep_logits:
                r.logits.append(logits[i].cpu())
            out.append((rid, tok))
        for rid in [rid for rid in self.running if self.requests[rid].done]:
            self.engine.release(self.requests[rid].seq)
            self.running.remove(rid)
        return out

    def run(self) -> dict[int, list[int]]:
        """Steps until every request is done; returns the outputs by request id."""
        while self.waiting or self.running:
            self.step()
        return {rid: r.output for rid, r in self.requests.items()}

    def _admit(self) -> None:
        """Moves waiting requests into the running batch while the engine has sequences free."""
        while self.waiting and len(self.running) < self.engine.max_sequences:
            rid = self.waiting.pop(0)
            r = self.requests[rid]
            r.seq, hit = self.engine.add_sequence(r.prompt)
            r.fed = hit.recompute_from
            self.running.append(rid)

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        dev = logits.device
        return sample(
            logits,
            temperature=torch.tensor([r.temperature for r in reqs], dtype=torch.float32, device=dev),
            top_k=torch.tensor([r.top_k for r in reqs], dtype=torch.int64, device=dev),
            top_p=torch.tensor([r.top_p for r in reqs], dtype=torch.float32, device=dev),
            seeds=torch.tensor([r.seed for r in reqs], dtype=torch.int64, device=dev),
            steps=torch.tensor([len(r.prompt) + len(r.output) for r in reqs], dtype=torch.int64, device=dev),
        )
