"""vLLM's general plugin (entry point group ``vllm.general_plugins``): routes DeepSeek-V4's sparse
attention (FlashMLA's entry points in ``vllm.v1.attention.ops.flashmla``) and the indexer's paged
logits (``vllm.utils.deep_gemm``) to dsv4rs where the native kernels cannot take the call (or
always, with ``DSV4RS_PLUGIN=always``), and reports FlashMLA's sparse path as supported on every
sm_80+ GPU. vLLM loads general plugins in each of its processes before building the model; the
plugin is idempotent and imports vLLM only when called.
"""

from __future__ import annotations

import importlib
from typing import Any

from dsv4rs_plugin import _route

FLASHMLA_MODULE = "vllm.v1.attention.ops.flashmla"
DEEP_GEMM_MODULE = "vllm.utils.deep_gemm"


def register() -> bool:
    """Installs the routing; returns whether anything was replaced. Without vLLM (or with
    ``DSV4RS_PLUGIN=off``) it logs why and changes nothing."""
    if _route.mode() == "off":
        _route.log.info("dsv4rs_plugin: %s=off, vLLM left unchanged", _route.ENV)
        return False
    try:
        ops = importlib.import_module(FLASHMLA_MODULE)
    except ImportError as e:
        _route.log.warning("dsv4rs_plugin: vLLM's FlashMLA ops module %s cannot be imported (%s); is vLLM "
                           "installed? Nothing was replaced.", FLASHMLA_MODULE, e)
        return False
    if getattr(ops, "__dsv4rs_plugin__", False):
        return True
    replaced = _route_flash_mla(ops)
    replaced += _route_deep_gemm()
    ops.__dsv4rs_plugin__ = True
    _route.log.info("dsv4rs_plugin: routing %s to dsv4rs (%s=%s)", ", ".join(replaced), _route.ENV, _route.mode())
    return True


def _route_flash_mla(ops: Any) -> list[str]:
    available_fn = getattr(ops, "_is_flashmla_available", None)
    available = bool(available_fn()[0]) if available_fn is not None else all(hasattr(ops, n) for n in _route.FLASH_MLA_NAMES)
    original = {n: getattr(ops, n) for n in _route.FLASH_MLA_NAMES} if available else None
    new = _route.flash_mla_entry_points(original)
    if not available:
        from dsv4rs.compat.flash_mla import FlashMLASchedMeta

        new["FlashMLASchedMeta"] = FlashMLASchedMeta  # the stub class vLLM defines without FlashMLA
    supported = getattr(ops, "is_flashmla_sparse_supported", None)
    if supported is not None:
        def is_flashmla_sparse_supported() -> tuple[bool, str | None]:
            ok, reason = supported()
            if ok or _route.mode() == "off":
                return ok, reason
            if _route.dsv4rs_runs_here():
                return True, None
            return ok, reason

        new["is_flashmla_sparse_supported"] = is_flashmla_sparse_supported
    return [f"{FLASHMLA_MODULE}.{n}" for n in _route.rebind(ops, new, "vllm.")]


def _route_deep_gemm() -> list[str]:
    try:
        dg = importlib.import_module(DEEP_GEMM_MODULE)
    except ImportError as e:
        _route.log.info("dsv4rs_plugin: %s not importable (%s); the indexer logits are left as they are",
                        DEEP_GEMM_MODULE, e)
        return []
    try:
        importlib.import_module("deep_gemm")
        native = True
    except ImportError:
        native = False
    original = {n: (getattr(dg, n) if native else None) for n in _route.DEEP_GEMM_NAMES if hasattr(dg, n)}
    new = _route.deep_gemm_entry_points(original)
    return [f"{DEEP_GEMM_MODULE}.{n}" for n in _route.rebind(dg, new, "vllm.")]
