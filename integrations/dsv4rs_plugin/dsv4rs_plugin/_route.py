"""The routing both engine plugins share: which FlashMLA / DeepGEMM calls stay with the engine's
own kernels and which go to dsv4rs (``dsv4rs.compat``).

``DSV4RS_PLUGIN`` picks the policy:

- ``auto`` (default): a call goes to dsv4rs when the native kernel cannot take it: the native
  library is missing, the GPU is not sm_90/sm_100 (FlashMLA, DeepGEMM) or the tensors are
  outside what the native kernel takes (FlashMLA: 64 or 128 heads, top-k multiples of 64;
  DeepGEMM: 32/64 heads and 64-key pages on sm_90, 8-64 heads and 32/64-key pages on sm_100);
- ``always``: every call goes to dsv4rs;
- ``off``: the plugin changes nothing.

Nothing here imports an engine; dsv4rs is imported on first use.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import sys
from collections.abc import Callable
from typing import Any

log = logging.getLogger("dsv4rs_plugin")

ENV = "DSV4RS_PLUGIN"
MODES = ("auto", "always", "off")
FLASH_MLA_NAMES = ("get_mla_metadata", "flash_mla_with_kvcache", "flash_mla_sparse_fwd")
DEEP_GEMM_NAMES = ("get_paged_mqa_logits_metadata", "fp8_paged_mqa_logits", "fp8_fp4_paged_mqa_logits")

_forced = False


def mode() -> str:
    """The policy from ``DSV4RS_PLUGIN`` (an unknown value counts as ``auto``, with a warning)."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        log.warning("dsv4rs_plugin: %s=%r is not one of %s; using auto", ENV, value, "/".join(MODES))
        return "auto"
    return value


def force() -> None:
    """Routes every later call of this process to dsv4rs (SGLang's ``dsv4rs`` backend does)."""
    global _forced
    _forced = True


def everything_to_dsv4rs() -> bool:
    return _forced or mode() == "always"


def _capability(t: Any) -> tuple[int, int] | None:
    import torch

    if not isinstance(t, torch.Tensor) or t.device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(t.device)


def dsv4rs_runs_here() -> bool:
    """Whether dsv4rs's GPU kernels run on this process's current GPU (sm_80 or later)."""
    import torch

    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def _flashmla_takes(q: Any, *widths: int | None) -> bool:
    """What FlashMLA's sparse kernels take: an sm_90/sm_100 GPU, 64 or 128 heads, top-k widths
    in blocks of 64."""
    cap = _capability(q)
    return (cap is not None and cap[0] in (9, 10) and q.shape[-2] in (64, 128)
            and all(w is None or w % 64 == 0 for w in widths))


def _deepgemm_takes(q: Any, kv_cache: Any) -> bool:
    cap = _capability(q)
    if cap is None or getattr(kv_cache, "dim", lambda: 0)() != 4:
        return False
    heads, block_kv = q.shape[2], kv_cache.shape[1]
    if cap[0] == 9:
        return heads in (32, 64) and block_kv == 64
    return cap[0] == 10 and heads in (8, 16, 32, 64) and block_kv in (32, 64)


# Keywords engine wrappers of FlashMLA add (vLLM's V4 layer passes ``out=``; SGLang's
# sglang.kernels.ops.attention.flash_mla_interface and its sgl-flash-mla wheel add the others).
_DECODE_EXTRAS = ("out", "use_legacy", "kv_format", "descale_q", "descale_k")
_PREFILL_EXTRAS = ("use_legacy", "return_log2_lse")


def flash_mla_entry_points(original: dict[str, Callable[..., Any]] | None) -> dict[str, Callable[..., Any]]:
    """Routing versions of FlashMLA's three sparse entry points. ``original``: the engine's own
    functions, or ``None`` where FlashMLA is missing. Besides FlashMLA's arguments they take the
    keywords engine wrappers add: ``out=`` (the result is copied into it), ``use_legacy``,
    ``kv_format`` (dsv4rs serves ``None``, V4's 584-byte rows), ``descale_q``/``descale_k``
    (dsv4rs serves ``None``) and ``return_log2_lse`` (the prefill statistics in base 2)."""
    from dsv4rs.compat import flash_mla as fm

    decode_sig = inspect.signature(fm.flash_mla_with_kvcache)
    prefill_sig = inspect.signature(fm.flash_mla_sparse_fwd)

    def native_or_refuse(name: str, why: str) -> Callable[..., Any]:
        if original is None:
            raise ValueError(f"{why}: dsv4rs does not serve this {name} call and FlashMLA is not installed")
        return original[name]

    def get_mla_metadata(*args: Any, **kwargs: Any) -> Any:
        legacy_schedule = bool(args) and args[0] is not None or kwargs.get("cache_seqlens") is not None
        if original is not None and (legacy_schedule or not everything_to_dsv4rs()):
            return original["get_mla_metadata"](*args, **kwargs)
        return fm.get_mla_metadata()

    def flash_mla_with_kvcache(*args: Any, **kwargs: Any) -> Any:
        extras = {k: kwargs.pop(k) for k in _DECODE_EXTRAS if k in kwargs}
        a = decode_sig.bind(*args, **kwargs).arguments
        native_ok = original is not None and _flashmla_takes(
            a["q"], *(None if a.get(k) is None else a[k].shape[-1] for k in ("indices", "extra_indices_in_kvcache")))
        foreign = [k for k in ("kv_format", "descale_q", "descale_k") if extras.get(k) is not None]
        if (native_ok and not everything_to_dsv4rs()) or foreign or a.get("indices") is None:
            fn = native_or_refuse("flash_mla_with_kvcache", ", ".join(foreign) or "indices=None")
            return fn(*args, **kwargs, **extras)
        meta = a["tile_scheduler_metadata"]
        if not isinstance(meta, fm.FlashMLASchedMeta):
            # The engine's own handle (or none): keep a dsv4rs handle beside it.
            shadow = getattr(meta, "_dsv4rs_meta", None) if meta is not None else None
            if shadow is None:
                shadow = fm.FlashMLASchedMeta()
                if meta is not None:
                    try:
                        meta._dsv4rs_meta = shadow
                    except AttributeError:
                        pass
            a["tile_scheduler_metadata"] = shadow
        result, lse = fm.flash_mla_with_kvcache(**a)
        out = extras.get("out")
        if out is not None:
            out.copy_(result.view(out.shape))
            result = out
        return result, lse

    def flash_mla_sparse_fwd(*args: Any, **kwargs: Any) -> Any:
        extras = {k: kwargs.pop(k) for k in _PREFILL_EXTRAS if k in kwargs}
        a = prefill_sig.bind(*args, **kwargs).arguments
        if original is not None and not everything_to_dsv4rs() and _flashmla_takes(a["q"], a["indices"].shape[-1]):
            return original["flash_mla_sparse_fwd"](*args, **kwargs, **extras)
        out, max_logits, lse = fm.flash_mla_sparse_fwd(**a)
        if extras.get("return_log2_lse"):
            log2e = 1.0 / math.log(2.0)
            max_logits, lse = max_logits * log2e, lse * log2e
        return out, max_logits, lse

    return {"get_mla_metadata": get_mla_metadata, "flash_mla_with_kvcache": flash_mla_with_kvcache,
            "flash_mla_sparse_fwd": flash_mla_sparse_fwd}


