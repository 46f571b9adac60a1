"""MTP speculative decoding (docs/model.md section 8: the MTP block predicts token ``t + 2`` from
the main model's last streams at ``t`` and the embedding of token ``t + 1``).

Each decoding request carries its pending token ``a`` (sampled, not yet fed) and a draft ``d``
for the token after it, drawn from the MTP block's distribution ``q`` (the request's own
temperature, top-k, top-p, min-p and penalties applied to the MTP logits). One engine step then
verifies every draft in the batch:

- The paged cache cannot roll back (the 128-token window ring and the compressor states are
  overwritten in place), so the step feeds ``[a, d]`` to a *fork* of the sequence
  (:meth:`Engine.fork`: pages, compressor-state slot included, shared copy on write), giving the
  target distributions ``p_1`` (of the token after ``a``) and ``p_2`` (after ``d``).
- Standard speculative sampling (Leviathan et al. 2023; Chen et al. 2023): accept ``d`` with
  probability ``min(1, p_1(d) / q(d))``; on acceptance also draw a bonus token from ``p_2``; on
  rejection draw the token from the residual ``max(0, p_1 - q)`` renormalized. Each emitted
  token is then distributed exactly as without speculation. Greedy rows have one-hot ``p`` and
  ``q``, so the rule accepts iff ``d`` is the target's arg max and the text is the same as without
  speculation.
- Accepted: the fork becomes the request's sequence and the parent is released; the MTP block
  runs over ``[a, d]`` (its window must follow every step, :meth:`Engine.draft`) and drafts the
  token after the bonus. Rejected: the fork is released; the parent still ends before ``a``, so
  the next step feeds it ``[a, c]`` (``c`` the corrected token) without a draft, samples the
  token after ``c`` and drafts again. A step thus emits 2 tokens when the draft is accepted and
  never fewer per step than decoding without speculation.

Each request holds a fork only during a step, but the cache must hold it: the scheduler runs at
most ``max_sequences // 2`` requests. Random draws use separate streams of the request's seed
(:func:`dsv4rs.runtime.sampling.stream`): 0 the plain and bonus samples, 1 the draft, 2 the
acceptance test, 3 the residual. Verification steps are eager (chunks of 2 tokens), not replayed
from CUDA graphs.
"""

from __future__ import annotations

import torch

from dsv4rs.runtime.engine import Engine
from dsv4rs.runtime.sampling import probabilities, sample_from, stream, uniform
from dsv4rs.runtime.scheduler import Request, Scheduler


