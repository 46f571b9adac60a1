"""The device sampler (dsv4rs.runtime.sampling): greedy, temperature, top-k, top-p, per-sequence
seeds independent of the batch, and the sampled distribution."""

from __future__ import annotations

import pytest
import torch

from dsv4rs.runtime.sampling import sample, uniform


def _rows(b: int, **kw) -> dict[str, torch.Tensor]:
    args = {"temperature": torch.ones(b), "top_k": torch.zeros(b, dtype=torch.int64), "top_p": torch.ones(b),
            "seeds": torch.arange(b, dtype=torch.int64), "steps": torch.zeros(b, dtype=torch.int64)}
    args.update(kw)
    return args


def test_uniform_is_a_function_of_seed_step_and_column() -> None:
    seeds = torch.tensor([1, 2, 1, 2**40 + 1], dtype=torch.int64)
    steps = torch.tensor([5, 5, 6, 5], dtype=torch.int64)
    u = uniform(seeds, steps, 1000)
    assert u.dtype == torch.float32 and bool((u > 0).all()) and bool((u < 1).all())
    assert torch.equal(u[0], uniform(seeds[:1], steps[:1], 1000)[0])
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2]) and not torch.equal(u[0], u[3])
    # Roughly uniform: the mean of 10^5 draws within 5 sigma of 1/2.
    many = uniform(torch.arange(100, dtype=torch.int64), torch.zeros(100, dtype=torch.int64), 1000)
    assert abs(float(many.mean()) - 0.5) < 5 * (1 / 12 / many.numel()) ** 0.5


def test_greedy_takes_the_arg_max_lowest_id_on_ties(gen: torch.Generator) -> None:
    logits = torch.randn(5, 50, generator=gen)
    logits[3, 7] = logits[3, 9] = 100.0
    got = sample(logits, **_rows(5, temperature=torch.zeros(5)))
    want = logits.argmax(-1)
    assert torch.equal(got, want) and int(got[3]) == 7


def test_top_k_1_and_tiny_top_p_are_greedy(gen: torch.Generator) -> None:
    logits = torch.randn(6, 40, generator=gen)
    assert torch.equal(sample(logits, **_rows(6, top_k=torch.ones(6, dtype=torch.int64))), logits.argmax(-1))
    assert torch.equal(sample(logits, **_rows(6, top_p=torch.full((6,), 1e-6))), logits.argmax(-1))


def test_rows_do_not_depend_on_the_batch(gen: torch.Generator) -> None:
    logits = torch.randn(8, 300, generator=gen)
    args = _rows(8, temperature=torch.rand(8, generator=gen) + 0.5, top_k=torch.tensor([0, 5, 50, 0, 3, 0, 1, 10]),
                 top_p=torch.tensor([1.0, 0.9, 0.5, 0.8, 1.0, 0.3, 1.0, 0.95]),
                 seeds=torch.randint(0, 2**62, (8,), generator=gen), steps=torch.randint(0, 10**6, (8,), generator=gen))
    whole = sample(logits, **args)
    for i in range(8):
        alone = sample(logits[i : i + 1], **{k: v[i : i + 1] for k, v in args.items()})
        assert int(alone) == int(whole[i])


@pytest.mark.parametrize(("top_k", "top_p"), [(0, 1.0), (3, 1.0), (0, 0.7), (4, 0.8)])
def test_sampled_distribution(top_k: int, top_p: float) -> None:
    """20,000 draws over a 6-token vocabulary at temperature 2 match the renormalized kept
    probabilities (chi-square well inside its 99.9 % bound)."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.2, -0.5, -3.0]])
    n, t = 20_000, 2.0
    probs = torch.softmax(logits[0] / t, -1)
    order = probs.argsort(descending=True)
    # top-k first, then top-p over the renormalized top-k (as transformers' warpers and vLLM).
    top = order[:top_k] if top_k else order
    renormalized = probs[top] / probs[top].sum()
    kept = torch.zeros(6, dtype=torch.bool)
    mass = 0.0
    for rank, i in enumerate(top.tolist()):
        if rank > 0 and mass >= top_p:
            break
        kept[i], mass = True, mass + float(renormalized[rank])
    want = torch.where(kept, probs, 0.0)
    want = want / want.sum()
    args = _rows(n, temperature=torch.full((n,), t), top_k=torch.full((n,), top_k, dtype=torch.int64),
                 top_p=torch.full((n,), top_p), seeds=torch.arange(n, dtype=torch.int64) * 7919)
    counts = torch.bincount(sample(logits.expand(n, -1), **args), minlength=6).double()
    assert bool((counts[~kept] == 0).all())
    expected = want[kept].double() * n
    chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
    assert chi2 < 24.0, (counts, expected)  # chi-square, 5 degrees of freedom at most: p = 0.9998
