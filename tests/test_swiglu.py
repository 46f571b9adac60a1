"""ops.swiglu (the shared expert's clamped SwiGLU in one kernel) against its float64 twin and the
torch form it replaces; NaN, the clamps, bad input; CPU and GPU."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dsv4rs import ops, reference
from profiled import DEVICES as PROFILED_DEVICES, launched_kernels

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 2048), (7, 33), (3, 4, 5), (0, 8), (1,), ()])
def test_matches_the_float64_twin(gen: torch.Generator, device: str, dtype: torch.dtype, shape: tuple) -> None:
    gate = (torch.randn(shape, generator=gen) * 8).to(dtype)
    up = (torch.randn(shape, generator=gen) * 8).to(dtype)
    for limit in (10.0, 3.0, math.inf):
        got = ops.swiglu(gate.to(device), up.to(device), limit)
        assert got.dtype == dtype and got.shape == gate.shape and got.device.type == device
        want = reference.swiglu(gate, up, limit)
        # float32 math rounded once to the output: within float32's few ulps, then the output's.
        tol = 2e-6 if dtype == torch.float32 else 2 ** -8
        torch.testing.assert_close(got.cpu().double(), want, rtol=tol, atol=1e-30)


def test_the_torch_form_it_replaces_agrees_in_float32(gen: torch.Generator) -> None:
    gate, up = torch.randn(64, 512, generator=gen) * 6, torch.randn(64, 512, generator=gen) * 6
    want = F.silu(gate.clamp(max=10.0)) * up.clamp(-10.0, 10.0)
    torch.testing.assert_close(ops.swiglu(gate, up, 10.0), want, rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
def test_gpu_keeps_nan_and_equals_the_cpu(gen: torch.Generator) -> None:
    gate, up = torch.randn(5, 4096, generator=gen) * 8, torch.randn(5, 4096, generator=gen) * 8
    torch.testing.assert_close(ops.swiglu(gate.cuda(), up.cuda(), 10.0).cpu(), ops.swiglu(gate, up, 10.0),
                               rtol=4e-7, atol=0)
    odd = ops.swiglu(gate.cuda()[:, 1:], up.cuda()[:, 1:], 10.0)  # rows at a stride, a value a thread
    torch.testing.assert_close(odd.cpu(), ops.swiglu(gate[:, 1:], up[:, 1:], 10.0), rtol=4e-7, atol=0)
    g = torch.tensor([math.nan, 1.0, 1.0], device="cuda")
    u = torch.tensor([1.0, math.nan, 1.0], device="cuda")
    out = ops.swiglu(g, u, 10.0)
    assert bool(out[:2].isnan().all()) and bool(out[2:].isfinite().all())


@pytest.mark.parametrize("device", PROFILED_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,width,start,pad", [(5, 2048, 0, 0), (4, 8, 4, 4), (3, 6, 0, 3), (33, 100, 1, 3),
                                                  (1, 12, 2, 0), (0, 8, 0, 0)])
def test_column_ranges_are_read_in_place(gen: torch.Generator, device: str, dtype: torch.dtype, rows: int, width: int,
                                         start: int, pad: int) -> None:
    """The halves of a packed gate-up output (and columns of two matrices of different widths)
    give what their contiguous copies give; on a GPU in the one kernel, nothing copied (four
    values a thread where the strides and starts allow it, else one)."""
    packed = (torch.randn(rows, start + 2 * width + pad, generator=gen) * 8).to(dtype).to(device)
    other = (torch.randn(rows, 3 * width, generator=gen) * 8).to(dtype).to(device)
    gate, up = packed[:, start:start + width], packed[:, start + width:start + 2 * width]
    for g, u in ((gate, up), (gate, other[:, width:2 * width]), (other[:, :width], up)):
        assert not g.is_contiguous() or rows <= 1
        got = ops.swiglu(g, u, 7.0)
        assert got.is_contiguous() and got.shape == g.shape
        assert torch.equal(got, ops.swiglu(g.contiguous(), u.contiguous(), 7.0))
        if device == "cuda" and rows:
            assert launched_kernels(lambda: ops.swiglu(g, u, 7.0)) == {"dsv4_swiglu"}
    # rows not one stride apart: copied first
    stacked = packed[:, start:start + 2 * width].unflatten(0, (1, rows)).expand(2, rows, -1)
    want = ops.swiglu(stacked[..., :width].contiguous(), stacked[..., width:].contiguous(), 7.0)
    assert torch.equal(ops.swiglu(stacked[..., :width], stacked[..., width:], 7.0), want)


def test_bad_input_raises_naming_the_argument() -> None:
    g = torch.randn(3, 4)
    cases = [
        (lambda: ops.swiglu(g.double(), g), TypeError, "gate"),
        (lambda: ops.swiglu(g, g.double()), TypeError, "up"),
        (lambda: ops.swiglu(g, g[:, :3]), ValueError, "up"),
        (lambda: ops.swiglu(g, g, 0.0), ValueError, "limit"),
        (lambda: ops.swiglu(g, g, math.nan), ValueError, "limit"),
        (lambda: ops.swiglu(torch.full((3,), math.inf), torch.ones(3)), ValueError, "gate"),
    ]
    for call, err, name in cases:
        with pytest.raises(err, match=name):
            call()
