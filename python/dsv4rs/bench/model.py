"""The model suite of ``dsv4rs bench`` (``--only model``): the whole decode step and prefill of
DeepSeek-V4 at the width of a preset, with ``--layers`` of its layers and random weights.

The model is built on the meta device and filled on the target device (bfloat16 matrices, the
float32 parameters kept float32, as ``load_checkpoint(dtype=torch.bfloat16, quantized=False)``
leaves them; with ``--weights shipped`` the FP8 linears and MXFP4 experts DeepSeek ships, as
``load_checkpoint`` keeps them by default), run by an :class:`~dsv4rs.runtime.Engine` with production storage (FP8 entries,
FP4 indexer keys). A decode case holds ``batch`` sequences of ``context`` tokens: their pages
come from the allocator and every cache row holds random valid entries (no prefill is run to get
there), then decode steps are timed: the GPU time of the replayed step (CUDA events around the
graph), beside the same step run eagerly (wall time, launches included). Per layer means the step
minus the LM head, over the layers.

The floor of a layer is the bytes a decode step must read, over the copy bandwidth measured in
the same run: the layer's weights, its routed experts only as far as the batch touches them
(``E (1 - (1 - k/E)^B)`` distinct experts of a uniform router), and per sequence its cache reads
(window rows, the CSA top-k rows and every visible indexer key, every visible HCA row). The
projection to the full model is the per-layer time times its layer count plus the LM head.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from dsv4rs import ops
from dsv4rs.bench.harness import Bench, Case, Row
from dsv4rs.cost import V4Model
from dsv4rs.model.config import CSA, HCA, V4Config, preset as _preset

PUBLISHED = (
    "published (V4-Flash, 4 H200): 1.72 ms per output token for one stream (SGLang, with DSpark speculation); "
    "266 tokens/s for one stream with EAGLE at TP4 (LMSYS); 4,872 tokens/s per GPU at concurrency 256 (SGLang)"
)


def _config(preset: str, layers: int) -> V4Config:
    """The first ``layers`` layers of a preset, without the MTP block."""
    full = _preset(preset)
    layers = min(layers, full.num_hidden_layers)
    return V4Config.from_dict({**full.to_hf_dict(), "num_hidden_layers": layers,
                               "layer_types": list(full.layer_types[:layers]),
                               "mlp_layer_types": list(full.mlp_layer_types[:layers]), "num_nextn_predict_layers": 0})


def _build(cfg: V4Config, device: str, seed: int = 0, experts: range | None = None, shipped: bool = False):
    """The model on ``device`` with random weights (bfloat16 matrices, float32 where the model
    keeps float32), initialized in place: no full-size copy anywhere else. ``experts``: a rank's
    routed experts only (:mod:`dsv4rs.parallel`). ``shipped``: the layers DeepSeek ships
    quantized hold random FP8 codes (scales 2^-14: weights up to 0.03) and MXFP4 experts (scales
    2^-9 .. 2^-6), as a DeepSeek checkpoint loads by default."""
    from dsv4rs.model.layers.moe import Experts
    from dsv4rs.model.layers.quant import QuantLinear
    from dsv4rs.model.model import empty_model, keeps_float32

    model = empty_model(cfg, device, torch.bfloat16, experts, shipped=shipped)
    g = torch.Generator(device=device).manual_seed(seed)

    def codes(t: torch.Tensor, high: int = 256, low: int = 0) -> None:
        t.copy_(torch.randint(low, high, t.shape, generator=g, device=device, dtype=torch.int32))

    with torch.no_grad():
        for name, p in model.named_parameters():
            if keeps_float32(name):
                p.normal_(1.0, 0.1, generator=g)
            else:
                p.normal_(0.0, 0.02, generator=g)
        for name, buf in model.named_buffers():
            if name.endswith("tid2eid"):
                buf.copy_(torch.randint(0, cfg.n_routed_experts, buf.shape, generator=g, device=device))
            elif name.endswith("e_score_correction_bias"):
                buf.zero_()
        for mod in model.modules():
            if isinstance(mod, QuantLinear):
                codes(mod.weight, 0x7F)  # e4m3 magnitudes below the NaN code 0x7F, then a random sign
                mod.weight.bitwise_or_(torch.randint(0, 2, mod.weight.shape, generator=g, device=device,
                                                     dtype=torch.int32).to(torch.uint8) << 7)
                mod.scale.fill_(2.0**-14)
            elif isinstance(mod, Experts) and mod.quantized:
                for data, scale in ((mod.gate_up, mod.gate_up_scale), (mod.down, mod.down_scale)):
                    codes(data)
                    codes(scale, 122, 118)
    return model


def prefill_tokens(contexts: list[int], gpu: bool) -> int:
    """Tokens of the timed prompt: the longest context, at most 4,096 (512 on the CPU)."""
    return min(max(contexts), 4096 if gpu else 512)


def time_prefill(engine, tokens: int, before=None) -> float:
    """Milliseconds to prefill one prompt of ``tokens`` random tokens, after a 64-token warm-up:
    the fastest of two runs on a GPU, one on the CPU, each sequence released after. ``before``
    runs ahead of each timed step, after the device is idle (a parallel engine's barrier)."""
    ids = torch.randint(0, engine.cfg.vocab_size, (tokens,)).tolist()
    gpu = engine.device.type == "cuda"
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    seq, _ = engine.add_sequence()
    engine.step([seq], [ids[:64]])  # warm-up
    engine.release(seq)
    times = []
    for _ in range(2 if gpu else 1):
        seq, _ = engine.add_sequence()
        sync()
        if before is not None:
            before()
        t0 = time.perf_counter()
        engine.step([seq], [ids])
        sync()
        times.append(1e3 * (time.perf_counter() - t0))
        engine.release(seq)
    return min(times)


def _fill_cache(engine, seed: int = 1) -> None:
    """Random valid content in every row of every cache tensor (FP8 entries and FP4 keys written
    through the ops, states random with finite scores)."""
    g = torch.Generator(device=engine.device).manual_seed(seed)
    c = engine.cache
    for tensor, keys in ((c.window, False), (c.csa, False), (c.csa_keys, True), (c.hca, False)):
        for layer in tensor:
            rows = layer.shape[0] * ops.PAGE_ROWS
            for start in range(0, rows, 1 << 20):
                n = min(1 << 20, rows - start)
                x = torch.randn(n, 128 if keys else 512, generator=g, device=engine.device)
                slots = torch.arange(start, start + n, device=engine.device)
                (ops.index_key_write(layer, slots, x, engine.index_format) if keys else ops.kv_write(layer, slots, x))
    for state in (c.csa_state, c.index_state, c.hca_state):
        state.copy_(torch.randn(state.shape, generator=g, device=engine.device))


def _layer_bytes(model, cfg: V4Config, batch: int, context: int) -> float:
    """Bytes one decode step must read per layer (averaged over the layers): weights, touched
    experts, cache rows."""
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    touched = e * (1 - (1 - k / e) ** batch) / e
    total = 0.0
    for layer in model.model.layers:
        for name, p in layer.state_dict(keep_vars=True).items():  # weights as held (quantized ones too)
            if name.endswith("tid2eid"):
                continue  # a hash table: the step reads its tokens' rows only
            nbytes = p.numel() * p.element_size()
            total += nbytes * touched if ".experts." in f".{name}" else nbytes
        kind = layer.self_attn.layer_type
        rows = min(context, cfg.sliding_window)
        keys = 0
        if kind == CSA:
            keys = context // cfg.compress_rates[0]
            rows += min(cfg.index_topk, keys)
        elif kind == HCA:
            rows += context // cfg.compress_rates[1]
        total += batch * (rows * ops.MAIN_ENTRY_BYTES + keys * ops.INDEX_KEY_BYTES["fp4"])
    return total / cfg.num_hidden_layers


def model(b: Bench) -> Iterator[Case]:
    from dsv4rs.runtime import Engine

    o = b.options
    preset = o.get("preset") or ("v4-flash" if b.gpu else "demo")
    layers = o.get("layers") or 4
    batches = o.get("batch") or b.pick([1, 8, 32, 64, 128], [1, 32], [1, 2])
    contexts = o.get("context") or b.pick([4096, 131072], [4096], [1024])
    cfg = _config(preset, layers)
    shipped = o.get("weights", "bf16") == "shipped"
    tag = f"{preset} fp8/mxfp4" if shipped else preset  # the weights in the row names
    steps = 8 if b.gpu else 3
    made: dict[str, object] = {}

    def engine() -> Engine:
        if "engine" not in made:
            m = _build(cfg, b.device, shipped=shipped)
            made["model"] = m
            made["engine"] = Engine(m, max_sequences=max(batches), max_len=max(contexts) + 2 * steps + 4, quant=True,
                                    cuda_graphs=b.gpu)
            _fill_cache(made["engine"])
        return made["engine"]

    def head_ms(eng: Engine, batch: int) -> float:
        x = torch.randn(batch, cfg.hc_mult, cfg.hidden_size, device=b.device).to(torch.bfloat16)
        return b.median_ms(lambda i: eng.model.head(x), 1)

    def decode(batch: int, context: int) -> Row:
        eng = engine()
        seqs = [eng.add_sequence()[0] for _ in range(batch)]
        eng.manager.append(seqs, [[0] * context for _ in seqs])
        # Distinct random tokens: the hash-routed layers pick experts by token id.
        tokens = [[t] for t in torch.randint(0, cfg.vocab_size, (batch,)).tolist()]
        sync = torch.cuda.synchronize if b.gpu else (lambda: None)
        eng.step(seqs, tokens)  # captures this bucket's graph (GPU)
        gpu_ms = None
        if eng.graphs is not None:
            graph = eng.graphs.graphs[eng.graphs.bucket(batch)][0]
            gpu_ms = b.median_ms(lambda i: graph.replay(), 1, graph=False)  # writes the same rows again
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            eng.step(seqs, tokens)
        sync()
        step_ms = 1e3 * (time.perf_counter() - t0) / steps
        graphs, eng.graphs = eng.graphs, None
        t0 = time.perf_counter()
        for _ in range(steps):
            eng.step(seqs, tokens)
        sync()
        eager_ms = 1e3 * (time.perf_counter() - t0) / steps
        eng.graphs = graphs
        for s in seqs:
            eng.release(s)
        head = head_ms(eng, batch)
        gpu = gpu_ms if gpu_ms is not None else step_ms
        per_layer = (gpu - head) / cfg.num_hidden_layers
        nbytes = _layer_bytes(made["model"], cfg, batch, context)
        full = _preset(preset).num_hidden_layers
        per_token_full = per_layer * full + head
        name = f"decode {tag} b={batch} ctx={context // 1024}K per layer"
        where = "on the GPU (graph replay)" if gpu_ms is not None else "(wall)"
        note = (f"{name}: step {gpu:.3f} ms {where}, {step_ms:.3f} ms with the host, eager {eager_ms:.3f} ms; "
                f"head {head:.3f} ms; {batch / step_ms * 1e3:,.0f} tokens/s ({layers} layers); "
                f"full model ({full} layers) projected {per_token_full:.2f} ms per step, "
                f"{batch / per_token_full * 1e3:,.0f} tokens/s")
        return Row(name, per_layer, nbytes, 0.0, (eager_ms - head) / cfg.num_hidden_layers, note)

    def prefill(tokens: int) -> Row:
        ms = time_prefill(engine(), tokens)
        cost = V4Model("bench", cfg)
        flops = tokens * sum(v for k, v in cost.flops(tokens // 2).items() if k != "lm_head") / cfg.num_hidden_layers
        note = f"prefill {tag} T={tokens}: {tokens / ms * 1e3:,.0f} tokens/s ({layers} layers)\n{PUBLISHED}"
        return Row(f"prefill {tag} T={tokens} per layer", ms / cfg.num_hidden_layers, 0.0, flops, None, note)

    for context in contexts:
        for batch in batches:
            yield Case("model", f"decode b={batch} ctx={context}", lambda batch=batch, context=context: decode(batch, context))
    yield Case("model", "prefill", lambda: prefill(prefill_tokens(contexts, b.gpu)))
