"""ops.rms_norm_rope (a row's RMSNorm, rounded to the norm's dtype, then RoPE): the same values as
``rope(rms_norm(...))`` on every device, near the float64 twin; one kernel on a GPU where the rows
allow it (the two ops elsewhere), captured by CUDA graphs; bad input raises naming the argument."""

from __future__ import annotations

import math

import pytest
import torch

from dsv4rs import ops, reference
from dsv4rs.reference import ops as ref_ops
from profiled import DEVICES as PROFILED_DEVICES, launched_kernels

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def inputs(gen: torch.Generator, shape: tuple, dtype: torch.dtype, weight: str | None):
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    w = None if weight is None else (torch.rand(shape[-1], generator=gen) + 0.5).to(getattr(torch, weight))
    positions = torch.randint(0, 1 << 20, (shape[0],), generator=gen)
    inv_freq = ref_ops.official_inv_freq(64, 10000.0) if shape[-1] >= 64 else ref_ops.official_inv_freq(2, 10000.0)
    return x, w, positions, inv_freq


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(3, 64, 512), (2, 512), (5, 3, 128), (1, 2, 64), (2, 3, 6), (2, 1, 516), (0, 4, 512)])
@pytest.mark.parametrize("dtype,weight,norm_dtype", [(torch.bfloat16, None, torch.bfloat16),
                                                      (torch.bfloat16, "float32", torch.bfloat16),
                                                      (torch.float32, "bfloat16", torch.float32),
                                                      (torch.float32, None, torch.bfloat16)])
@pytest.mark.parametrize("table", ["official", "exact"])
def test_equals_the_two_ops_and_the_float64_twin(gen: torch.Generator, device: str, shape: tuple, dtype, weight,
                                                 norm_dtype, table: str) -> None:
    x, w, positions, inv_freq = inputs(gen, shape, dtype, weight)
    x, positions, inv_freq = x.to(device), positions.to(device), inv_freq.to(device)
    w = None if w is None else w.to(device)
    got = ops.rms_norm_rope(x, w, 1e-6, positions, inv_freq, norm_dtype=norm_dtype, table=table)
    want = ops.rope(ops.rms_norm(x, w, 1e-6, norm_dtype), positions, inv_freq, table=table)
    assert got.dtype == torch.float32 and got.shape == x.shape and got.device.type == device
    assert torch.equal(got, want)
    if x.numel():
        ref = reference.apply_rope(reference.rms_norm(x.double().cpu(), None if w is None else w.double().cpu(), 1e-6),
                                   positions.cpu(), inv_freq.double().cpu(), table=table)
        # The norm rounded to bfloat16: half a unit of |x| <= ~4 before the rotation, whose
        # outputs may cancel to near zero, so an absolute bound too.
        tol, atol = (2 ** -7, 2 ** -6) if norm_dtype == torch.bfloat16 else (2e-5, 1e-5)
        if table == "official":  # the angle rounded in float32: up to 1.5e-2 rad near 2^20
            atol = 5e-2
        torch.testing.assert_close(got.cpu().double(), ref, rtol=tol, atol=atol)


@pytest.mark.parametrize("device", PROFILED_DEVICES)
@pytest.mark.parametrize("total,cols,fused", [(1536, (1024, 1536), True), (1540, (1028, 1540), True),
                                              (1538, (1026, 1538), False), (70, (3, 67), False)])
def test_a_column_range_is_read_in_place(gen: torch.Generator, device: str, total: int, cols: tuple[int, int],
                                         fused: bool) -> None:
    """The entry's rows as the packed q_a/kv projection leaves them (a column range): the values
    of the contiguous copy; on a GPU one kernel without a copy where the stride and the start are
    four-value aligned, else the two ops."""
    y = (torch.randn(9, total, generator=gen) * 3).bfloat16()
    w = torch.rand(cols[1] - cols[0], generator=gen) + 0.5
    positions = torch.randint(0, 1 << 20, (9,), generator=gen)
    inv_freq = ref_ops.official_inv_freq(64, 10000.0)
    y, w, positions, inv_freq = y.to(device), w.to(device), positions.to(device), inv_freq.to(device)
    x = y[:, cols[0]:cols[1]]
    got = ops.rms_norm_rope(x, w, 1e-6, positions, inv_freq)
    assert torch.equal(got, ops.rms_norm_rope(x.contiguous(), w, 1e-6, positions, inv_freq))
    if device == "cuda":
        names = launched_kernels(lambda: ops.rms_norm_rope(x, w, 1e-6, positions, inv_freq))
        assert names == ({"dsv4_rms_norm_rope"} if fused else {"dsv4_rms_norm", "dsv4_rope_one"}), names


