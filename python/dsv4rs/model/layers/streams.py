"""Side CUDA streams for the work a layer can run beside its main path.

A decode step at small batch runs one small kernel after another, none filling the GPU. Where a
layer has two chains that read nothing the other writes (the shared expert beside the router and
the routed experts; the entry's norm, RoPE and cache writes, and the compressors, beside the
query's projections), :func:`fork` starts a side stream after everything queued so far, the side
chain is queued on it (:func:`on`), and :func:`join` makes the current stream wait for it before
anything reads its results. A layer may run several side chains at once (lanes), one may wait for
another (:func:`join` inside :func:`on`), and chains on the critical path are marked urgent (a
stream of the GPU's highest priority). CUDA graphs capture the forks and the joins. On the CPU,
or with :data:`ENABLED` off, the chains run one after the other, as written: the same values
either way.

Memory: the caching allocator hands a freed block only to later work of the stream that
allocated it. What a side chain reads from another stream (its inputs) must stay referenced
until the joins, and every side chain starts by waiting for the main stream (directly, or through
the chain it forked from), so no stream reuses memory another may still be reading.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["ENABLED", "fork", "join", "on"]

ENABLED = True
"""Whether layers run their side chains on a second stream on a GPU."""

_STREAMS: dict[tuple[torch.device, int, bool], torch.cuda.Stream] = {}


def fork(x: torch.Tensor, lane: int = 0, urgent: bool = False) -> torch.cuda.Stream | None:
    """Side stream ``lane`` of ``x``'s GPU (0, or 1 for a third chain beside the other two), made
    to wait for everything queued on the current stream; ``None`` on the CPU or when
    :data:`ENABLED` is off. An ``urgent`` chain runs on a stream of the GPU's highest priority
    (its own streams, one a lane): where both streams have blocks waiting, the GPU starts the
    urgent chain's first, so its small kernels do not wait behind the remaining blocks of a
    large kernel on the other stream. CUDA graphs keep the priority (torch instantiates them so)."""
    if not (ENABLED and x.is_cuda):
        return None
    key = (x.device, lane, urgent)
    stream = _STREAMS.get(key)
    if stream is None:
        stream = _STREAMS[key] = torch.cuda.Stream(x.device, priority=-1 if urgent else 0)
    stream.wait_stream(torch.cuda.current_stream(x.device))
    return stream


def on(stream: torch.cuda.Stream | None) -> contextlib.AbstractContextManager:
    """Queues the block on ``stream`` (in place when ``None``)."""
    return contextlib.nullcontext() if stream is None else torch.cuda.stream(stream)


def join(stream: torch.cuda.Stream | None) -> None:
    """Makes the current stream wait for everything queued on ``stream`` so far."""
    if stream is not None:
        torch.cuda.current_stream(stream.device).wait_stream(stream)
