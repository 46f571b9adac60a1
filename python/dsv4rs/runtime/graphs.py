"""CUDA graphs of the decode step, one per batch-size bucket (as serving engines do).

A decode step (one token per sequence) has the same kernels and shapes for every batch of a
given size. :class:`DecodeGraphs` keeps one set of device buffers for the step's integers
(:class:`~dsv4rs.runtime.planner.StepInputs`, sized for the largest bucket, page tables at their
widest), captures the whole step for a bucket on first use (the metadata derivation, every layer,
the LM head) into one memory pool shared by all buckets, and replays it: the host copies the
step's integers into the buffers (pinned memory, asynchronous), padding the batch up to the
bucket with rows that read and write nothing live (state slot ``-1``, rows ``-1``, no window),
and launches one graph. A bucket is captured on padding rows alone, so capturing writes nothing
live either; pinned host blocks come from torch's caching host allocator, which reuses a block
only once its copy has run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields

import torch

from dsv4rs.runtime.planner import StepInputs

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""Default batch-size buckets of the captured decode step."""


def _padding(bucket: int) -> dict[str, torch.Tensor]:
    """The integers of ``bucket`` padding rows: one token each at position 0, no window (origin
    past the token), no state, nothing written."""
    rows = torch.arange(bucket, dtype=torch.int64)
    none = torch.full((bucket,), -1, dtype=torch.int64)
    zero = torch.zeros(bucket, dtype=torch.int64)
    return {"ids": zero, "positions": zero, "token_seq": rows, "starts": zero, "origins": zero + 1,
            "state_slots": none, "cu_tokens": torch.arange(bucket + 1, dtype=torch.int64), "window_slots": none,
            "csa_slots": none, "hca_slots": none}


