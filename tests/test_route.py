"""ops.moe_route (the experts and weights of each token from the router's logits) against its
float64 twin, the torch form it replaces, ties, hash layers, bad input; CPU and GPU."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dsv4rs import _core, ops, reference

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _margin(logits: torch.Tensor, bias: torch.Tensor, k: int) -> torch.Tensor:
    """Per token, the smallest gap (float64) between consecutive selection scores around the
    choice: the k chosen in order and the best one left out."""
    x = logits.double()
    a = torch.where(x > 20, x, torch.log1p(torch.exp(x))).sqrt()
    s = (a + bias.double()).sort(-1, descending=True).values[:, : k + 1]
    return (s[:, :-1] - s[:, 1:]).min(-1).values if s.shape[1] > 1 else torch.full((x.shape[0],), torch.inf)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("tokens", "experts", "k"), [(1, 256, 6), (17, 256, 6), (5, 384, 6), (3, 1, 1), (9, 33, 16),
                                                       (4, 1024, 16), (64, 64, 8), (0, 256, 6)])
def test_learned_layers_match_the_float64_twin(gen: torch.Generator, device: str, dtype: torch.dtype, tokens: int,
                                               experts: int, k: int) -> None:
    logits = (torch.randn(tokens, experts, generator=gen) * 4).to(dtype)
    logits[:, :1] = 30.0 if tokens else logits[:, :1]  # past softplus's threshold
    bias = torch.randn(experts, generator=gen) * 0.05
    for norm, scale in ((True, 2.5), (False, 1.0)):
        idx, w = ops.moe_route(logits.to(device), k, scale, bias=bias.to(device), norm=norm)
        assert idx.dtype == torch.int64 and w.dtype == torch.float32 and idx.shape == w.shape == (tokens, k)
        ri, rw = reference.moe_route(logits, k, scale, bias=bias, norm=norm)
        clear = _margin(logits.float(), bias, k) > 1e-5  # choices float32 rounding cannot reorder
        assert torch.equal(idx.cpu()[clear], ri[clear])
        torch.testing.assert_close(w.cpu()[clear].double(), rw[clear], rtol=4e-7, atol=1e-30)


@pytest.mark.parametrize("device", DEVICES)
def test_ties_go_to_the_lower_expert_in_descending_order(device: str) -> None:
    logits = torch.tensor([[1.0, 2.0, 2.0, 0.5, 2.0, 3.0], [0.0] * 6])
    idx, w = ops.moe_route(logits.to(device), 4, bias=torch.zeros(6, device=device), norm=False)
    assert idx.cpu().tolist() == [[5, 1, 2, 4], [0, 1, 2, 3]]
    # The bias chooses and does not weigh.
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 10.0]).to(device)
    idx, w = ops.moe_route(logits[1:].to(device), 2, bias=bias, norm=False)
    a0 = float(F.softplus(torch.tensor(0.0)).sqrt())
    assert idx.cpu().tolist() == [[5, 0]] and torch.allclose(w.cpu(), torch.tensor([[a0, a0]]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("tokens", [7, 300])  # on the GPU: a block a token, a warp a token
def test_hash_layers_take_the_table_and_weigh_by_affinity(gen: torch.Generator, device: str,
                                                          index_dtype: torch.dtype, tokens: int) -> None:
    logits = torch.randn(tokens, 256, generator=gen) * 3
    table = torch.randint(0, 256, (500, 6), generator=gen, dtype=torch.int64).to(index_dtype)
    ids = torch.randint(0, 500, (tokens,), generator=gen, dtype=torch.int64).to(index_dtype)
    idx, w = ops.moe_route(logits.to(device), 6, 1.5, table=table.to(device), ids=ids.to(device))
    ri, rw = reference.moe_route(logits, 6, 1.5, table=table, ids=ids)
    assert torch.equal(idx.cpu(), ri) and torch.equal(ri, table[ids.long()].long())
    torch.testing.assert_close(w.cpu().double(), rw, rtol=4e-7, atol=0)


def test_the_torch_form_it_replaces_chooses_the_same_in_float32(gen: torch.Generator) -> None:
    """The Router's former torch ops in a float32 model: the same experts where float32 rounding
    cannot reorder them, the same weights to float32 rounding."""
    logits = torch.randn(40, 256, generator=gen) * 2
    bias = torch.randn(256, generator=gen) * 0.05
    scores = F.softplus(logits).sqrt()
    want_idx = torch.topk(scores + bias, 6, dim=-1).indices
    want_w = scores.gather(1, want_idx)
    want_w = want_w / (want_w.sum(-1, keepdim=True) + 1e-20) * 2.5
    idx, w = ops.moe_route(logits, 6, 2.5, bias=bias)
    clear = _margin(logits, bias, 6) > 1e-5
    assert int(clear.sum()) > 30
    assert torch.equal(idx[clear], want_idx[clear])
    torch.testing.assert_close(w[clear], want_w[clear], rtol=1e-6, atol=0)


@pytest.mark.gpu
def test_gpu_equals_cpu_and_replays_in_a_graph(gen: torch.Generator) -> None:
    for tokens in (1, 128, 129, 600):  # the wide form up to 128 tokens, then a warp a token
        logits = torch.randn(tokens, 256, generator=gen) * 4
        bias = torch.randn(256, generator=gen) * 0.05
        for norm in (True, False):
            ci, cw = ops.moe_route(logits, 6, 2.5, bias=bias, norm=norm)
            gi, gw = ops.moe_route(logits.cuda(), 6, 2.5, bias=bias.cuda(), norm=norm)
            clear = _margin(logits, bias, 6) > 1e-6
            assert torch.equal(gi.cpu()[clear], ci[clear])
            torch.testing.assert_close(gw.cpu()[clear], cw[clear], rtol=4e-7, atol=0)
    logits = torch.randn(33, 256, generator=gen) * 4
    bias = torch.randn(256, generator=gen) * 0.05
    gl, gb = logits.cuda(), bias.cuda()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_i, out_w = ops.moe_route(gl, 6, 2.5, bias=gb)
    gl.copy_(torch.randn(33, 256, generator=gen).cuda() * 4)
    graph.replay()
    want_i, want_w = ops.moe_route(gl, 6, 2.5, bias=gb)
    assert torch.equal(out_i, want_i) and torch.equal(out_w, want_w)


@pytest.mark.gpu
@pytest.mark.parametrize("experts,k", [(256, 6), (1000, 16), (33, 16), (16, 3), (1024, 8)])
@pytest.mark.parametrize("tokens", [37, 200])  # a block a token (decode calls), a warp a token
def test_gpu_selection_equals_the_cpus_on_ties_infinities_and_nan(gen: torch.Generator, experts: int, k: int,
                                                                   tokens: int) -> None:
    """Scores that tie exactly (equal logits, so every affinity is one value on each device, and
    biases drawn from a few values), -0 and +0, both infinities and NaN: the GPU's k rounds choose
    the CPU twin's experts in its order (NaN first, larger first, ties to the lower expert), in
    both of the kernel's forms."""
    logits = torch.full((tokens, experts), 0.25)
    logits[::5] = -200.0  # softplus underflows to 0: every score is the bias itself
    bias = torch.tensor([0.0, -0.0, 0.5, 0.5, -1.0, math.inf, -math.inf, 2.0])[
        torch.randint(0, 8, (experts,), generator=gen)]
    for b in (bias, torch.where(torch.rand(experts, generator=gen) < 0.02, math.nan, bias)):
        ci, cw = ops.moe_route(logits, k, 1.5, bias=b)
        gi, gw = ops.moe_route(logits.cuda(), k, 1.5, bias=b.cuda())
        assert torch.equal(gi.cpu(), ci)
        torch.testing.assert_close(gw.cpu(), cw, rtol=4e-7, atol=0, equal_nan=True)


