"""What the GPU ran, seen by torch's profiler (tests that use it carry the ``profiler`` marker:
CUPTI cannot attach under compute-sanitizer)."""

from __future__ import annotations

import pytest
import torch

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.profiler])]
"""The devices of a test that asks the profiler which kernels ran on the GPU."""


def launched_kernels(fn) -> set[str]:
    """Names of the CUDA kernels one call of ``fn`` launches."""
    return set(kernel_launches(fn))


def kernel_launches(fn) -> dict[str, int]:
    """How many times one call of ``fn`` launches each CUDA kernel, by name."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.key: e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA}
