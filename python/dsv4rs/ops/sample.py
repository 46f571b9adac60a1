"""Gumbel-max sampling of one token per row in one kernel, CPU and GPU: the unfiltered sampler of
:mod:`dsv4rs.runtime.sampling` (:func:`~dsv4rs.runtime.sampling.gumbel_max`) without its two
dozen small tensor ops."""

from __future__ import annotations

import torch

from dsv4rs import _core
from dsv4rs._tensor import as_tensor, spec, stream
from dsv4rs.ops._checks import ndim


@torch.library.custom_op("dsv4rs::sample_gumbel", mutates_args=())
def _sample_gumbel(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor
                   ) -> torch.Tensor:
    out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    _core.sample_gumbel(spec("logits", logits), spec("temperature", temperature), spec("seeds", seeds),
                        spec("steps", steps), spec("out", out), stream(logits))
    return out


@_sample_gumbel.register_fake
def _(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    return logits.new_empty(logits.shape[0], dtype=torch.int64)


def sample_gumbel(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor
                  ) -> torch.Tensor:
    """One token per row: ``argmax_v logits[b, v] / temperature[b] + g[b, v]`` with Gumbel noise
    ``g = -log(-log(u))`` of the counter-based uniforms
    :func:`dsv4rs.runtime.sampling.uniform` ``(seeds, steps, V)``, or the plain arg max where
    ``temperature[b] <= 0``.

    Args:
        logits: ``float32 [B, V]``, ``V >= 1``.
        temperature: ``float32 [B]``.
        seeds, steps: ``int64 [B]``; a row's draws depend on its seed and step alone.

    Returns:
        ``int64 [B]``, each in ``[0, V)``. The float32 operations of
        :func:`dsv4rs.runtime.sampling.gumbel_max` in its order (on the GPU the same results bit
        for bit; the CPU's logarithm may round differently, which can only matter between scores
        within float32 rounding of each other); arg max as torch's (a NaN above everything, ties
        to the lowest index). One kernel, no synchronization.
    """
    logits = as_tensor("logits", logits)
    ndim("logits", logits, 2)
    return _sample_gumbel(logits, as_tensor("temperature", temperature), as_tensor("seeds", seeds),
                          as_tensor("steps", steps))
