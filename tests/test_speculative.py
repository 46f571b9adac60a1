"""MTP speculative decoding (dsv4rs.llm.speculative): the acceptance rule keeps the target
distribution (on synthetic distributions and end to end on a model with an 8-token vocabulary),
greedy decoding is unchanged, forks are settled, penalties see the draft; and the sampler's new
pieces (penalties, min-p, probabilities)."""

from __future__ import annotations

import pytest
import torch

from dsv4rs.llm.speculative import SpeculativeScheduler, verify
from dsv4rs.model import DeepseekV4, V4Config, init_random
from dsv4rs.runtime import Engine
from dsv4rs.runtime.sampling import penalize, probabilities, sample, sample_from, stream
from dsv4rs.runtime.scheduler import Scheduler

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic over the cells expecting at least 5 (the rest pooled), and its degrees
    of freedom."""
    n = float(counts.sum())
    exp = probs.double() * n
    big = exp >= 5
    obs = torch.cat([counts[big].double(), counts[~big].double().sum()[None]])
    e = torch.cat([exp[big], exp[~big].sum()[None]])
    keep = e > 0
    return float(((obs[keep] - e[keep]) ** 2 / e[keep]).sum()), int(keep.sum()) - 1


# chi-square 99.99 % quantiles by degrees of freedom (a false alarm once in 10^4 runs)
CHI2_9999 = {1: 15.1, 2: 18.4, 3: 21.1, 4: 23.5, 5: 25.7, 6: 27.9, 7: 29.9, 8: 31.8, 9: 33.7, 10: 35.6, 11: 37.4,
             12: 39.1}


def test_acceptance_rule_keeps_the_target_distribution() -> None:
    """Drafts from q verified against p: the emitted tokens follow p, the acceptance rate is
    sum(min(p, q)), and greedy (one-hot) rows accept exactly the target's arg max."""
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05, 0.0])
    q = torch.tensor([0.1, 0.4, 0.1, 0.1, 0.2, 0.1])
    n = 40_000
    seeds = torch.arange(n, dtype=torch.int64) * 7919 + 11
    steps = torch.full((n,), 17, dtype=torch.int64)
    draft = sample_from(q.expand(n, -1), stream(seeds, 1), steps)
    assert chi2(torch.bincount(draft, minlength=6), q)[0] < CHI2_9999[5]
    ok, tok = verify(p.expand(n, -1), q.expand(n, -1), draft, seeds, steps)
    counts = torch.bincount(tok, minlength=6)
    assert int(counts[5]) == 0
    stat, dof = chi2(counts[:5], p[:5])
    assert stat < CHI2_9999[dof], (counts, p * n)
    rate, want = float(ok.double().mean()), float(torch.minimum(p, q).sum())
    assert abs(rate - want) < 5 * (want * (1 - want) / n) ** 0.5
    onehot = torch.eye(6)
    g_ok, g_tok = verify(onehot[[0, 0, 3]], onehot[[0, 2, 1]], torch.tensor([0, 2, 1]), seeds[:3], steps[:3])
    assert g_ok.tolist() == [True, False, False] and g_tok.tolist() == [0, 0, 3]


def tiny_vocab_model() -> DeepseekV4:
    model = init_random(DeepseekV4(V4Config.tiny(vocab_size=8)), seed=21)
    with torch.no_grad():  # sharper logits, so target and draft distributions differ clearly
        model.lm_head.weight.mul_(25)
    return model


@torch.no_grad()
def test_speculative_sampling_distribution_end_to_end() -> None:
    """400 seeded requests on an 8-token model: the first two generated tokens' joint
    distribution under MTP speculation (draft, verify, bonus and residual all taken) matches the
    exact one computed from the model's logits."""
    model = tiny_vocab_model()
    prompt, temp, v = [3, 1, 4, 1, 5], 1.0, 8
    eng = Engine(model, max_sequences=1 + v, max_len=16)
    seqs = [eng.add_sequence()[0] for _ in range(1 + v)]
    first = eng.step(seqs[:1], [prompt])
    second = eng.step(seqs[1:], [prompt + [a] for a in range(v)])
    joint = torch.softmax(first[0] / temp, -1)[:, None] * torch.softmax(second / temp, -1)  # [t1, t2]
    sched = SpeculativeScheduler(Engine(model, max_sequences=64, max_len=16), token_budget=512)
    n = 400
    rids = [sched.add(prompt, 3, temperature=temp, seed=1000 + i) for i in range(n)]
    sched.run()
    outs = torch.tensor([sched.requests[r].output[:2] for r in rids])
    counts = torch.bincount(outs[:, 0] * v + outs[:, 1], minlength=v * v)
    stat, dof = chi2(counts, joint.flatten())
    assert stat < CHI2_9999[dof], (stat, dof)  # always accepting the draft gives some 8,000
    drafted = sum(sched.requests[r].drafted for r in rids)
    accepted = sum(sched.requests[r].accepted for r in rids)
    assert drafted >= n and 10 <= accepted <= drafted - 10  # both branches taken (some 5 % accepted)
    assert sched.engine.manager.sequence_ids() == []
    sched.engine.manager.check()


