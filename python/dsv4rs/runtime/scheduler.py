"""Continuous batching with chunked prefill: requests join and leave the running batch between
steps, and every step carries one token of each running decode plus prefill chunks of waiting
prompts, up to a token budget (as vLLM and SGLang schedule), so a long prompt never stalls the
sequences already generating. Tokens are sampled on the device (:meth:`Engine.sample
<dsv4rs.runtime.Engine.sample>`, penalties applied first).

Overlap (``Scheduler(overlap=True)``, the default): while every running request decodes, the
next step is launched on the tokens still on the device (:class:`~dsv4rs.runtime.SampledTokens`)
before the host reads them, so the host's reading, stop checks and planning run while the GPU
computes. The host learns a step's tokens one step later: a request that a token stops (a stop
id) has had one more token computed, which is dropped; ``max_new_tokens`` is known ahead, so no
step runs past it. Steps with prefill chunks, requests to admit or penalties (which count the
previous token) are planned from the host's view, as without overlap. The tokens are the same
either way: a request's draws depend on its seed and positions alone.

A speculative scheduler (:class:`dsv4rs.llm.speculative.SpeculativeScheduler`) builds on the
helpers here.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from dsv4rs.runtime.engine import Engine, SampledTokens
from dsv4rs.runtime.sampling import penalize, top_logprobs


@dataclass
class Request:
    """One generation: its prompt, limits and sampling settings, and what it produced.

    Attributes:
        prompt: token ids.
        max_new_tokens: tokens to generate (at least 1).
        stop_ids: token ids that end the generation (the stop token is kept in ``output``).
        temperature, top_k, top_p, min_p, seed: sampling (``temperature`` 0: greedy).
        repetition_penalty, presence_penalty, frequency_penalty: see :func:`.sampling.penalize`.
        logprobs: ``None``, or keep each generated token's log-probability and the ``logprobs``
            most likely alternatives in ``token_logprobs``.
        output: generated token ids.
        finish_reason: ``None`` while running, then ``"stop"`` (a stop id), ``"length"``
            (``max_new_tokens``) or ``"abort"``.
        logits: with ``Scheduler(keep_logits=True)``, the logits each token was sampled from.
        pending: generated tokens not yet fed to the engine.
        drafted, accepted: speculative decoding's draft tokens proposed and accepted.
    """

    prompt: list[int]
    max_new_tokens: int
    stop_ids: frozenset[int] = frozenset()
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = 0
    logprobs: int | None = None
    output: list[int] = field(default_factory=list)
    token_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    finish_reason: str | None = None
    logits: list[torch.Tensor] = field(default_factory=list)
    seq: int | None = None
    fed: int = 0  # prompt tokens fed (from the prefix hit on)
    pending: list[int] = field(default_factory=list)
    drafted: int = 0
    accepted: int = 0
    draft: tuple[int, torch.Tensor] | None = None  # speculative: the draft token and its distribution
    counts: torch.Tensor | None = None  # penalties: generated-token counts [V] on the device
    seen: torch.Tensor | None = None  # penalties: prompt or generated [V] on the device

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


_REQUEST_FIELDS = frozenset(f.name for f in dataclasses.fields(Request))
_REQUEST_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Request) if f.default is not dataclasses.MISSING}
"""A request's settings left out of :meth:`Scheduler.add` take these values."""


