"""The engine plugin (integrations/dsv4rs_plugin) against minimal stand-ins of vLLM's and SGLang's
published hook points, on the CPU: the entry points it declares, what ``register`` replaces and
registers, the routing policy (``DSV4RS_PLUGIN``), the keywords the engines' wrappers add, and the
clear, harmless failure without an engine.

The stand-ins hold only what the plugin touches, as those modules spell it (read from the
engines' sources):

- vLLM: ``vllm.v1.attention.ops.flashmla`` (``_is_flashmla_available``,
  ``is_flashmla_sparse_supported``, ``FlashMLASchedMeta``, ``get_mla_metadata``,
  ``flash_mla_with_kvcache``, ``flash_mla_sparse_fwd``, stubs that raise where vLLM was built
  without FlashMLA) and ``vllm.utils.deep_gemm`` (``get_paged_mqa_logits_metadata(context_lens,
  block_size, num_sms, indices=None)``, ``fp8_fp4_paged_mqa_logits(q=(values, scales), kv_cache,
  weights, context_lens, block_tables, schedule_metadata, max_model_len, clean_logits, ...)``);
- SGLang: ``sglang.srt.layers.attention.attention_registry`` (``ATTENTION_BACKENDS``,
  ``register_attention_backend``) and ``sglang.srt.server_args.ATTENTION_BACKEND_CHOICES``.

(The SGLang plugin was also run once against SGLang 0.5.23's own modules, outside this suite:
see integrations/dsv4rs_plugin/README.md.)
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import sys
import types
from pathlib import Path

import pytest
import torch

from dsv4rs import ops
from dsv4rs.compat import deep_gemm, flash_mla

PLUGIN_DIR = Path(__file__).resolve().parents[1] / "integrations" / "dsv4rs_plugin"


@pytest.fixture
def plugin(monkeypatch: pytest.MonkeyPatch):
    """The plugin package: the installed one, else the repository's copy; routing state reset."""
    try:
        importlib.import_module("dsv4rs_plugin")
    except ImportError:
        monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    route = importlib.import_module("dsv4rs_plugin._route")
    monkeypatch.setattr(route, "_forced", False)
    monkeypatch.delenv(route.ENV, raising=False)
    return types.SimpleNamespace(route=route, vllm=importlib.import_module("dsv4rs_plugin.vllm"),
                                 sglang=importlib.import_module("dsv4rs_plugin.sglang"))


