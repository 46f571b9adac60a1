"""The cache formats are one definition in three places: the Rust CPU kernels (dsv4rs.ops on
CPU tensors), the CUDA kernels (test_gpu_formats.py checks them against the CPU) and the float64
reference. Here: the CPU bytes equal the reference's bytes, and their decodes agree."""

from __future__ import annotations

import pytest
import torch

from dsv4rs import ops, reference


def values(gen: torch.Generator, n: int, dim: int) -> torch.Tensor:
    """Random rows over many magnitudes, with the rounding corner cases in the first row."""
    x = torch.randn(n, dim, generator=gen) * torch.logspace(-6, 6, n).unsqueeze(1)
    corners = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 448.0, 1.0625, -1.1875, 6.0, 5.0, 0.25, 0.75, -2.5])
    x[0, : len(corners)] = corners
    return x


@pytest.mark.parametrize("n", [1, 64, 130])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_main_entry_bytes_match_reference(gen: torch.Generator, n: int, dtype: torch.dtype) -> None:
    x = values(gen, n, 512).to(dtype)
    expected = reference.pack_pages(reference.encode_main_entries(x), 576)
    assert torch.equal(ops.quantize_entries(x), expected)
    decoded = ops.kv_read(ops.quantize_entries(x), torch.arange(n))
    assert torch.equal(decoded.double(), reference.entry_quant_dequant(x))


@pytest.mark.parametrize("fmt,data_bytes", [("fp4", 64), ("fp8", 128)])
@pytest.mark.parametrize("n", [1, 64, 130])
def test_index_key_bytes_match_reference(gen: torch.Generator, fmt: str, data_bytes: int, n: int) -> None:
    x = values(gen, n, 128)
    expected = reference.pack_pages(reference.encode_index_keys(x, fmt), data_bytes)
    assert torch.equal(ops.quantize_index_keys(x, fmt), expected)
    decoded = ops.index_key_read(ops.quantize_index_keys(x, fmt), torch.arange(n), fmt).double()
    twin = reference.fp4_quant_dequant(x) if fmt == "fp4" else reference.fp8_key_quant_dequant(x)
    assert torch.equal(decoded, twin)


def test_hadamard_matches_reference(gen: torch.Generator) -> None:
    x = torch.randn(300, 128, generator=gen)
    torch.testing.assert_close(ops.hadamard128(x).double(), reference.hadamard128(x), rtol=1e-6, atol=1e-6)