class Scheduler:
    """Schedules requests on an :class:`Engine`.

    Args:
        engine: the engine (its ``max_sequences`` bounds the running requests).
        token_budget: the most tokens one step feeds (decode tokens first, then prefill chunks).
        keep_logits: keep every sampled token's logits on its request (for checks).
        overlap: launch decode steps on tokens still on the device (the module docstring);
            :meth:`step` then returns the tokens of the step before.
    """

    def __init__(self, engine: Engine, token_budget: int = 512, keep_logits: bool = False,
                 overlap: bool = True) -> None:
        if isinstance(token_budget, bool) or not isinstance(token_budget, int) or token_budget < 1:
            raise ValueError(f"token_budget: expected an int >= 1, got {token_budget!r}")
        for name, v in (("keep_logits", keep_logits), ("overlap", overlap)):
            if not isinstance(v, bool):
                raise ValueError(f"{name}: expected True or False, got {v!r}")
        self.engine, self.budget, self.keep_logits, self.overlap = engine, token_budget, keep_logits, overlap
        self.requests: dict[int, Request] = {}
        self.waiting: list[int] = []
        self.running: list[int] = []
        self.max_running = engine.max_sequences
        self._ids = itertools.count()
        self._inflight: _InFlight | None = None  # a step's tokens, still on their way to the host
        self.steps_ahead = 0  # steps launched on device-held tokens (overlap)

    def add(self, prompt: Sequence[int], max_new_tokens: int, **sampling) -> int:
        """Queues a request (see :class:`Request` for the keyword arguments); returns its id."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
        if not len(prompt):
            raise ValueError("prompt: needs at least one token")
        if len(prompt) + max_new_tokens > self.engine.max_len:
            raise ValueError(f"prompt: {len(prompt)} tokens + max_new_tokens {max_new_tokens} exceed the engine's "
                             f"max_len = {self.engine.max_len}")
        self.engine._check_ids("prompt", prompt)
        sampling = self._checked_sampling(sampling)
        rid = next(self._ids)
        self.requests[rid] = Request(list(prompt), max_new_tokens, **sampling)
        self.waiting.append(rid)
        return rid

    def abort(self, rid: int) -> None:
        """Ends a request now (``finish_reason`` ``"abort"`` unless it had finished): it leaves
        the queue or the running batch, and its sequence's pages go back to the pools."""
        r = self.requests[rid]
        if rid in self.waiting:
            self.waiting.remove(rid)
        if r.finish_reason is None:
            r.finish_reason = "abort"
        self._retire()

    def step(self) -> list[tuple[int, int]]:
        """One engine step; returns the ``(request id, token)`` pairs it generated (with
        ``overlap``, those of the step before, which the host reads while this one runs).
        Finished requests release their sequence."""
        prev, self._inflight = self._inflight, None
        fed = self._launch_ahead(prev) if prev is not None else None
        out = self._collect(prev, fed or set()) if prev is not None else []
        if fed is None:  # planned from the host's view: pending tokens and prefill chunks
            self._retire()
            self._inflight = self._launch()
        if not self.overlap and self._inflight is not None:
            cur, self._inflight = self._inflight, None
            out += self._collect(cur, set())
        self._retire()
        return out

    def run(self) -> dict[int, list[int]]:
        """Steps until every request is done; returns the outputs by request id."""
        while self.waiting or self.running:
            self.step()
        self._inflight = None  # tokens computed for requests that had already stopped
        return {rid: r.output for rid, r in self.requests.items()}

    def _launch(self) -> _InFlight | None:
        """Feeds every running decode its pending token and prefill chunks up to the budget, and
        samples the rows that end in a token to sample after (on the device)."""
        self._admit()
        budget = self.budget
        batch: list[tuple[int, list[int]]] = []
        for rid in self.running:  # decodes first: their pending token each
            r = self.requests[rid]
            if r.fed == len(r.prompt) and r.pending and budget >= len(r.pending):
                batch.append((rid, r.pending))
                budget -= len(r.pending)
        batch += self._prefill(budget)
        if not batch:
            return None
        sampled = [self._samples(rid, chunk) for rid, chunk in batch]
        logits = self.engine.step([self.requests[rid].seq for rid, _ in batch], [c for _, c in batch],
                                  last=[int(s) for s in sampled])
        self._advance(batch)
        for rid, _ in batch:
            self.requests[rid].pending = []
        rows = [rid for (rid, _), s in zip(batch, sampled) if s]
        if not rows:
            return None
        return self._sample_rows(rows, torch.cat([lg for lg, s in zip(logits, sampled) if s]))

    def _launch_ahead(self, prev: _InFlight) -> set[int] | None:
        """With ``overlap``, when every running request decodes and its next token is in
        ``prev``: launches the next step on those tokens (still on the device) and samples after
        it; returns the requests fed. ``None``: the next step needs the host's view."""
        if not self.overlap or (self.waiting and len(self.running) < self.max_running):
            return None
        reqs = {rid: self.requests.get(rid) for rid in prev.rids}
        if any(rid not in reqs or self.requests[rid].fed < len(self.requests[rid].prompt) for rid in self.running):
            return None
        if any(r is not None and r.penalized for r in reqs.values()):
            return None  # penalties count the token in flight
        # The token in flight is a request's last when it reaches max_new_tokens: not fed.
        feed = [rid for rid, r in reqs.items()
                if r is not None and not r.done and r.seq is not None and len(r.output) + 1 < r.max_new_tokens]
        if not feed or len(feed) > self.budget:
            return None
        seqs = [self.requests[rid].seq for rid in feed]
        logits = self.engine.step(seqs, prev.tokens)
        self._inflight = self._sample_rows(feed, logits)
        self.steps_ahead += 1
        return set(feed)

    def _sample_rows(self, rids: list[int], logits: torch.Tensor) -> _InFlight:
        """Samples one token for each of ``rids`` from its row of ``logits`` on the device, and
        what the host will read with it (log-probabilities, kept logits), without waiting."""
        reqs = [self.requests[rid] for rid in rids]
        penalized = self._penalized(reqs, logits)
        tokens = self.engine.sample(
            [r.seq for r in reqs], penalized, temperature=[r.temperature for r in reqs],
            top_k=[r.top_k for r in reqs], top_p=[r.top_p for r in reqs], min_p=[r.min_p for r in reqs],
            seed=[r.seed for r in reqs])
        lps = self._logprobs_device(logits, tokens, reqs)
        kept = [logits[i] for i in range(len(rids))] if self.keep_logits else None
        return _InFlight(tokens, list(rids), lps, kept)

    def _collect(self, flight: _InFlight, fed: set[int]) -> list[tuple[int, int]]:
        """Reads a step's tokens on the host (waiting for their copy) and emits them; a request
        that has finished meanwhile drops its token. ``fed``: requests whose token a step
        launched ahead already took (nothing pending)."""
        reqs = [self.requests.get(rid) for rid in flight.rids]
        lps = self._logprobs_host(flight.logprobs, reqs)
        out: list[tuple[int, int]] = []
        for i, (rid, tok) in enumerate(zip(flight.rids, flight.tokens.tolist())):
            r = reqs[i]
            if r is None or r.done:
                continue
            if self.keep_logits and flight.logits is not None:
                r.logits.append(flight.logits[i].cpu())
            self.emit(r, tok, lps[i])
            r.pending = [] if rid in fed else [tok]
            out.append((rid, tok))
        return out
    # -- helpers (also the speculative scheduler's) --------------------------------------------------

    def _admit(self) -> None:
        """Moves waiting requests into the running batch while the engine has sequences free."""
        while self.waiting and len(self.running) < self.max_running:
            rid = self.waiting.pop(0)
            r = self.requests[rid]
            r.seq, hit = self.engine.add_sequence(r.prompt)
            r.fed = hit.recompute_from
            self.running.append(rid)

    def _prefill(self, budget: int) -> list[tuple[int, list[int]]]:
        """Prefill chunks of the running requests' prompts, first come first served."""
        batch = []
        for rid in self.running:
            r = self.requests[rid]
            if r.fed < len(r.prompt) and budget > 0:
                chunk = r.prompt[r.fed : r.fed + budget]
                batch.append((rid, chunk))
                budget -= len(chunk)
        return batch

    def _samples(self, rid: int, chunk: list[int]) -> bool:
        """Whether the step's chunk for ``rid`` ends in a token to sample after: a decode, or the
        prompt's last chunk."""
        r = self.requests[rid]
        return r.fed == len(r.prompt) or r.fed + len(chunk) == len(r.prompt)

    def _advance(self, batch: list[tuple[int, list[int]]]) -> None:
        for rid, chunk in batch:
            r = self.requests[rid]
            if r.fed < len(r.prompt):
                r.fed = min(len(r.prompt), r.fed + len(chunk))

    def _checked_sampling(self, sampling: dict) -> dict:
        """A request's sampling settings, checked here rather than where a step samples (an error
        there would fail every running request): the engine's rules for the sampler's settings
        (a ``top_k`` past the vocabulary is ``0``), finite penalties, ``repetition_penalty > 0``."""
        unknown = set(sampling) - _REQUEST_FIELDS
        if unknown:
            raise TypeError(f"sampling: unknown settings {sorted(unknown)}")
        settings = _REQUEST_DEFAULTS | sampling
        keys = ("temperature", "top_k", "top_p", "min_p", "seed")
        vals = self.engine.sampling_settings(1, *(settings[k] for k in keys))
        out = dict(sampling) | {k: v[0] for k, v in zip(keys, vals)}
        for name in ("repetition_penalty", "presence_penalty", "frequency_penalty"):
            v = settings[name]
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or (
                    name == "repetition_penalty" and v <= 0):
                raise ValueError(f"{name}: expected a finite number{' > 0' if name == 'repetition_penalty' else ''}, "
                                 f"got {v!r}")
        lp = sampling.get("logprobs")
        vocab = self.engine.cfg.vocab_size
        if lp is not None and (isinstance(lp, bool) or not isinstance(lp, int) or not 0 <= lp <= vocab):
            raise ValueError(f"logprobs: expected None or an int in [0, vocab_size], got {lp!r}")
        return out

    @staticmethod
    def position(r: Request) -> int:
        """The position of ``r``'s next generated token (the counter of its random draws)."""
        return len(r.prompt) + len(r.output)

    def params(self, reqs: list[Request], logits: torch.Tensor, extra: Sequence[Sequence[int]] = ()
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The rows' logits after their penalties (``extra[i]``: tokens to count as generated
        besides row ``i``'s output) and their sampling settings as device tensors."""
        def col(name: str, dtype: torch.dtype) -> torch.Tensor:
            return _column(reqs, name, dtype, logits.device)

        return self._penalized(reqs, logits, extra), dict(
            temperature=col("temperature", torch.float32), top_k=col("top_k", torch.int64),
            top_p=col("top_p", torch.float32), min_p=col("min_p", torch.float32), seeds=col("seed", torch.int64))

    def _penalized(self, reqs: list[Request], logits: torch.Tensor, extra: Sequence[Sequence[int]] = ()
                   ) -> torch.Tensor:
        """The rows' logits after their penalties (``logits`` itself when no row has one)."""
        if not any(r.penalized for r in reqs):
            return logits
        dev = logits.device
        counts, seen = self._penalty_state(reqs, extra, logits.shape[-1], dev)
        return penalize(logits, counts, seen, _column(reqs, "repetition_penalty", torch.float32, dev),
                        _column(reqs, "presence_penalty", torch.float32, dev),
                        _column(reqs, "frequency_penalty", torch.float32, dev))

    def _penalty_state(self, reqs: list[Request], extra: Sequence[Sequence[int]], vocab: int, dev: torch.device
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        counts = torch.zeros(len(reqs), vocab, device=dev)
        seen = torch.zeros(len(reqs), vocab, dtype=torch.bool, device=dev)
        for i, r in enumerate(reqs):
            if not r.penalized:
                continue
            if r.counts is None:  # built once; emit() keeps them current
                r.counts = torch.zeros(vocab, device=dev).index_put_(
                    (torch.tensor(r.output, dtype=torch.int64, device=dev),), torch.ones(len(r.output), device=dev),
                    accumulate=True)
                r.seen = torch.zeros(vocab, dtype=torch.bool, device=dev)
                r.seen[torch.tensor(r.prompt + r.output, dtype=torch.int64, device=dev)] = True
            counts[i], seen[i] = r.counts, r.seen
            for t in extra[i] if i < len(extra) else ():
                counts[i, t] += 1
                seen[i, t] = True
        return counts, seen

    def logprobs(self, logits: torch.Tensor, tokens: torch.Tensor, reqs: list[Request]
                 ) -> list[tuple[float, list[tuple[int, float]]] | None]:
        """Per row: the token's log-probability and the top alternatives, for rows that ask."""
        return self._logprobs_host(self._logprobs_device(logits, tokens, reqs), reqs)

    @staticmethod
    def _logprobs_device(logits: torch.Tensor, tokens: torch.Tensor | SampledTokens, reqs: list[Request]
                         ) -> tuple[list[int], tuple[torch.Tensor, ...]] | None:
        """The rows that ask for log-probabilities and theirs, on the device (no wait)."""
        want = [i for i, r in enumerate(reqs) if r.logprobs is not None]
        if not want:
            return None
        n = max(reqs[i].logprobs or 0 for i in want)
        idx = torch.tensor(want, device=logits.device)
        ids = tokens.ids if isinstance(tokens, SampledTokens) else tokens
        return want, top_logprobs(logits[idx], ids[idx], n)

    @staticmethod
    def _logprobs_host(dev: tuple[list[int], tuple[torch.Tensor, ...]] | None, reqs: list[Request | None]
                       ) -> list[tuple[float, list[tuple[int, float]]] | None]:
        out: list[tuple[float, list[tuple[int, float]]] | None] = [None] * len(reqs)
        if dev is not None:
            want, parts = dev
            lp, ids, top = (t.tolist() for t in parts)
            for j, i in enumerate(want):
                k = (reqs[i].logprobs or 0) if reqs[i] is not None else 0
                out[i] = (lp[j], list(zip(ids[j][:k], top[j][:k])))
        return out

    def emit(self, r: Request, tok: int, logprob: tuple[float, list[tuple[int, float]]] | None = None) -> bool:
        """Appends a generated token to ``r`` unless it has finished; sets ``finish_reason`` when
        this token ends it. Returns whether the token was taken."""
        if r.finish_reason is not None:
            return False
        r.output.append(tok)
        if logprob is not None:
            r.token_logprobs.append(logprob)
        if r.counts is not None:
            r.counts[tok] += 1
            r.seen[tok] = True
        if tok in r.stop_ids:
            r.finish_reason = "stop"
        elif len(r.output) >= r.max_new_tokens:
            r.finish_reason = "length"
        return True

    def _retire(self) -> None:
        """Finished requests leave the running batch and release their sequence."""
        for rid in [rid for rid in self.running if self.requests[rid].done]:
            r = self.requests[rid]
            self.engine.release(r.seq)
            r.draft = r.counts = r.seen = None
            self.running.remove(rid)


@dataclass
class _InFlight:
    """A step's sampled tokens (on the device, copying to the host) and what the host reads
    with them: the rows' requests, their log-probabilities (device) and kept logits."""

    tokens: SampledTokens
    rids: list[int]
    logprobs: tuple[list[int], tuple[torch.Tensor, ...]] | None
    logits: list[torch.Tensor] | None


def _column(reqs: list[Request], name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Attribute ``name`` of every request, as a tensor on ``device``."""
    return torch.tensor([getattr(r, name) for r in reqs], dtype=dtype, device=device)
