"""Linear layers over one input, run as one GEMM.

An attention layer projects its input ``x`` through several linears: ``W_qa`` and ``W_kv`` (FP8 as
DeepSeek ships them), and in a compressed layer the compressor's ``W_kv`` and ``W_gate``, plus the
indexer's compressor and head weights in a CSA layer (bfloat16); the shared expert's ``W_gate``
and ``W_up`` take one input too. At decode each is a GEMV of a few megabytes whose launch costs
more than its bytes. A module names its groups in ``input_groups()``. :func:`pack_` moves a
group's weights into one storage, rows one after the other; each module keeps its own parameter
(now a view of that storage), so names, state dicts, loading and every other use stay as they
were. :func:`project` then runs the group as one linear and splits its output by columns. A group whose weights do not
lie back to back (never packed, or a parameter replaced since), or with a module that has forward
hooks or a forward of its own (so that they see their calls), runs one module each: the same
values up to the order of the sums, one launch each.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module

from dsv4rs import ops
from dsv4rs.model.layers.quant import QuantLinear

__all__ = ["pack_", "pack_projections_", "packed", "project"]

_SCALE_ROWS = 128
"""Rows of an FP8 weight's scale block: every part of a packed FP8 group but the last must be a
multiple, so that the scales stack as the rows do."""


def _slots(mods: Sequence[nn.Module]) -> list[list[torch.Tensor]] | None:
    """The group's tensors by slot (the weights; for FP8 the scales too) when one linear computes
    the group: plain bias-free ``nn.Linear``s of one dtype, or FP8 :class:`QuantLinear`s of one
    activation rounding, layout and dtype (every part but the last a multiple of 128 rows); one
    input width. Else ``None``. (One device: :func:`pack_` checks it; a packed group lies in one
    storage.)"""
    if len(mods) < 2:
        return None
    weights = [m.weight for m in mods]
    width = weights[0].shape[1]
    if any(w.shape[1] != width for w in weights):
        return None
    first = mods[0]
    if all(type(m) is nn.Linear for m in mods):
        dtype = weights[0].dtype
        return [weights] if all(m.bias is None and w.dtype == dtype for m, w in zip(mods, weights)) else None
    if all(isinstance(m, QuantLinear) for m in mods):
        kind = (first.act, first.layout, first.dtype)
        if all(m.fmt == "fp8" and m.groups == 1 and (m.act, m.layout, m.dtype) == kind for m in mods) and all(
                w.shape[0] % _SCALE_ROWS == 0 for w in weights[:-1]):
            return [weights, [m.scale for m in mods]]
    return None


def _span(parts: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The ``[sum rows, ...]`` view of ``parts`` when they lie back to back in the first one's
    storage, in order, each contiguous; else ``None``. Addresses suffice: each part starts where
    the one before it ends, and the first part's storage holds them all, so each part's memory is
    that storage's (live allocations never overlap)."""
    first = parts[0]
    start, size, tail = first.data_ptr(), first.element_size(), first.shape[1:]
    end = start
    for p in parts:
        if p.data_ptr() != end or p.dtype != first.dtype or p.shape[1:] != tail or not p.is_contiguous():
            return None
        end += p.numel() * size
    storage = first.untyped_storage()
    if storage.data_ptr() + storage.nbytes() < end:
        return None
    return first.as_strided((sum(p.shape[0] for p in parts), *tail), first.stride())


def _hooked(m: nn.Module) -> bool:
    """Whether calling ``m`` does more than its class's forward (hooks, or a forward set on it)."""
    return bool(m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__)


def _global_hooks() -> bool:
    """Whether forward hooks are registered for every module (``register_module_forward_hook``)."""
    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)


def packed(mods: Sequence[nn.Module]) -> tuple[torch.Tensor, ...] | None:
    """The group's weights (and FP8 scales) as one tensor each, views of their one storage, when
    :func:`pack_` left them so and they still are, and no module has forward hooks (its own or
    global ones) or a forward of its own; else ``None``."""
    if _global_hooks() or any(_hooked(m) for m in mods):
        return None
    slots = _slots(mods)
    return None if slots is None else _spans(slots)


def _spans(slots: list[list[torch.Tensor]]) -> tuple[torch.Tensor, ...] | None:
    """Each slot's :func:`_span`, or ``None`` if one is not back to back."""
    spans = []
    for parts in slots:
        span = _span(parts)
        if span is None:
            return None
        spans.append(span)
    return tuple(spans)


def pack_(mods: Sequence[nn.Module]) -> bool:
    """Moves the weights of ``mods`` (linears over the same input) into one storage, rows in the
    modules' order, each module's tensor becoming a view of it (the same values, the same
    tensor objects). Takes the group's bytes once more while it copies. Returns whether the
    group is packed (``False``: the modules are not of one kind, see :func:`project`)."""
    slots = _slots(mods)
    if slots is None or len({m.weight.device for m in mods}) != 1:
        return False
    if _spans(slots) is not None:
        return True
    with torch.no_grad():
        for parts in slots:
            whole = torch.cat([p.detach() for p in parts])
            start = 0
            for p in parts:
                p.data = whole[start : start + p.shape[0]]
                start += p.shape[0]
    return True


def project(x: torch.Tensor, mods: Sequence[nn.Module]) -> list[torch.Tensor]:
    """``[m(x) for m in mods]``: one linear over the packed weights split by columns (views of
    its output) where the group is packed, else each module in turn."""
    spans = packed(mods)
    if spans is None:
        return [m(x) for m in mods]
    first = mods[0]
    if isinstance(first, QuantLinear):
        y = ops.quant_linear(x, spans[0].view(torch.float8_e4m3fn), spans[1], 1, first.act, layout=first.layout)
    else:
        y = F.linear(x, spans[0])
    return list(y.split([m.weight.shape[0] for m in mods], dim=-1))


def pack_projections_(model: nn.Module) -> int:
    """Packs every group that a submodule of ``model`` names in its ``input_groups()`` (the
    attention layers and the shared experts); returns how many groups are packed."""
    return sum(pack_(g) for m in model.modules() if hasattr(m, "input_groups") for g in m.input_groups())
