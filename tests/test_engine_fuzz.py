"""A seeded, stateful fuzz of the engine's API: random runs of valid calls (sequences added with
and without prompts, prefill and decode steps of random batches, ``last=``, forks, releases,
sampling and sampled steps, MTP drafts) interleaved with malformed ones (bad token ids, unknown
or ill-typed sequence ids, bad ``last`` counts, bad sampling settings and logits, bad draft ids).

Two engines over the same weights run side by side: the subject gets every call, its twin only
the valid ones. Each malformed call must raise a documented exception (``TypeError``,
``ValueError``, ``dsv4rs.CacheStateError``) whose message starts with the argument's name, and
must change nothing: after every call the two engines hold the same sequences of the same
lengths, and every later valid step gives both the same logits, bit for bit. A valid call that
runs out of pages must raise ``OutOfPagesError`` on both and change nothing either.
"""

from __future__ import annotations

import math
import random
import re

import numpy as np
import pytest
import torch

import dsv4rs
from dsv4rs.model import DeepseekV4, V4Config, init_random
from dsv4rs.runtime import Engine

OPS = 220
"""Calls a run makes (a few seconds on the CPU)."""
NAMED = re.compile(r"^\w+(\[\d+\])?(, \w+)?: ")
"""How a refused call's message starts: the argument's name (``chunks[1]: ...``)."""


class Twins:
    """The engine under test (``a``) and its twin (``b``), built alike."""

    def __init__(self, seed: int, quant: bool) -> None:
        cfg = V4Config.tiny()
        self.vocab = cfg.vocab_size
        self.a, self.b = (Engine(init_random(DeepseekV4(cfg), seed=seed), max_sequences=4, max_len=200, quant=quant)
                          for _ in range(2))
        self.live: list[int] = []

    def both(self, call):
        """``call`` on both engines: the same result (ids, or logits bit for bit), or the same
        ``OutOfPagesError`` or ``ValueError`` (a valid call the engine's state refuses) on both."""
        outcomes = []
        for eng in (self.a, self.b):
            try:
                outcomes.append(call(eng))
            except (dsv4rs.OutOfPagesError, ValueError) as e:
                outcomes.append(e)
        ra, rb = outcomes
        if isinstance(ra, BaseException) or isinstance(rb, BaseException):
            assert type(ra) is type(rb) and str(ra) == str(rb), (ra, rb)
            return None
        assert same(ra, rb)
        return ra

    def refused(self, call, what: str) -> None:
        """``call`` on the subject only: it must raise, naming the argument."""
        with pytest.raises((TypeError, ValueError, dsv4rs.CacheStateError)) as info:
            call(self.a)
        msg = str(info.value)
        assert isinstance(info.value, dsv4rs.CacheStateError) or NAMED.match(msg), f"{what}: {msg}"
        assert not isinstance(info.value, dsv4rs.OutOfPagesError), f"{what}: {msg}"

    def check(self) -> None:
        """The two engines hold the same sequences, of the same lengths."""
        assert self.a.manager.sequence_ids() == self.b.manager.sequence_ids()
        for s in self.a.manager.sequence_ids():
            assert self.a.manager.length(s) == self.b.manager.length(s), s


def same(x, y) -> bool:
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and torch.equal(x, y)
    if isinstance(x, (list, tuple)):
        return len(x) == len(y) and all(same(u, v) for u, v in zip(x, y))
    if isinstance(x, dsv4rs.runtime.engine.SampledTokens):
        return x.tolist() == y.tolist()
    return x == y


BAD_IDS = [[1.5], [True], [-1], "VOCAB", [2**63], [[1, 2]], torch.ones(2, 2, dtype=torch.int64), None, "ab",
           torch.tensor([1.0]), torch.tensor(3), 5, [1, None], np.array([0.5])]
BAD_SEQ = [-1, 999, 1.0, True, None, "0", 2**70, [0]]


def bad_ids(r: random.Random, vocab: int):
    v = r.choice(BAD_IDS)
    return [vocab] if isinstance(v, str) and v == "VOCAB" else v