@pytest.mark.gpu
def test_gpu_takes_nan_first_and_skips_out_of_range_hash_entries() -> None:
    logits = torch.zeros(3, 16, device="cuda")
    logits[0, 9] = torch.nan
    idx, w = ops.moe_route(logits, 3, bias=torch.zeros(16, device="cuda"), norm=False)
    assert idx[0].tolist() == [9, 0, 1] and bool(torch.isnan(w[0, 0]))
    table = torch.tensor([[1, 2], [3, 99]], device="cuda")
    ids = torch.tensor([0, 1, 7], device="cuda")
    idx, w = ops.moe_route(torch.zeros(3, 16, device="cuda"), 2, table=table, ids=ids)
    a = float(F.softplus(torch.tensor(0.0)).sqrt())
    assert idx.tolist() == [[1, 2], [3, -1], [-1, -1]]
    torch.testing.assert_close(w.cpu(), torch.tensor([[0.5, 0.5], [a / (a + 1e-20), 0.0], [0.0, 0.0]]))


def test_bad_input_raises_naming_the_argument() -> None:
    logits, bias = torch.randn(2, 8), torch.zeros(8)
    table, ids = torch.zeros(4, 2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)
    cases = [
        (lambda: ops.moe_route(logits.double(), 2, bias=bias), TypeError, "logits"),
        (lambda: ops.moe_route(logits[0], 2, bias=bias), ValueError, "logits"),
        (lambda: ops.moe_route(torch.randn(2, _core.MAX_ROUTE_EXPERTS + 1), 2, bias=torch.zeros(_core.MAX_ROUTE_EXPERTS + 1)),
         ValueError, "logits"),
        (lambda: ops.moe_route(logits, 0, bias=bias), ValueError, "k"),
        (lambda: ops.moe_route(logits, 9, bias=bias), ValueError, "k"),
        (lambda: ops.moe_route(torch.randn(2, 64), _core.MAX_ROUTE_K + 1, bias=torch.zeros(64)), ValueError, "k"),
        (lambda: ops.moe_route(logits, 2, bias=bias.double()), TypeError, "bias"),
        (lambda: ops.moe_route(logits, 2, bias=torch.zeros(7)), ValueError, "bias"),
        (lambda: ops.moe_route(logits, 2), ValueError, "bias"),
        (lambda: ops.moe_route(logits, 2, bias=bias, table=table, ids=ids), ValueError, "bias"),
        (lambda: ops.moe_route(logits, 2, table=table), ValueError, "bias"),
        (lambda: ops.moe_route(logits, 2, table=table.float(), ids=ids), TypeError, "table"),
        (lambda: ops.moe_route(logits, 2, table=table[:, :1], ids=ids), ValueError, "table"),
        (lambda: ops.moe_route(logits, 2, table=table, ids=ids[:1]), ValueError, "ids"),
        (lambda: ops.moe_route(logits, 2, table=table, ids=torch.tensor([0, 4])), IndexError, "ids"),
        (lambda: ops.moe_route(logits, 2, table=table + 8, ids=ids), IndexError, "table"),
        (lambda: ops.moe_route(torch.full((2, 8), torch.nan), 2, bias=bias), ValueError, "logits"),
        (lambda: ops.moe_route(logits, 2, float("nan"), bias=bias), ValueError, "scale"),
        (lambda: ops.moe_route(logits, 2, bias=bias, norm=1), TypeError, "norm"),
    ]
    for call, err, name in cases:
        with pytest.raises(err, match=name):
            call()
