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


def _tensors(m: nn.Module) -> tuple[torch.Tensor, ...]:
    return (m.weight, m.scale) if isinstance(m, QuantLinear) else (m.weight,)


def _packable(mods: Sequence[nn.Module]) -> bool:
    """Whether one linear computes the group: plain bias-free ``nn.Linear``s of one dtype, or FP8
    :class:`QuantLinear`s of one activation rounding, layout and dtype (every part but the last
    a multiple of 128 rows); one input width, one device."""
    if len(mods) < 2:
        return False
    first = mods[0]
    if all(type(m) is nn.Linear for m in mods):
        same = all(m.bias is None and m.weight.dtype == first.weight.dtype for m in mods)
    elif all(isinstance(m, QuantLinear) for m in mods):
        same = all(m.fmt == "fp8" and m.groups == 1 and (m.act, m.layout, m.dtype) == (first.act, first.layout, first.dtype)
                   for m in mods) and all(m.out_features % _SCALE_ROWS == 0 for m in mods[:-1])
    else:
        return False
    return same and all(m.weight.shape[1] == first.weight.shape[1] and m.weight.device == first.weight.device
                        for m in mods)


def _span(parts: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The ``[sum rows, ...]`` view of ``parts`` when they lie back to back in one storage, in
    order, each contiguous; else ``None``."""
    first = parts[0]
    storage, offset, rows = first.untyped_storage().data_ptr(), first.storage_offset(), 0
    for p in parts:
        if (not p.is_contiguous() or p.dtype != first.dtype or p.shape[1:] != first.shape[1:]
                or p.untyped_storage().data_ptr() != storage or p.storage_offset() != offset):
            return None
        offset += p.numel()
        rows += p.shape[0]
    return first.as_strided((rows, *first.shape[1:]), first.stride())


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
    return _spans(mods)


def _spans(mods: Sequence[nn.Module]) -> tuple[torch.Tensor, ...] | None:
    if not _packable(mods):
        return None
    spans = []
    for parts in zip(*(_tensors(m) for m in mods)):
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
    if not _packable(mods):
        return False
    if _spans(mods) is not None:
        return True
    with torch.no_grad():
        for parts in zip(*(_tensors(m) for m in mods)):
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