@pytest.mark.gpu
@pytest.mark.profiler
@pytest.mark.parametrize("shape,fused", [((4, 64, 512), True), ((3, 512), True), ((2, 8, 4), True),
                                          ((2, 2, 516), False), ((2, 2, 6), False)])
def test_gpu_is_one_kernel_where_the_rows_allow_it(gen: torch.Generator, shape: tuple, fused: bool) -> None:
    x, w, positions, inv_freq = (t.cuda() for t in inputs(gen, shape, torch.bfloat16, "float32"))
    names = launched_kernels(lambda: ops.rms_norm_rope(x, w, 1e-6, positions, inv_freq))
    # (the shapes are small: RoPE alone takes its one-value-a-thread kernel, tests/test_ops_runtime.py)
    assert names == ({"dsv4_rms_norm_rope"} if fused else {"dsv4_rms_norm", "dsv4_rope_one"}), names
    # a start not aligned to four values takes the two ops, with the same values
    base = torch.randn(x.numel() + 1, generator=gen).bfloat16().cuda()
    odd = base[1:].view(shape)
    names = launched_kernels(lambda: ops.rms_norm_rope(odd, w, 1e-6, positions, inv_freq))
    assert names == {"dsv4_rms_norm", "dsv4_rope_one"}, names
    assert torch.equal(ops.rms_norm_rope(odd, w, 1e-6, positions, inv_freq),
                       ops.rope(ops.rms_norm(odd, w, 1e-6), positions, inv_freq))


@pytest.mark.gpu
def test_gpu_keeps_nan_and_infinity_as_the_two_ops(gen: torch.Generator) -> None:
    x, _, positions, inv_freq = (t.cuda() if t is not None else None for t in inputs(gen, (3, 4, 512), torch.bfloat16, None))
    x[0, 1, 7] = math.nan
    x[1, 2, 500] = math.inf
    x[2, 3] = 0.0  # a zero row: rsqrt(eps), finite
    got = ops.rms_norm_rope(x, None, 1e-6, positions.int(), inv_freq)
    want = ops.rope(ops.rms_norm(x, None, 1e-6), positions.int(), inv_freq)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())


@pytest.mark.gpu
def test_gpu_graph_replays_it(gen: torch.Generator) -> None:
    x, w, positions, inv_freq = (t.cuda() for t in inputs(gen, (2, 64, 512), torch.bfloat16, "float32"))
    ops.rms_norm_rope(x, w, 1e-6, positions, inv_freq)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = ops.rms_norm_rope(x, w, 1e-6, positions, inv_freq)
    for _ in range(3):
        x.copy_((torch.randn(x.shape, generator=gen) * 3).bfloat16())
        positions.copy_(torch.randint(0, 1 << 20, positions.shape, generator=gen))
        g.replay()
        assert torch.equal(out, ops.rope(ops.rms_norm(x, w, 1e-6), positions, inv_freq))


def test_bad_input_raises_naming_the_argument() -> None:
    x, w = torch.randn(2, 4, 64), torch.ones(64)
    p, f = torch.arange(2), ref_ops.official_inv_freq(64, 10000.0)
    cases = [
        (lambda: ops.rms_norm_rope(x.double(), w, 1e-6, p, f), TypeError, "x"),
        (lambda: ops.rms_norm_rope(x[0, 0], w, 1e-6, p, f), ValueError, "x"),
        (lambda: ops.rms_norm_rope(x, torch.ones(63), 1e-6, p, f), ValueError, "weight"),
        (lambda: ops.rms_norm_rope(x, w.double(), 1e-6, p, f), TypeError, "weight"),
        (lambda: ops.rms_norm_rope(x, w, 0.0, p, f), ValueError, "eps"),
        (lambda: ops.rms_norm_rope(x, w, True, p, f), TypeError, "eps"),
        (lambda: ops.rms_norm_rope(x, w, 1e-6, p[:1], f), ValueError, "positions"),
        (lambda: ops.rms_norm_rope(x, w, 1e-6, p, torch.ones(33)), ValueError, "inv_freq"),
        (lambda: ops.rms_norm_rope(x, w, 1e-6, p, f, norm_dtype=torch.float16), TypeError, "norm_dtype"),
        (lambda: ops.rms_norm_rope(x, w, 1e-6, p, f, table="fast"), ValueError, "table"),
        (lambda: ops.rms_norm_rope(torch.full((2, 4, 64), math.nan), w, 1e-6, p, f), ValueError, "x"),
    ]
    for call, err, name in cases:
        with pytest.raises(err, match=f"^{name}: "):
            call()