# Engine wrappers spell some of DeepGEMM's arguments differently (vLLM's vllm.utils.deep_gemm).
_ALIASES = {"block_size": "block_kv", "block_tables": "block_table", "schedule_metadata": "schedule_meta",
            "max_model_len": "max_context_len", "q_fp8": "q", "kv_cache_fp8": "kv_cache"}


def _deep_gemm_args(sig: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    return sig.bind(*args, **{_ALIASES.get(k, k): v for k, v in kwargs.items()}).arguments


def deep_gemm_entry_points(original: dict[str, Callable[..., Any]]) -> dict[str, Callable[..., Any]]:
    """Routing versions of the paged indexer-logits entry points present in ``original`` (the
    engine's functions; a ``None`` value where DeepGEMM is missing). ``fp8_fp4_paged_mqa_logits``
    (vLLM's wrapper, ``q = (values, scales or None)``) goes to dsv4rs for FP8 queries only."""
    from dsv4rs.compat import deep_gemm as dg

    meta_sig = inspect.signature(dg.get_paged_mqa_logits_metadata)
    logits_sig = inspect.signature(dg.fp8_paged_mqa_logits)
    routed: dict[str, Callable[..., Any]] = {}

    def native(name: str) -> Callable[..., Any] | None:
        return None if everything_to_dsv4rs() else original.get(name)

    def get_paged_mqa_logits_metadata(*args: Any, **kwargs: Any) -> Any:
        a = _deep_gemm_args(meta_sig, args, kwargs)
        fn = native("get_paged_mqa_logits_metadata")
        cap = _capability(a["context_lens"])
        if fn is not None and cap is not None and (cap[0] == 9 and a["block_kv"] == 64
                                                   or cap[0] == 10 and a["block_kv"] in (32, 64)):
            return fn(*args, **kwargs)
        return dg.get_paged_mqa_logits_metadata(**a)

    def fp8_paged_mqa_logits(*args: Any, **kwargs: Any) -> Any:
        a = _deep_gemm_args(logits_sig, args, kwargs)
        fn = native("fp8_paged_mqa_logits")
        if fn is not None and _deepgemm_takes(a["q"], a["kv_cache"]):
            return fn(*args, **kwargs)
        return dg.fp8_paged_mqa_logits(**a)

    def fp8_fp4_paged_mqa_logits(*args: Any, **kwargs: Any) -> Any:
        a = _deep_gemm_args(logits_sig, args, kwargs)
        values, scales = a["q"] if isinstance(a["q"], tuple) else (a["q"], None)
        fn = native("fp8_fp4_paged_mqa_logits")
        if fn is not None and (scales is not None or _deepgemm_takes(values, a["kv_cache"])):
            return fn(*args, **kwargs)
        if scales is not None:
            raise ValueError("q: dsv4rs_plugin routes FP8 queries only; FP4 queries with scales need DeepGEMM")
        a["q"] = values
        return dg.fp8_paged_mqa_logits(**a)

    for name, fn in (("get_paged_mqa_logits_metadata", get_paged_mqa_logits_metadata),
                     ("fp8_paged_mqa_logits", fp8_paged_mqa_logits),
                     ("fp8_fp4_paged_mqa_logits", fp8_fp4_paged_mqa_logits)):
        if name in original:
            routed[name] = fn
    return routed


def rebind(module: Any, new: dict[str, Callable[..., Any]], prefix: str) -> list[str]:
    """Sets ``module``'s attributes to ``new`` and rebinds the same old objects in every loaded
    module under ``prefix`` that imported them by name; returns the names replaced."""
    old = {name: getattr(module, name, None) for name in new}
    for name, fn in new.items():
        fn.__dsv4rs_routed__ = True
        setattr(module, name, fn)
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or mod is module or not mod_name.startswith(prefix):
            continue
        for name, fn in new.items():
            if old[name] is not None and getattr(mod, name, None) is old[name]:
                setattr(mod, name, fn)
    return sorted(new)
