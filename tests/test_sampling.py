"""The device sampler (dsv4rs.runtime.sampling): greedy, temperature, top-k, top-p, per-sequence
seeds independent of the batch, and the sampled distribution."""

from __future__ import annotations

import pytest
import torch

from dsv4rs.runtime.sampling import gumbel_max, sample, uniform


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
    # (k + 1/2) / 2^23, exact: never 1 (a 1 would be infinite Gumbel noise), however many draws.
    k = many.double() * 2**23 - 0.5
    assert torch.equal(k, k.round()) and float(many.max()) < 1


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


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_gumbel_max_equals_sample_without_filters(gen: torch.Generator, device: str) -> None:
    """The unfiltered sampler draws the same tokens as :func:`sample` with top-k 0 and top-p 1,
    over many seeds, steps and temperatures (greedy rows included)."""
    b, v = 64, 3000
    logits = (torch.randn(b, v, generator=gen) * 3).to(device)
    temps = torch.tensor([0.0, 0.3, 1.0, 2.5] * (b // 4)).to(device)
    seeds = torch.randint(0, 2**62, (b,), generator=gen).to(device)
    steps = torch.randint(0, 10**6, (b,), generator=gen).to(device)
    args = _rows(b, temperature=temps, seeds=seeds, steps=steps)
    want = sample(logits, **{k: x.to(device) for k, x in args.items()})
    got = gumbel_max(logits, temps, seeds, steps)
    assert torch.equal(got, want)
    assert len(set(got[1::4].tolist())) > 1  # sampled rows are not all one token


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


# -- ops.sample_gumbel: the unfiltered sampler in one kernel ------------------------------------------

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _gumbel_case(gen: torch.Generator, b: int, v: int, device: str) -> tuple[torch.Tensor, ...]:
    logits = torch.randn(b, v, generator=gen) * torch.rand(b, 1, generator=gen) * 8
    temps = torch.tensor([0.0, 0.05, 0.5, 1.0, 3.0, -1.0] * b)[:b]
    seeds = torch.randint(0, 2**63 - 1, (b,), generator=gen)
    steps = torch.randint(0, 2**40, (b,), generator=gen)
    return tuple(x.to(device) for x in (logits, temps, seeds, steps))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b, v", [(1, 1), (3, 7), (12, 4096), (5, 129_280), (70, 513)])
def test_sample_gumbel_takes_the_float64_arg_max(gen: torch.Generator, device: str, b: int, v: int) -> None:
    """Each row's token maximizes the float64 score ``logit / T - log(-log(u))`` (the same
    uniforms, exact in float32) up to float32 rounding; greedy rows take the first arg max; on
    the GPU the tokens equal the torch form's bit for bit."""
    from dsv4rs import ops
    from dsv4rs.runtime.sampling import gumbel_max

    logits, temps, seeds, steps = _gumbel_case(gen, b, v, device)
    logits[0, v // 2] = logits[0].max()  # a tie in a greedy row: the lower index wins
    got = ops.sample_gumbel(logits, temps, seeds, steps)
    assert got.dtype == torch.int64 and got.device.type == device and got.shape == (b,)
    x = logits.double().cpu()
    u = uniform(seeds.cpu(), steps.cpu(), v).double()
    t = temps.double().cpu()
    score = torch.where(t[:, None] <= 0, x, x / t.clamp(min=1e-30)[:, None] - torch.log(-torch.log(u)))
    best = score.max(-1).values
    picked = score.gather(1, got.cpu()[:, None])[:, 0]
    assert bool((picked >= best - 1e-5 * (1 + best.abs())).all())
    greedy = t <= 0
    assert torch.equal(got.cpu()[greedy], x[greedy].argmax(-1))
    ref = gumbel_max(logits, temps, seeds, steps)
    if device == "cuda":
        assert torch.equal(got, ref)
    else:  # a different logarithm may round apart: only between float32-equal scores
        differ = (got != ref).cpu()
        alt = score.gather(1, ref.cpu()[:, None])[:, 0]
        assert bool(((picked - alt).abs() <= 1e-5 * (1 + best.abs()))[differ].all())


@pytest.mark.parametrize("device", DEVICES)
def test_sample_gumbel_draws_follow_the_softmax(device: str) -> None:
    """Over 4,000 steps of one row the share of each of 5 tokens is within 5 sigma of
    ``softmax(logits / T)``."""
    from dsv4rs import ops

    n, v, temp = 4000, 5, 0.7
    row = torch.tensor([0.0, 1.0, -1.0, 0.5, 2.0])
    logits = row.repeat(n, 1).to(device)
    got = ops.sample_gumbel(logits, torch.full((n,), temp, device=device), torch.full((n,), 99, device=device),
                            torch.arange(n, device=device)).cpu()
    p = torch.softmax(row / temp, -1)
    share = torch.bincount(got, minlength=v).double() / n
    assert bool(((share - p).abs() <= 5 * (p * (1 - p) / n).sqrt()).all()), (share, p)


@pytest.mark.parametrize("device", DEVICES)
def test_sample_gumbel_nan_and_bad_input(device: str) -> None:
    from dsv4rs import ops

    logits = torch.zeros(2, 6, device=device)
    logits[:, 3] = logits[:, 5] = float("nan")
    one = torch.ones(2, device=device)
    ids = torch.tensor([1, 2], device=device)
    got = ops.sample_gumbel(logits, torch.tensor([0.0, 1.0], device=device), ids, ids)
    assert got.tolist() == [3, 3]  # as torch's arg max: the first NaN
    with pytest.raises(TypeError, match="logits"):
        ops.sample_gumbel(logits.half(), one, ids, ids)
    with pytest.raises(ValueError, match="temperature"):
        ops.sample_gumbel(logits, one[:1], ids, ids)
    with pytest.raises(TypeError, match="seeds"):
        ops.sample_gumbel(logits, one, ids.int(), ids)
    with pytest.raises(ValueError, match="logits"):
        ops.sample_gumbel(logits[:, :0], one, ids, ids)
    with pytest.raises(ValueError, match="logits"):
        ops.sample_gumbel(logits[0], one, ids, ids)
    assert ops.sample_gumbel(logits[:0], one[:0], ids[:0], ids[:0]).shape == (0,)


@pytest.mark.gpu
def test_sample_gumbel_is_one_kernel_that_replays_in_a_cuda_graph(gen: torch.Generator) -> None:
    from dsv4rs import ops

    logits, temps, seeds, steps = _gumbel_case(gen, 8, 1000, "cuda")
    want = ops.sample_gumbel(logits, temps, seeds, steps)
    with pytest.raises(ValueError, match="device"):
        ops.sample_gumbel(logits, temps.cpu(), seeds, steps)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = ops.sample_gumbel(logits, temps, seeds, steps)
    g.replay()
    assert torch.equal(out, want)
    steps += 1
    g.replay()
    assert torch.equal(out, ops.sample_gumbel(logits, temps, seeds, steps))
