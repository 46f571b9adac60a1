"""KV-entry formats on the GPU: bytes identical to the CPU kernels, reads identical, indices
outside the cache never touch memory, launches follow the caller's stream and CUDA graphs."""

from __future__ import annotations

import pytest
import torch

from dsv4rs import _core, ops
from conftest import gpu_available
from fp8_cases import blocks

gpu = pytest.mark.gpu


def rand(gen: torch.Generator, *shape: int) -> torch.Tensor:
    scales = torch.logspace(-4, 4, shape[0]).reshape(-1, *([1] * (len(shape) - 1)))
    return torch.randn(*shape, generator=gen) * scales


@gpu
@pytest.mark.parametrize("n", [1, 3, 64, 1001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
def test_kv_write_bytes_match_cpu(gen: torch.Generator, n: int, dtype: torch.dtype, offset: int) -> None:
    """The device's entries are the CPU's, byte for byte; ``misaligned``: the rows start one value
    past a 16-byte boundary (the kernel then reads a value at a time). Odd counts leave the last
    block of the row kernels (two entries a block) half empty."""
    x = rand(gen, n, 512).to(dtype)
    x[0, :7] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 448.0, 1.0625, -1.1875])
    cpu = ops.quantize_entries(x)
    flat = torch.empty(n * 512 + offset, dtype=dtype, device="cuda")
    xd = flat[offset:].view(n, 512)
    xd.copy_(x)
    assert (xd.data_ptr() % 16 == 0) == (offset == 0)
    dev = ops.quantize_entries(xd)
    assert torch.equal(dev.cpu(), cpu)
    rows = torch.randint(-1, n, (3 * n,), generator=gen)
    assert torch.equal(ops.kv_read(dev, rows.cuda()).cpu(), ops.kv_read(cpu, rows))


@gpu
def test_fp8_bytes_match_cpu_at_every_rounding_boundary(gen: torch.Generator) -> None:
    """Every e4m3 rounding decision (each code, each tie between neighbours and the float32 values
    either side of it, both signs, tests/fp8_cases.py) at three block scales: the device's entry
    and FP8 key bytes are the CPU's, which test_formats.py holds to round-to-nearest-even. The
    RoPE dims take bf16 ties, float32 subnormals and values near bf16's largest."""
    x, _ = blocks(64, per_row=7)
    special = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1e-40, -1e-40, 2**-149, 3.3e38, -3.3e38])
    rope = torch.randn(x.shape[0], 64, generator=gen)
    rope[:, : special.numel()] = special
    entries = torch.cat([x, rope], dim=1)
    for e in (entries, entries.bfloat16()):
        assert torch.equal(ops.quantize_entries(e.cuda()).cpu(), ops.quantize_entries(e))
    keys, _ = blocks(128)
    for k in (keys, keys.bfloat16()):
        assert torch.equal(ops.quantize_index_keys(k.cuda(), "fp8").cpu(), ops.quantize_index_keys(k, "fp8"))


@gpu
@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_index_keys_match_cpu(gen: torch.Generator, fmt: str, dtype: torch.dtype) -> None:
    x = rand(gen, 777, 128).to(dtype)
    cpu = ops.quantize_index_keys(x, fmt)
    dev = ops.quantize_index_keys(x.cuda(), fmt)
    assert torch.equal(dev.cpu(), cpu)
    rows = torch.randint(-1, 777, (1000,), generator=gen)
    assert torch.equal(ops.index_key_read(dev, rows.cuda(), fmt).cpu(), ops.index_key_read(cpu, rows, fmt))


@gpu
def test_hadamard_matches_cpu_bit_for_bit(gen: torch.Generator) -> None:
    x = rand(gen, 4097, 128)
    assert torch.equal(ops.hadamard128(x.cuda()).cpu(), ops.hadamard128(x))
    xb = x.bfloat16()
    assert torch.equal(ops.hadamard128(xb.cuda()).cpu(), ops.hadamard128(xb))


@gpu
def test_out_of_range_ids_are_skipped_on_gpu(gen: torch.Generator) -> None:
    cache = ops.new_kv_cache(2, "cuda")
    x = rand(gen, 4, 512)
    ops.kv_write(cache, torch.tensor([5, 128, -7, 10**12], device="cuda"), x.cuda())
    expected = ops.new_kv_cache(2)
    ops.kv_write(expected, torch.tensor([5, -1, -1, -1]), x)
    assert torch.equal(cache.cpu(), expected), "only the in-range slot is written"
    out = ops.kv_read(cache, torch.tensor([128, -5, 10**15, 5], device="cuda")).cpu()
    assert (out[:3] == 0).all()
    assert torch.equal(out[3], ops.kv_read(expected, torch.tensor([5]))[0])


@gpu
def test_runs_on_the_callers_stream_and_in_cuda_graphs(gen: torch.Generator) -> None:
    ops.warm_up("cuda")
    x = rand(gen, 256, 512).cuda()
    slots = torch.arange(256, device="cuda")
    cache = ops.new_kv_cache(4, "cuda")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            ops.kv_write(cache, slots, x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(cache.cpu(), ops.quantize_entries(x.cpu()))
    x.mul_(-2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(cache.cpu(), ops.quantize_entries(x.cpu()))


@pytest.mark.skipif(gpu_available(), reason="checks the error a machine without a GPU gives")
def test_gpu_call_without_gpu_raises_cuda_error() -> None:
    spec = lambda shape, dtype: (1 << 20, shape, dtype, 0, shape[-1])  # noqa: E731 - never dereferenced
    with pytest.raises(_core.CudaError, match="no CUDA device|no CUDA kernels"):
        _core.kv_write(spec((1, 37376), "uint8"), spec((1,), "int64"), spec((1, 512), "float32"), 0)


@pytest.mark.skipif(gpu_available(), reason="checks the error a machine without a GPU gives")
def test_attention_kernel_without_gpu_raises_cuda_error() -> None:
    with pytest.raises(_core.CudaError, match="no CUDA device|no CUDA kernels|libcuda"):
        _core.attention_kernel(0)


def test_attention_kernel_refuses_a_cpu_device() -> None:
    with pytest.raises(ValueError, match="device"):
        ops.attention_kernel("cpu")
