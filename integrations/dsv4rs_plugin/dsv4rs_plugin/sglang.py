"""SGLang's general plugin (entry point group ``sglang.srt.plugins``).

SGLang's DeepSeek-V4 backend (``dsv4``) reaches FlashMLA through the ``flash_mla`` package
(directly in older releases; through ``sglang.kernels.ops.attention.flash_mla_interface``, which
calls ``flash_mla.<function>`` at call time, in 0.5.x) and DeepGEMM's paged indexer logits
through ``deep_gemm``. The plugin:

- routes those calls to dsv4rs where the native kernels cannot take them (``DSV4RS_PLUGIN=auto``)
  or always (``always``): an installed ``flash_mla`` / ``deep_gemm`` gets routing functions in
  place of its own; where ``flash_mla`` is not installed, a ``flash_mla`` module made of dsv4rs's
  functions is registered in ``sys.modules`` (its other kernels, e.g. MegaAttention, raise
  NotImplementedError); ``deep_gemm`` is never faked (it has many other users);
- registers an attention backend ``dsv4rs`` in SGLang's registry and its command-line choices:
  SGLang's own ``dsv4`` backend with every FlashMLA / DeepGEMM call of the process routed to
  dsv4rs. (Some SGLang checks name ``dsv4`` itself, e.g. context parallelism; there, keep
  ``--attention-backend dsv4`` and set ``DSV4RS_PLUGIN=always``.)

It imports SGLang only when called, and without SGLang logs why and changes nothing.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from dsv4rs_plugin import _route

REGISTRY_MODULE = "sglang.srt.layers.attention.attention_registry"
BACKEND = "dsv4rs"
BASE_BACKEND = "dsv4"


def register() -> bool:
    """Installs the routing and the ``dsv4rs`` backend; returns whether anything changed."""
    if _route.mode() == "off":
        _route.log.info("dsv4rs_plugin: %s=off, SGLang left unchanged", _route.ENV)
        return False
    try:
        registry = importlib.import_module(REGISTRY_MODULE)
    except ImportError as e:
        _route.log.warning("dsv4rs_plugin: SGLang's attention registry %s cannot be imported (%s); is SGLang "
                           "installed? Nothing was replaced.", REGISTRY_MODULE, e)
        return False
    done = _route_flash_mla() + _route_deep_gemm()
    _register_backend(registry)
    _route.log.info("dsv4rs_plugin: routing %s to dsv4rs (%s=%s); attention backend %r registered",
                    ", ".join(done), _route.ENV, _route.mode(), BACKEND)
    return True


def _route_flash_mla() -> list[str]:
    try:
        real = importlib.import_module("flash_mla")
    except ImportError:
        real = None
    if real is not None:
        if getattr(real, "__dsv4rs_plugin__", False):
            return ["flash_mla"]
        original = {n: getattr(real, n) for n in _route.FLASH_MLA_NAMES if hasattr(real, n)}
        if len(original) < len(_route.FLASH_MLA_NAMES):
            original = None
        new = _route.flash_mla_entry_points(original)
        names = _route.rebind(real, new, "sglang.")
        interface = sys.modules.get("flash_mla.flash_mla_interface")
        if interface is not None:
            _route.rebind(interface, new, "flash_mla.")
        real.__dsv4rs_plugin__ = True
        return [f"flash_mla.{n}" for n in names]
    from dsv4rs.compat import flash_mla as fm

    shim = types.ModuleType("flash_mla", "dsv4rs's FlashMLA entry points (installed by dsv4rs_plugin)")
    shim.__dsv4rs_plugin__ = True
    for name, fn in _route.flash_mla_entry_points(None).items():
        setattr(shim, name, fn)
    shim.FlashMLASchedMeta = fm.FlashMLASchedMeta
    for name in ("get_mla_decoding_metadata", "fused_norm_rope_attn_rope_cast"):
        setattr(shim, name, _not_provided(name))
    interface = types.ModuleType("flash_mla.flash_mla_interface")
    for name in (*_route.FLASH_MLA_NAMES, "FlashMLASchedMeta"):
        setattr(interface, name, getattr(shim, name))
    shim.flash_mla_interface = interface
    sys.modules["flash_mla"] = shim
    sys.modules["flash_mla.flash_mla_interface"] = interface
    return ["flash_mla (a dsv4rs module: FlashMLA is not installed)"]


def _not_provided(name: str) -> Any:
    def missing(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"flash_mla.{name}: FlashMLA is not installed, and dsv4rs_plugin's flash_mla module "
                                  "provides only get_mla_metadata, flash_mla_with_kvcache and flash_mla_sparse_fwd")

    missing.__name__ = name
    return missing


def _route_deep_gemm() -> list[str]:
    try:
        dg = importlib.import_module("deep_gemm")
    except ImportError:
        _route.log.info("dsv4rs_plugin: deep_gemm is not installed; SGLang's indexer logits are left as they are "
                        "(dsv4rs.compat.deep_gemm serves them where an engine calls it)")
        return []
    if getattr(dg, "__dsv4rs_plugin__", False):
        return ["deep_gemm"]
    original = {n: getattr(dg, n) for n in _route.DEEP_GEMM_NAMES if hasattr(dg, n)}
    names = _route.rebind(dg, _route.deep_gemm_entry_points(original), "sglang.")
    dg.__dsv4rs_plugin__ = True
    return [f"deep_gemm.{n}" for n in names]


def _register_backend(registry: Any) -> None:
    backends = getattr(registry, "ATTENTION_BACKENDS", None)
    if backends is None or BACKEND in backends:
        return

    def create_dsv4rs_backend(runner: Any) -> Any:
        base = backends.get(BASE_BACKEND)
        if base is None:
            raise ValueError(f"attention backend {BACKEND!r}: this SGLang has no {BASE_BACKEND!r} backend "
                             "(DeepSeek-V4) to run on dsv4rs")
        _route.force()
        return base(runner)

    register = getattr(registry, "register_attention_backend", None)
    if register is not None:
        register(BACKEND)(create_dsv4rs_backend)
    else:
        backends[BACKEND] = create_dsv4rs_backend
    try:
        server_args = importlib.import_module("sglang.srt.server_args")
    except Exception:  # noqa: BLE001 - the choices list is optional; any import failure leaves it
        return
    choices = getattr(server_args, "ATTENTION_BACKEND_CHOICES", None)
    if isinstance(choices, list) and BACKEND not in choices:
        choices.append(BACKEND)