def add_module(monkeypatch: pytest.MonkeyPatch, name: str, **attrs) -> types.ModuleType:
    """A stand-in module in sys.modules (and its parents), removed after the test."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        parent = ".".join(parts[:i])
        if parent not in sys.modules:
            monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))
    mod = types.ModuleType(name)
    for k, v in attrs.items():
        setattr(mod, k, v)
    monkeypatch.setitem(sys.modules, name, mod)
    return mod


def decode_case(heads: int = 16, topk: int = 100):
    gen = torch.Generator().manual_seed(heads * 1000 + topk)
    cache = ops.quantize_entries(torch.randn(256, 512, generator=gen)).view(4, 64, 1, 584)
    q = torch.randn(2, 1, heads, 512, generator=gen).bfloat16()
    idx = torch.randint(-1, 256, (2, 1, topk), generator=gen, dtype=torch.int32)
    return q, cache, idx


def logits_case():
    gen = torch.Generator().manual_seed(7)
    cache = ops.quantize_index_keys(torch.randn(256, 128, generator=gen), "fp8").view(4, 64, 1, 132)
    q = torch.randn(2, 1, 8, 128, generator=gen).to(torch.float8_e4m3fn)
    w = torch.rand(2, 8, generator=gen)
    ctx = torch.tensor([[100], [256]], dtype=torch.int32)
    table = torch.tensor([[0, 1, -1, -1], [3, 2, 1, 0]], dtype=torch.int32)
    return q, cache, w, ctx, table


def test_plugin_declares_the_engines_entry_points(plugin) -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((PLUGIN_DIR / "pyproject.toml").read_text())
    eps = project["project"]["entry-points"]
    assert eps["vllm.general_plugins"] == {"dsv4rs": "dsv4rs_plugin.vllm:register"}
    assert eps["sglang.srt.plugins"] == {"dsv4rs": "dsv4rs_plugin.sglang:register"}
    for value in (*eps["vllm.general_plugins"].values(), *eps["sglang.srt.plugins"].values()):
        module, attr = value.split(":")
        assert callable(getattr(importlib.import_module(module), attr))
    try:
        importlib.metadata.distribution("dsv4rs-plugin")
    except importlib.metadata.PackageNotFoundError:
        return  # not installed here: the pyproject above is what an install declares
    for group, value in (("vllm.general_plugins", "dsv4rs_plugin.vllm:register"),
                         ("sglang.srt.plugins", "dsv4rs_plugin.sglang:register")):
        found = {e.name: e for e in importlib.metadata.entry_points(group=group)}
        assert found["dsv4rs"].value == value and callable(found["dsv4rs"].load())


def test_plugin_without_engines_changes_nothing(plugin, monkeypatch, caplog) -> None:
    for name in ("vllm", "sglang"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    with caplog.at_level(logging.WARNING, logger="dsv4rs_plugin"):
        assert plugin.vllm.register() is False
        assert plugin.sglang.register() is False
    text = caplog.text
    assert "vllm.v1.attention.ops.flashmla cannot be imported" in text and "is vLLM installed?" in text
    assert "attention_registry cannot be imported" in text and "is SGLang installed?" in text
    monkeypatch.setenv(plugin.route.ENV, "off")
    assert plugin.vllm.register() is False and plugin.sglang.register() is False


def vllm_stand_in(monkeypatch, available: bool, calls: list[str]):
    def native(name):
        def fn(*args, **kwargs):
            calls.append(name)
            return ("native", name)
        return fn

    def missing(*args, **kwargs):
        raise RuntimeError("vllm._flashmla_C is not available")

    class FlashMLASchedMeta:  # vLLM's stub without FlashMLA; FlashMLA's class with it
        pass

    fns = {n: (native(n) if available else missing) for n in ("get_mla_metadata", "flash_mla_with_kvcache",
                                                              "flash_mla_sparse_fwd")}
    ops_mod = add_module(monkeypatch, "vllm.v1.attention.ops.flashmla",
                         _is_flashmla_available=lambda: (available, None if available else "not built"),
                         is_flashmla_sparse_supported=lambda: (False, "FlashMLA Sparse is only supported on Hopper"),
                         FlashMLASchedMeta=FlashMLASchedMeta, **fns)
    if available:
        ops_mod.get_mla_metadata = lambda *a, **k: (FlashMLASchedMeta(), None)
    dg_mod = add_module(monkeypatch, "vllm.utils.deep_gemm", get_paged_mqa_logits_metadata=missing,
                        fp8_fp4_paged_mqa_logits=missing)
    # A vLLM module that imported the function by name before the plugin ran.
    user = add_module(monkeypatch, "vllm.model_executor.layers.v4_attention_stand_in",
                      flash_mla_with_kvcache=ops_mod.flash_mla_with_kvcache)
    monkeypatch.setitem(sys.modules, "deep_gemm", None)
    return ops_mod, dg_mod, user


def test_vllm_plugin_routes_to_dsv4rs_without_flashmla(plugin, monkeypatch) -> None:
    ops_mod, dg_mod, user = vllm_stand_in(monkeypatch, available=False, calls=[])
    assert plugin.vllm.register() is True
    assert plugin.vllm.register() is True  # idempotent
    assert user.flash_mla_with_kvcache is ops_mod.flash_mla_with_kvcache  # rebound where imported by name
    assert ops_mod.FlashMLASchedMeta is flash_mla.FlashMLASchedMeta

    # FlashMLA's sparse decode, 16 heads and top-k 100 (which FlashMLA refuses), as vLLM calls it.
    q, cache, idx = decode_case()
    meta, _ = ops_mod.get_mla_metadata()
    out = torch.empty(2, 1, 16, 512, dtype=torch.bfloat16)
    got, lse = user.flash_mla_with_kvcache(q=q, k_cache=cache, block_table=None, cache_seqlens=None, head_dim_v=512,
                                           tile_scheduler_metadata=meta, is_fp8_kvcache=True, indices=idx, out=out)
    want = flash_mla.flash_mla_with_kvcache(q, cache, None, None, 512, flash_mla.get_mla_metadata()[0],
                                            is_fp8_kvcache=True, indices=idx)
    assert got is out and torch.equal(out, want[0]) and torch.equal(lse, want[1])
    kv = torch.randn(64, 1, 512).bfloat16()
    pre = ops_mod.flash_mla_sparse_fwd(q[0], kv, idx[0][:, None].clamp(max=63), 0.1)
    for a, b in zip(pre, flash_mla.flash_mla_sparse_fwd(q[0], kv, idx[0][:, None].clamp(max=63), 0.1)):
        assert torch.equal(a, b)

    # The indexer logits through vLLM's wrapper names (block_size, block_tables, ..., q as a tuple).
    kq, kcache, kw, ctx, table = logits_case()
    sched = dg_mod.get_paged_mqa_logits_metadata(ctx, block_size=64, num_sms=132)
    logits = dg_mod.fp8_fp4_paged_mqa_logits((kq, None), kcache, kw, ctx, block_tables=table,
                                             schedule_metadata=sched, max_model_len=256, clean_logits=False)
    assert torch.equal(logits, deep_gemm.fp8_paged_mqa_logits(kq, kcache, kw, ctx, table, sched, 256))
    with pytest.raises(ValueError, match="FP8 queries only"):
        dg_mod.fp8_fp4_paged_mqa_logits((kq, torch.ones(1)), kcache, kw, ctx, table, sched, 256, False)

    # FlashMLA's support check: True where dsv4rs runs (an sm_80+ GPU), vLLM's answer elsewhere.
    assert ops_mod.is_flashmla_sparse_supported() == (False, "FlashMLA Sparse is only supported on Hopper")
    monkeypatch.setattr(plugin.route, "dsv4rs_runs_here", lambda: True)
    assert ops_mod.is_flashmla_sparse_supported() == (True, None)


def test_vllm_plugin_auto_keeps_what_flashmla_takes(plugin, monkeypatch) -> None:
    calls: list[str] = []
    ops_mod, _, _ = vllm_stand_in(monkeypatch, available=True, calls=calls)
    assert plugin.vllm.register() is True
    monkeypatch.setattr(plugin.route, "_capability", lambda t: (9, 0))  # as if on an H200
    meta, _ = ops_mod.get_mla_metadata()
    assert not isinstance(meta, flash_mla.FlashMLASchedMeta)  # FlashMLA's own handle
    run = lambda q, idx, m: ops_mod.flash_mla_with_kvcache(  # noqa: E731
        q, cache, None, None, 512, m, is_fp8_kvcache=True, indices=idx)
    q64, cache, idx128 = decode_case(64, 128)
    assert run(q64, idx128, meta) == ("native", "flash_mla_with_kvcache")  # FlashMLA takes it
    q16, _, idx100 = decode_case(16, 100)
    out, lse = run(q16, idx100, meta)  # 16 heads, top-k 100: dsv4rs, beside FlashMLA's handle
    assert out.shape == (2, 1, 16, 512) and isinstance(meta._dsv4rs_meta, flash_mla.FlashMLASchedMeta)
    assert calls == ["flash_mla_with_kvcache"]
    monkeypatch.setenv(plugin.route.ENV, "always")
    out, _ = run(q64, idx128, flash_mla.get_mla_metadata()[0])
    assert out.shape == (2, 1, 64, 512) and calls == ["flash_mla_with_kvcache"]
    assert isinstance(ops_mod.get_mla_metadata()[0], flash_mla.FlashMLASchedMeta)


def test_sglang_plugin_registers_a_backend_and_flash_mla(plugin, monkeypatch) -> None:
    backends: dict = {}

    def register_attention_backend(name):
        def decorator(fn):
            backends[name] = fn
            return fn
        return decorator

    base_runners = []
    register_attention_backend("dsv4")(lambda runner: base_runners.append(runner) or "dsv4 backend")
    add_module(monkeypatch, "sglang.srt.layers.attention.attention_registry", ATTENTION_BACKENDS=backends,
               register_attention_backend=register_attention_backend)
    choices = ["flashinfer", "dsv4"]
    add_module(monkeypatch, "sglang.srt.server_args", ATTENTION_BACKEND_CHOICES=choices)
    for name in ("flash_mla", "flash_mla.flash_mla_interface", "deep_gemm"):
        monkeypatch.setitem(sys.modules, name, None)  # not installed
    assert plugin.sglang.register() is True
    assert "dsv4rs" in backends and choices.count("dsv4rs") == 1
    plugin.sglang.register()
    assert choices.count("dsv4rs") == 1

    # SGLang's V4 code imports flash_mla when it runs: it finds dsv4rs's module.
    fm = importlib.import_module("flash_mla")
    from flash_mla.flash_mla_interface import FlashMLASchedMeta  # noqa: PLC0415 - as SGLang imports it
    assert FlashMLASchedMeta is flash_mla.FlashMLASchedMeta
    q, cache, idx = decode_case()
    out, lse = fm.flash_mla_with_kvcache(q=q, k_cache=cache, block_table=None, cache_seqlens=None, head_dim_v=512,
                                         tile_scheduler_metadata=fm.get_mla_metadata()[0], is_fp8_kvcache=True,
                                         indices=idx, use_legacy=True)  # SGLang's wrapper adds use_legacy
    assert out.shape == (2, 1, 16, 512) and lse.shape == (2, 16, 1)
    kv = torch.randn(64, 1, 512).bfloat16()
    ids = idx[0][:, None].clamp(max=63)
    natural = flash_mla.flash_mla_sparse_fwd(q[0], kv, ids, 0.1)
    base2 = fm.flash_mla_sparse_fwd(q[0], kv, ids, 0.1, use_legacy=True, return_log2_lse=True)
    torch.testing.assert_close(base2[2], natural[2] / torch.log(torch.tensor(2.0)))
    with pytest.raises(NotImplementedError, match="fused_norm_rope_attn_rope_cast"):
        fm.fused_norm_rope_attn_rope_cast()

    # The dsv4rs backend is SGLang's dsv4 backend with every call routed to dsv4rs.
    assert backends["dsv4rs"]("runner") == "dsv4 backend" and base_runners == ["runner"]
    assert plugin.route.everything_to_dsv4rs()