class _Layout:
    """Where a bucket's integers sit in one byte buffer: each :class:`StepInputs` field at an
    8-byte aligned offset, int64 ``[bucket]`` (``cu_tokens``: ``[bucket + 1]``) or an int32 page
    table ``[bucket, width]``."""

    def __init__(self, bucket: int, widths: Mapping[str, int]) -> None:
        self.parts: list[tuple[str, int, torch.dtype, tuple[int, ...]]] = []
        at = 0
        for f in fields(StepInputs):
            if f.name.endswith("_table"):
                dtype, shape = torch.int32, (bucket, widths[f.name[: -len("_table")]])
            else:
                dtype, shape = torch.int64, (bucket + 1,) if f.name == "cu_tokens" else (bucket,)
            self.parts.append((f.name, at, dtype, shape))
            at += -(-math.prod(shape) * dtype.itemsize // 8) * 8
        self.nbytes = at

    def views(self, buf: torch.Tensor) -> StepInputs:
        """The fields as views of ``buf`` (uint8, :attr:`nbytes` long)."""
        return StepInputs(**{name: buf[at : at + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
                             for name, at, dtype, shape in self.parts})


def fill(view: StepInputs, inputs: StepInputs | None, bucket: int) -> None:
    """Writes ``inputs`` (one-token sequences; ``None``: none) into ``view`` (a bucket's fields),
    padded to ``bucket`` rows with :func:`_padding`'s rows and page tables with the null page."""
    pad = _padding(bucket)
    n = 0 if inputs is None else inputs.starts.shape[0]
    for f in fields(StepInputs):
        name, dst = f.name, getattr(view, f.name)
        if name.endswith("_table"):
            dst.zero_()
            if n:
                src = getattr(inputs, name)
                dst[:n, : src.shape[1]] = src
        elif name in ("cu_tokens", "token_seq") or not n:
            dst.copy_(pad[name])
        else:
            dst[:n] = getattr(inputs, name)
            dst[n:] = pad[name][n:]


class DecodeGraphs:
    """Captured decode steps of one engine.

    Args:
        step: ``step(inputs) -> (logits, streams, metadata)``, the decode step on device
            :class:`StepInputs` (every chunk one token); it is what gets captured.
        buckets: batch sizes to capture (a batch runs in the smallest bucket that holds it).
        table_widths: page-table widths per family (the most pages a sequence can hold).
        device: the CUDA device.
        before_capture: called with a bucket before it is captured (a parallel engine's ranks
            check there that they all capture the same one).
    """

    def __init__(self, step: Callable[[StepInputs], tuple[torch.Tensor, torch.Tensor, object]],
                 buckets: Sequence[int], table_widths: Mapping[str, int], device: torch.device,
                 before_capture: Callable[[int], None] | None = None) -> None:
        if not buckets or any(b < 1 for b in buckets):
            raise ValueError(f"buckets: expected batch sizes >= 1, got {list(buckets)}")
        self.step, self.buckets, self.device = step, sorted(set(buckets)), device
        self.before_capture = before_capture
        self.widths = {f: max(w, 1) for f, w in table_widths.items()}
        self.layouts = {b: _Layout(b, self.widths) for b in self.buckets}
        self.buffers = {b: torch.zeros(lay.nbytes, dtype=torch.uint8, device=device) for b, lay in self.layouts.items()}
        self.views = {b: lay.views(self.buffers[b]) for b, lay in self.layouts.items()}
        self.pool = torch.cuda.graph_pool_handle() if self.device.type == "cuda" else None
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor, object]]] = {}

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def bucket(self, batch: int) -> int:
        return next(b for b in self.buckets if b >= batch)

    def run(self, inputs: StepInputs | None, ids: torch.Tensor | None = None,
            bucket: int | None = None) -> tuple[torch.Tensor, torch.Tensor, object]:
        """Replays the step for host ``inputs`` of at most :attr:`max_batch` sequences (``None``:
        none, padding rows only); returns the bucket's logits, streams and metadata (rows past the
        batch are padding). ``ids``: the batch's token ids on the device, in place of
        ``inputs.ids`` (copied after the load, in stream order, so nothing waits for them).
        ``bucket``: the bucket to replay (one of :attr:`buckets` that holds the batch; default the
        smallest)."""
        n = 0 if inputs is None else inputs.starts.shape[0]
        if bucket is None:
            bucket = self.bucket(n)
        elif bucket not in self.layouts or bucket < n:
            raise ValueError(f"bucket: {bucket} is not a captured batch size holding {n} sequences "
                             f"(buckets {self.buckets})")
        self._ensure(bucket)
        self._load(inputs, bucket)
        if ids is not None:
            self.views[bucket].ids[:n].copy_(ids)
        graph, out = self.graphs[bucket]
        graph.replay()
        return out

    def capture_all(self) -> None:
        """Captures every bucket now (largest first, so smaller graphs reuse its pool memory)."""
        for bucket in reversed(self.buckets):
            self._ensure(bucket)

    def _ensure(self, bucket: int) -> None:
        if bucket not in self.graphs:
            if self.before_capture is not None:
                self.before_capture(bucket)
            self._load(None, bucket)  # padding rows only: the capture's warm-up writes nothing live
            self.graphs[bucket] = self._capture(self.views[bucket])

    def _load(self, inputs: StepInputs | None, bucket: int) -> None:
        """Copies ``inputs`` (host, one-token sequences; ``None``: none) into the bucket's device
        buffer, padded to ``bucket`` rows: one pinned host buffer, one asynchronous copy."""
        lay = self.layouts[bucket]
        host = torch.empty(lay.nbytes, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        fill(lay.views(host), inputs, bucket)
        self.buffers[bucket].copy_(host, non_blocking=True)

    def _capture(self, view: StepInputs) -> tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor, object]]:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self.step(view)  # warm-up: lazy initializations stay out of the graph
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=side):
            out = self.step(view)
        torch.cuda.current_stream(self.device).wait_stream(side)
        return graph, out