def verify(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The acceptance rule on the device: ``(accepted bool [R], token int64 [R])``, the token being
    the draft when accepted, else a draw from ``max(0, p - q)`` renormalized.

    Args:
        p, q: ``float32 [R, V]`` target and draft distributions of the drafted position.
        draft: ``int64 [R]`` the drafted tokens (drawn from ``q``).
        seeds, steps: the rows' seeds and the drafted position (the random streams 2 and 3).
    """
    pd, qd = p.gather(1, draft[:, None])[:, 0], q.gather(1, draft[:, None])[:, 0]
    u = uniform(stream(seeds, 2), steps, 1)[:, 0]
    accepted = u * qd < pd  # u < p(d) / q(d), without dividing by q(d)
    residual = sample_from((p - q).clamp(min=0), stream(seeds, 3), steps)
    return accepted, torch.where(accepted, draft, residual)


class SpeculativeScheduler(Scheduler):
    """:class:`~dsv4rs.runtime.scheduler.Scheduler` with MTP drafts verified one step later (the
    module docstring has the scheme). The engine's model needs its MTP block."""

    def __init__(self, engine: Engine, token_budget: int = 512, keep_logits: bool = False) -> None:
        if not len(engine.model.mtp):
            raise ValueError("speculative: the model has no MTP block (num_nextn_predict_layers = 0)")
        if engine.max_sequences < 2:
            raise ValueError("speculative: needs max_sequences >= 2 (a fork per running request)")
        super().__init__(engine, token_budget, keep_logits)
        self.max_running = engine.max_sequences // 2

    def step(self) -> list[tuple[int, int]]:
        self._admit()
        budget = self.budget
        batch: list[tuple[int, int, list[int], str]] = []  # (request, sequence, chunk, kind)
        for rid in self.running:
            r = self.requests[rid]
            if r.fed < len(r.prompt):
                continue
            chunk = r.pending + ([r.draft[0]] if r.draft is not None else [])
            if budget < len(chunk):
                continue
            if r.draft is not None:
                batch.append((rid, self.engine.fork(r.seq), chunk, "verify"))
            else:
                batch.append((rid, r.seq, chunk, "decode"))
            budget -= len(chunk)
        for rid, chunk in self._prefill(budget):
            batch.append((rid, self.requests[rid].seq, chunk, "final" if self._samples(rid, chunk) else "prefill"))
        if not batch:
            return []
        last = [{"verify": 2, "decode": 1, "final": 1, "prefill": 0}[k] for *_, k in batch]
        try:
            logits = self.engine.step([s for _, s, _, _ in batch], [c for _, _, c, _ in batch], last=last)
        except BaseException:
            for _, s, _, kind in batch:
                if kind == "verify":
                    self.engine.release(s)
            raise
        self._advance([(rid, c) for rid, _, c, k in batch if k in ("prefill", "final")])
        out, next_ids, accepted = self._sample_and_verify(batch, logits)
        self._draft(batch, next_ids, accepted)
        self._retire()
        return out

    def _sample_and_verify(self, batch: list, logits: list[torch.Tensor]
                           ) -> tuple[list[tuple[int, int]], list[int], list[bool]]:
        """Samples the plain rows and verifies the drafts (one pass on the device, one read);
        emits the tokens; returns them, the token after each chunk (for the MTP block) and which
        verified rows were accepted."""
        rows, reqs, steps, extra = [], [], [], []  # target rows: (batch index, which)
        for i, (rid, _, chunk, kind) in enumerate(batch):
            r = self.requests[rid]
            if kind == "verify":
                rows += [(i, 1), (i, 2)]
                reqs += [r, r]
                steps += [self.position(r), self.position(r) + 1]
                extra += [(), (chunk[-1],)]
            elif kind in ("decode", "final"):
                rows.append((i, 0))
                reqs.append(r)
                steps.append(self.position(r))
                extra.append(())
        next_ids = [batch[i][2][-1] for i in range(len(batch))]  # placeholder for rejected rows
        for i, (rid, _, _, kind) in enumerate(batch):
            if kind == "prefill":
                r = self.requests[rid]
                next_ids[i] = r.prompt[r.fed]
        accepted = [False] * len(batch)
        if not rows:
            return [], next_ids, accepted
        raw = torch.cat([lg for lg in logits if lg.shape[0]])
        dev = raw.device
        penalized, p = self.params(reqs, raw, extra)
        step_t = torch.tensor(steps, dtype=torch.int64, device=dev)
        probs = probabilities(penalized, p["temperature"], p["top_k"], p["top_p"], p["min_p"])
        tokens = sample_from(probs, p["seeds"], step_t)  # plain rows and bonus rows: stream 0
        ver = [j for j, (_, w) in enumerate(rows) if w == 1]
        acc = torch.zeros(len(rows), dtype=torch.bool, device=dev)
        if ver:
            v = torch.tensor(ver, device=dev)
            q = torch.stack([self.requests[batch[rows[j][0]][0]].draft[1] for j in ver])
            d = torch.tensor([batch[rows[j][0]][2][-1] for j in ver], dtype=torch.int64, device=dev)
            ok, tok = verify(probs[v], q, d, p["seeds"][v], step_t[v])
            tokens[v] = tok
            acc[v] = ok
        lps = self.logprobs(raw, tokens, reqs)
        keep = self.keep_logits
        host_tokens, host_acc = tokens.tolist(), acc.tolist()
        out: list[tuple[int, int]] = []
        for j, (i, which) in enumerate(rows):
            rid, _, chunk, kind = batch[i]
            r = self.requests[rid]
            if which == 2 and not accepted[i]:
                continue  # the bonus of a rejected draft
            if which == 1:
                r.drafted += 1
                accepted[i] = host_acc[j]
                r.accepted += int(host_acc[j])
            if keep and not r.done:
                r.logits.append(raw[j].cpu())
            if self.emit(r, host_tokens[j], lps[j]):
                out.append((rid, host_tokens[j]))
            if which == 1 and not accepted[i]:
                r.pending = [chunk[0], host_tokens[j]]
            elif which != 1:
                r.pending = [host_tokens[j]]
                next_ids[i] = host_tokens[j]
        return out, next_ids, accepted

    def _draft(self, batch: list, next_ids: list[int], accepted: list[bool]) -> None:
        """Runs the MTP block over the step (its window follows every step), draws the next
        drafts, then settles the forks: an accepted fork replaces its parent, a rejected one is
        released."""
        needs = [i for i, (rid, _, _, kind) in enumerate(batch) if kind != "prefill"
                 and not self.requests[rid].done and (kind != "verify" or accepted[i])]
        # A parallel engine's ranks draft after every step alike (their MoE layers exchange).
        live = needs or any(k == "prefill" for *_, k in batch) or self.engine.parallel is not None
        mtp = self.engine.draft(next_ids) if live else None
        for i, (rid, seq, _, kind) in enumerate(batch):
            r = self.requests[rid]
            r.draft = None
            if kind == "verify":
                if accepted[i]:
                    self.engine.release(r.seq)
                    r.seq = seq
                else:
                    self.engine.release(seq)
        if needs:
            reqs = [self.requests[batch[i][0]] for i in needs]
            logits, p = self.params(reqs, mtp[torch.tensor(needs, device=mtp.device)])
            q = probabilities(logits, p["temperature"], p["top_k"], p["top_p"], p["min_p"])
            steps = torch.tensor([self.position(r) for r in reqs], dtype=torch.int64, device=q.device)
            drafts = sample_from(q, stream(p["seeds"], 1), steps).tolist()
            for r, d, row in zip(reqs, drafts, q):
                r.draft = (d, row)


def acceptance_rate(r: Request) -> float | None:
    """Accepted over drafted tokens of a request (None before any draft was verified)."""
    return r.accepted / r.drafted if r.drafted else None