def run(seed: int, quant: bool) -> None:
    r = random.Random(seed)
    t = Twins(seed, quant)
    v = t.vocab
    stepped: list[int] | None = None  # the sequences of the last step, while a draft may follow it
    for _ in range(OPS):
        kind = r.choice(["add", "add", "step", "step", "step", "draft", "fork", "release", "sample",
                         "bad_add", "bad_step", "bad_step", "bad_step", "bad_sample", "bad_seq", "bad_draft"])
        if kind in ("step", "bad_step", "sample", "bad_sample", "fork", "release") and not t.live:
            kind = "add"
        if kind == "add" and len(t.live) < 3:
            prompt = [r.randrange(v) for _ in range(r.choice([0, 1, 30, 70]))]
            got = t.both(lambda e: e.add_sequence(prompt))
            if got is not None:
                t.live.append(got[0])
                if prompt:
                    t.both(lambda e: e.step([got[0]], [prompt]))
                    stepped = [got[0]]
        elif kind == "step":
            ids = r.sample(t.live, r.randint(1, len(t.live)))
            chunks = [[r.randrange(v) for _ in range(r.choice([1, 1, 3, 9]))] for _ in ids]
            last = [r.randint(0, len(c)) for c in chunks] if r.random() < 0.3 else None
            if t.both(lambda e: e.step(ids, chunks, last=last)) is not None:
                stepped = ids
        elif kind == "draft" and stepped:
            nxt = [r.randrange(v) for _ in stepped]
            t.both(lambda e: e.draft(nxt))
            stepped = None
        elif kind == "fork" and len(t.live) < 3:
            parent = r.choice(t.live)
            child = t.both(lambda e: e.fork(parent))
            if child is not None:
                t.live.append(child)
        elif kind == "release":
            s = t.live.pop(r.randrange(len(t.live)))
            t.both(lambda e: e.release(s))
            stepped = None if stepped and s in stepped else stepped
        elif kind == "sample":
            ids = r.sample(t.live, r.randint(1, len(t.live)))
            logits = torch.randn(len(ids), v, generator=torch.Generator().manual_seed(r.randrange(1 << 30)))
            kw = r.choice([{}, {"temperature": 0.0}, {"top_k": 5, "seed": 7}, {"top_p": 0.5, "min_p": 0.1}])
            sampled = [t.a.sample(ids, logits, **kw), t.b.sample(ids, logits, **kw)]
            assert sampled[0].tolist() == sampled[1].tolist()
            if r.random() < 0.6:
                feed = iter(sampled)
                if t.both(lambda e: e.step(ids, next(feed))) is not None:
                    stepped = ids
        elif kind == "bad_add":
            x = bad_ids(r, v)
            t.refused(lambda e: e.add_sequence(x), f"add_sequence({x!r})")
        elif kind == "bad_step":
            ids = r.sample(t.live, r.randint(1, len(t.live)))
            chunks = [[r.randrange(v) for _ in range(r.randint(1, 4))] for _ in ids]
            last = None
            what = r.choice(["chunk", "seq", "last", "twice", "seq_ids", "count", "empty", "long"])
            if what == "chunk":
                chunks[r.randrange(len(ids))] = bad_ids(r, v)
            elif what == "seq":
                ids[r.randrange(len(ids))] = r.choice([*BAD_SEQ, max(t.a.manager.sequence_ids()) + 1])
            elif what == "last":
                last = r.choice([[-1] * len(ids), [99] * len(ids), ["a"] * len(ids), [1.5] * len(ids), [True] * len(ids),
                                 [0] * (len(ids) + 1), 3, [None] * len(ids)])
            elif what == "twice":
                ids, chunks = ids + ids[:1], chunks + chunks[:1]
            elif what == "seq_ids":
                ids = r.choice([ids[0], None, "ab", {ids[0]: 1}, {ids[0]}, torch.tensor([float(ids[0])])])
            elif what == "count":
                chunks = chunks + chunks[:1]
            elif what == "empty":
                chunks[0] = []
            else:
                chunks[0] = [1] * 201  # past max_len
            t.refused(lambda e: e.step(ids, chunks, last=last), f"step({ids!r}, {chunks!r:.80}, last={last!r})")
        elif kind == "bad_sample":
            ids = r.sample(t.live, r.randint(1, len(t.live)))
            kw = r.choice([{"temperature": math.nan}, {"temperature": "x"}, {"top_k": -1}, {"top_p": 0}, {"seed": -1},
                           {"min_p": 2}, {"temperature": [1.0] * (len(ids) + 1)}, {"seed": 2**64}, {"top_k": 1.5},
                           {"temperature": None}, {"seq_ids": [999]}, {"seq_ids": 5}, {"logits": torch.zeros(1)},
                           {"logits": torch.zeros(len(ids), v, dtype=torch.int64)}, {"logits": torch.zeros(len(ids) + 1, v)}])
            args = {"seq_ids": ids, "logits": torch.zeros(len(ids), v)} | kw
            t.refused(lambda e: e.sample(**args), f"sample({kw!r:.80})")
        elif kind == "bad_seq":
            x = r.choice(BAD_SEQ)
            method = r.choice(["fork", "release"])
            t.refused(lambda e: getattr(e, method)(x), f"{method}({x!r})")
        elif kind == "bad_draft":
            x = r.choice([None, [1.5], [True], "ab", 5, [-1], [v], [0] * 9])
            t.refused(lambda e: e.draft(x), f"draft({x!r})")
        t.check()
    # The engines still agree on a last step of every live sequence.
    if t.live:
        t.both(lambda e: e.step(t.live, [[1, 2]] * len(t.live), all_logits=True))


@pytest.mark.parametrize(("seed", "quant"), [(1, False), (2, True)])
def test_refused_calls_change_nothing(seed: int, quant: bool) -> None:
    run(seed, quant)
