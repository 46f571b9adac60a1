"""Fidelity to DeepSeek's own numerics: the FP4 quantizer's block-maximum floor."""

from __future__ import annotations

import pytest
import torch

from dsv4rs import ops
from dsv4rs import reference as ref


@pytest.mark.parametrize("scale", [1e-3, 1e-6, 1e-20, 1e-36])
def test_fp4_keeps_tiny_blocks_as_deepseek_does(gen: torch.Generator, scale: float) -> None:
    """FP4 floors a block's maximum at 6 * 2^-126 (DeepSeek's FP4 quantizer), not at FP8's 1e-4:
    a block of tiny values keeps FP4's relative resolution instead of rounding to zero."""
    x = torch.randn(8, 128, generator=gen) * scale
    got = ops.index_key_round_trip(x, "fp4")
    want = ref.fp4_quant_dequant(x)
    assert torch.equal(got.double(), want)
    blocks = x.view(8, 4, 32)
    err = (got.view(8, 4, 32) - blocks).abs().amax(-1)
    amax = blocks.abs().amax(-1)
    assert bool((err <= amax / 4 + 1e-45).all())  # e2m1 rounds within a quarter of the block max
    assert bool((got != 0).any())
    e = ref.ue8m0_exponent(torch.tensor([0.0, 1e-6]), ref.FP4_MAX)
    assert e.tolist() == [-126, -22]


def test_fp8_keeps_its_own_floor(gen: torch.Generator) -> None:
    x = torch.randn(4, 128, generator=gen) * 1e-9
    assert ref.ue8m0_exponent(torch.tensor([0.0]), ref.FP8_MAX).item() == ref.ue8m0_exponent(
        torch.tensor([ref.AMAX_FLOOR]), ref.FP8_MAX).item()
    assert torch.equal(ops.index_key_round_trip(x, "fp8").double(), ref.fp8_key_quant_dequant(x))


@pytest.mark.gpu
@pytest.mark.parametrize("scale", [1e-6, 1e-36])
def test_gpu_fp4_floor_matches_the_cpu(gen: torch.Generator, scale: float) -> None:
    x = torch.randn(8, 128, generator=gen) * scale
    assert torch.equal(ops.index_key_round_trip(x.cuda(), "fp4").cpu(), ops.index_key_round_trip(x, "fp4"))
    cache = ops.quantize_index_keys(x.cuda(), "fp4")
    assert torch.equal(ops.index_key_read(cache, torch.arange(8, device="cuda"), "fp4").cpu(),
                       ops.index_key_round_trip(x, "fp4"))
