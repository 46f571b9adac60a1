"""ops.linear_rows (``x W^T`` for a decode step's few rows, the router's logits): the CPU and the
GPU give the same bits, near the float64 product; a CUDA graph replays it; bad input raises
naming the argument."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dsv4rs import ops
from profiled import launched_kernels

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows,n,k", [(1, 256, 4096), (8, 256, 4096), (3, 7, 8), (5, 129, 264), (0, 4, 16), (2, 0, 16)])
@pytest.mark.parametrize("dtype,out_dtype", [(torch.bfloat16, None), (torch.float32, None), (torch.bfloat16, torch.float32)])
def test_matches_the_float64_product(gen: torch.Generator, device: str, rows: int, n: int, k: int, dtype, out_dtype) -> None:
    x = torch.randn(rows, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) / math.sqrt(k)).to(dtype)
    got = ops.linear_rows(x.to(device), w.to(device), out_dtype)
    want_dtype = out_dtype or dtype
    assert got.dtype == want_dtype and got.shape == (rows, n) and got.device.type == device
    ref = x.double() @ w.double().T
    # float32 sums of k products (|x w| ~ 1/sqrt(k) each), then the output's rounding
    tol = 2 ** -8 if want_dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.cpu().double(), ref, rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_gives_the_cpus_bits(gen: torch.Generator, dtype) -> None:
    # warps a weight row (rust/core/src/gemv.rs split): 8 (256 x 4,096), 4 (33 x 2,048), 2 (k
    # 1,024; 1,032: 129 chunks; 600 rows), 1 (k 1,000 and 64; 2,624 rows)
    for rows, n, k in ((1, 256, 4096), (8, 256, 4096), (3, 33, 2048), (2, 9, 1024), (5, 13, 1032), (2, 600, 2048),
                       (4, 33, 1000), (7, 5, 64), (1, 2624, 4096)):
        x, w = torch.randn(rows, k, generator=gen).to(dtype), torch.randn(n, k, generator=gen).to(dtype)
        cpu = ops.linear_rows(x, w)
        gx, gw = x.cuda(), w.cuda()
        assert torch.equal(ops.linear_rows(gx, gw).cpu(), cpu)
        # torch's GEMV within float32 reordering
        torch.testing.assert_close(ops.linear_rows(gx, gw, torch.float32), F.linear(gx.float(), gw.float()),
                                   rtol=1e-4, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.profiler
def test_gpu_runs_one_kernel(gen: torch.Generator) -> None:
    for rows, n, k in ((1, 256, 4096), (8, 2624, 4096)):
        gx, gw = torch.randn(rows, k, generator=gen).cuda().bfloat16(), torch.randn(n, k, generator=gen).cuda().bfloat16()
        assert launched_kernels(lambda: ops.linear_rows(gx, gw)) == {"dsv4_gemv_rows"}


@pytest.mark.gpu
def test_gpu_graph_replays_it(gen: torch.Generator) -> None:
    x = torch.randn(2, 4096, generator=gen).bfloat16().cuda()
    w = torch.randn(256, 4096, generator=gen).bfloat16().cuda()
    ops.linear_rows(x, w)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = ops.linear_rows(x, w)
    for _ in range(3):
        x.copy_(torch.randn(2, 4096, generator=gen).bfloat16())
        g.replay()
        assert torch.equal(out, ops.linear_rows(x, w))


@pytest.mark.gpu
def test_gpu_propagates_nan_and_refuses_unaligned_starts(gen: torch.Generator) -> None:
    x = torch.randn(2, 64, generator=gen).cuda()
    w = torch.randn(3, 64, generator=gen).cuda()
    x[1, 5] = math.nan
    y = ops.linear_rows(x, w)
    assert bool(y[1].isnan().all()) and bool(y[0].isfinite().all())
    base = torch.randn(2 * 64 + 1, device="cuda")
    with pytest.raises(ValueError, match="^x: "):
        ops.linear_rows(base[1:].view(2, 64), w)


def test_bad_input_raises_naming_the_argument() -> None:
    x, w = torch.randn(2, 16), torch.randn(3, 16)
    cases = [
        (lambda: ops.linear_rows(x.double(), w), TypeError, "x"),
        (lambda: ops.linear_rows(x, w.double()), TypeError, "weight"),
        (lambda: ops.linear_rows(x[0], w), ValueError, "x"),
        (lambda: ops.linear_rows(torch.randn(ops.MAX_LINEAR_ROWS + 1, 16), w), ValueError, "x"),
        (lambda: ops.linear_rows(torch.randn(2, 12), torch.randn(3, 12)), ValueError, "x"),
        (lambda: ops.linear_rows(x, torch.randn(3, 8)), ValueError, "weight"),
        (lambda: ops.linear_rows(x, w, torch.float16), TypeError, "out_dtype"),
        (lambda: ops.linear_rows(torch.full((2, 16), math.nan), w), ValueError, "x"),
    ]
    for call, err, name in cases:
        with pytest.raises(err, match=f"^{name}: "):
            call()


def test_router_switch_takes_on_or_off_and_refuses_anything_else(gen: torch.Generator,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from dsv4rs.model.config import V4Config
    from dsv4rs.model.layers.moe import Router

    router = Router(V4Config.tiny(), hashed=False)
    with torch.no_grad():
        router.weight.normal_(generator=gen)
    x = torch.randn(2, router.weight.shape[1], generator=gen)
    ids = torch.zeros(2, dtype=torch.int64)
    want = router(x, ids)
    for value in ("on", "off", ""):
        monkeypatch.setenv("DSV4RS_ROUTER_GEMV", value)
        got = router(x, ids)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    for value in ("auto", "0", "OFF"):
        monkeypatch.setenv("DSV4RS_ROUTER_GEMV", value)
        with pytest.raises(ValueError, match="DSV4RS_ROUTER_GEMV"):
            router(x, ids)