@torch.no_grad()
def test_speculative_greedy_with_penalties_equals_plain(gen: torch.Generator) -> None:
    """Greedy decoding with repetition and frequency penalties (the bonus row counts the draft)
    gives the same tokens with and without speculation, several requests joining."""
    model = init_random(DeepseekV4(V4Config.tiny()), seed=9)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (30, 7, 50)]
    kw = dict(repetition_penalty=1.3, frequency_penalty=0.5)
    outs = []
    for cls in (Scheduler, SpeculativeScheduler):
        s = cls(Engine(model, max_sequences=6, max_len=128), token_budget=40)
        rids = [s.add(p, 16, **kw) for p in prompts[:2]]
        s.step()
        rids.append(s.add(prompts[2], 16, **kw))
        s.run()
        outs.append([s.requests[r].output for r in rids])
        assert s.engine.manager.sequence_ids() == []
    assert outs[0] == outs[1]


@torch.no_grad()
@pytest.mark.parametrize("penalties", [{}, {"repetition_penalty": 1.5, "presence_penalty": 1.0}])
def test_accepted_drafts_give_the_plain_greedy_tokens(gen: torch.Generator, penalties: dict) -> None:
    """A random MTP block rarely agrees with its model, so here the draft is an oracle (the real
    block runs, its logits are replaced by the plain greedy continuation): every draft is
    accepted, each step after the first decode emits two tokens (the draft and the bonus), the
    forks replace their sequences, and the tokens equal plain greedy decoding, penalties
    included (the bonus row counts the draft)."""
    model = init_random(DeepseekV4(V4Config.tiny()), seed=4)
    prompt = torch.randint(0, 512, (40,), generator=gen).tolist()
    plain = Scheduler(Engine(model, max_sequences=2, max_len=128))
    rid = plain.add(prompt, 21, **penalties)
    plain.run()
    full = prompt + plain.requests[rid].output
    eng = Engine(model, max_sequences=2, max_len=128)
    real = eng.draft

    def oracle(next_ids):
        seqs = list(eng._last.seq_ids)
        logits = real(next_ids)
        for i, s in enumerate(seqs):
            n = eng.manager.length(s)  # the chunk ends at n - 1; the draft is for position n + 1
            if n + 1 < len(full):
                logits[i] = -10.0
                logits[i, full[n + 1]] = 10.0
        return logits

    eng.draft = oracle
    spec = SpeculativeScheduler(eng)
    sid = spec.add(prompt, 21, **penalties)
    steps = 0
    while spec.running or spec.waiting:
        spec.step()
        steps += 1
    r = spec.requests[sid]
    assert r.output == plain.requests[rid].output
    assert r.drafted == r.accepted == 10 and steps == 11  # prefill (1 token), then 10 x (draft + bonus)
    assert eng.manager.sequence_ids() == []
    eng.manager.check()


def test_speculative_needs_an_mtp_block() -> None:
    model = init_random(DeepseekV4(V4Config.tiny(num_nextn_predict_layers=0)), seed=1)
    with pytest.raises(ValueError, match="no MTP block"):
        SpeculativeScheduler(Engine(model, max_sequences=2, max_len=32))


def test_penalties_as_specified() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    counts = torch.tensor([[0.0, 2.0, 1.0, 0.0]])
    seen = torch.tensor([[True, True, True, False]])  # token 0 only in the prompt
    out = penalize(logits, counts, seen, torch.tensor([2.0]), torch.tensor([0.5]), torch.tensor([0.25]))
    want = torch.tensor([[2.0 / 2, -1.0 * 2 - 0.5 - 0.5, 0.5 / 2 - 0.5 - 0.25, 3.0]])
    torch.testing.assert_close(out, want)


def test_min_p_and_probabilities_match_the_sampler() -> None:
    """probabilities() is the distribution sample() draws from, with top-k, top-p and min-p."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.2, -0.5, -3.0]])
    n = 20_000
    for top_k, top_p, min_p in ((0, 1.0, 0.3), (4, 0.9, 0.0), (0, 1.0, 0.0)):
        args = dict(temperature=torch.full((n,), 1.5), top_k=torch.full((n,), top_k, dtype=torch.int64),
                    top_p=torch.full((n,), top_p), min_p=torch.full((n,), min_p))
        probs = probabilities(logits, **{k: v[:1] for k, v in args.items()})[0]
        if min_p:
            assert bool((probs[probs > 0] >= min_p * probs.max() - 1e-6).all()) and int((probs > 0).sum()) < 6
        got = torch.bincount(sample(logits.expand(n, -1), seeds=torch.arange(n, dtype=torch.int64),
                                    steps=torch.zeros(n, dtype=torch.int64), **args), minlength=6)
        assert bool((got[probs == 0] == 0).all())
        stat, dof = chi2(got[probs > 0], probs[probs > 0])
        assert stat < CHI2_9999[max(dof, 1)], (got, probs * n)
