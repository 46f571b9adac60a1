"""The memory planner: given the device memory and a model, how many sequences of which length
fit (weights, cache pools, workspace, CUDA-graph pool). :class:`dsv4rs.runtime.Engine` sizes its
pools with it when ``max_len`` or ``max_sequences`` is left out, and ``dsv4rs plan`` prints it.

Weights are counted from the model built on the meta device (every tensor a checkpoint holds):
``"bf16"`` stores the matrices in bfloat16 and keeps the float32 parameters (norms, mHC, sinks,
positional biases) in float32, as ``load_checkpoint(dtype=torch.bfloat16, quantized=False)`` does;
``"shipped"`` is DeepSeek's format as ``load_checkpoint(dtype=torch.bfloat16)`` keeps it in memory
(attention and shared-expert linears FP8 e4m3 with one scale per 128x128 block, held as a float32
multiplier where the file has a 1-byte UE8M0 code; routed experts MXFP4 with a UE8M0 byte per 32
values; the rest bfloat16 or float32). :func:`stored_bytes` counts a model's tensors as held.

The workspace is an estimate of the activations of one step of ``token_budget`` tokens (streams,
queries, attention and indexer outputs and workspaces, the MoE's intermediates, the last tokens'
logits), counted per token from the config, with the CUDA-graph pool taken as one decode step of
the largest bucket; it errs high by design (a factor 2).
"""

from __future__ import annotations

import dataclasses
import re

import torch

from dsv4rs import ops
from dsv4rs.cache import CacheConfig, KVCacheManager
from dsv4rs.model.config import CSA, HCA, V4Config

_FP8 = re.compile(r"self_attn\.(q_a_proj|q_b_proj|kv_proj|o_a_proj|o_b_proj)\.weight$|indexer\.q_b_proj\.weight$"
                  r"|shared_experts\.(gate_proj|up_proj|down_proj)\.weight$")
_MIB = 1 << 20


def weight_bytes(cfg: V4Config, weights: str = "bf16", expert_shards: int = 1) -> int:
    """Bytes of the model's weights in ``weights`` format (``"bf16"``, ``"float32"`` or
    ``"shipped"``, see the module docstring) that one device holds when the routed experts are
    split over ``expert_shards`` devices (expert parallelism; everything else is replicated)."""
    if expert_shards < 1:
        raise ValueError(f"expert_shards: must be >= 1, got {expert_shards}")
    from dsv4rs.model.model import DeepseekV4, keeps_float32

    if weights not in ("bf16", "float32", "shipped"):
        raise ValueError(f'weights: expected "bf16", "float32" or "shipped", got {weights!r}')
    with torch.device("meta"):
        tensors = DeepseekV4(cfg).checkpoint_tensors()
    total = 0
    for name, t in tensors.items():
        n = t.numel()
        if not t.is_floating_point():
            total += n * t.element_size()
        elif weights == "float32" or keeps_float32(name):
            total += 4 * n
        elif ".experts." in name:
            n = -(-t.shape[0] // expert_shards) * (n // t.shape[0])
            total += n // 2 + n // 32 if weights == "shipped" else n * (4 if weights == "float32" else 2)
        elif weights == "shipped" and _FP8.search(name):
            rows, cols = t.shape
            total += n + 4 * (-(-rows // 128) * -(-cols // 128))  # codes, float32 block scales
        else:
            total += 2 * n
    return total


def stored_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's weights as held: every parameter and persistent buffer once (a tied
    weight once), quantized ones as their codes and scales; not the tables computed from the
    config (RoPE frequencies)."""
    persistent = model.state_dict(keep_vars=True)
    seen: set[int] = set()
    total = 0
    for t in persistent.values():
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def activation_bytes_per_token(cfg: V4Config) -> int:
    """Device bytes one token of a step needs at its peak (see the module docstring)."""
    d, hc, h = cfg.hidden_size, cfg.hc_mult, cfg.num_attention_heads
    streams = 4 * hc * d * 4  # the streams in, out and two mixes, float32
    attention = 3 * h * cfg.head_dim * 4 + cfg.q_lora_rank * 4  # q, output, de-rotated copy; cQ
    indexer = 2 * cfg.index_n_heads * cfg.index_head_dim * 4 + cfg.index_topk * 8
    moe = cfg.num_experts_per_tok * (3 * cfg.moe_intermediate_size + 2 * d) * 4
    compressor = 2 * 2 * (cfg.head_dim + cfg.index_head_dim) * 4
    return 2 * (streams + attention + indexer + moe + compressor)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Where the device memory goes, and the pools it leaves room for.

    Attributes:
        device_bytes: the memory the plan divides (free memory times the fraction used).
        weight_bytes, workspace_bytes, graph_bytes: the model's weights, one step's
            activations, the CUDA-graph pool.
        max_sequences, max_len: what the cache pools hold.
        pages: pages per allocator family, the null page included.
        cache_bytes: the pools' bytes (``KVCacheManager.pool_footprint``).
    """

    device_bytes: int
    weight_bytes: int
    workspace_bytes: int
    graph_bytes: int
    max_sequences: int
    max_len: int
    pages: dict[str, int]
    cache_bytes: int

    def describe(self) -> str:
        """The plan as lines of text (``dsv4rs plan``)."""
        rows = [("device memory used", self.device_bytes), ("weights", self.weight_bytes),
                ("workspace (one step)", self.workspace_bytes), ("CUDA-graph pool", self.graph_bytes),
                ("KV-cache pools", self.cache_bytes)]
        lines = [f"{name:<22}{b / _MIB:>14,.1f} MiB" for name, b in rows]
        left = self.device_bytes - self.weight_bytes - self.workspace_bytes - self.graph_bytes - self.cache_bytes
        lines.append(f"{'left over':<22}{left / _MIB:>14,.1f} MiB")
        lines.append(f"sequences: {self.max_sequences} of up to {self.max_len:,} tokens; pages per family: "
                     + ", ".join(f"{f} {n:,}" for f, n in self.pages.items()))
        return "\n".join(lines)


def plan_memory(cfg: V4Config, memory: int, cache: CacheConfig, weights: int, *, max_len: int | None = None,
                max_sequences: int | None = None, token_budget: int = 2048, graph_batch: int = 0) -> MemoryPlan:
    """Divides ``memory`` bytes between the weights (``weights`` bytes), the workspace of a step of
    ``token_budget`` tokens, the graph pool (a decode step of ``graph_batch`` sequences; 0: no
    graphs) and the cache pools of ``cache``, sized for ``max_sequences`` sequences of
    ``max_len`` tokens. Leave one out and the plan makes it as large as the memory allows
    (``max_len`` defaults to the smaller of the model's ``max_position_embeddings`` and 131,072
    when both are left out). ValueError names what does not fit."""
    for name, v in (("memory", memory), ("token_budget", token_budget)):
        if v < 1:
            raise ValueError(f"{name}: must be >= 1, got {v}")
    per_token = activation_bytes_per_token(cfg)
    workspace = token_budget * per_token + max(token_budget, max_sequences or 1) * cfg.vocab_size * 4
    graph = graph_batch * (per_token + cfg.vocab_size * 4)
    budget = memory - weights - workspace - graph
    if budget <= 0:
        raise ValueError(f"memory: {memory / _MIB:,.0f} MiB do not hold the weights "
                         f"({weights / _MIB:,.0f} MiB) and the workspace ({(workspace + graph) / _MIB:,.0f} MiB)")
    if max_len is None and max_sequences is None:
        max_len = min(cfg.max_position_embeddings, 131072)
    if max_len is None:
        longest = cache.longest_context(budget // max_sequences)
        max_len = cfg.max_position_embeddings if longest is None else min(longest, cfg.max_position_embeddings)
        if max_len < 1:
            raise ValueError(f"max_sequences: {max_sequences} sequences do not fit in {budget / _MIB:,.0f} MiB of cache")
    fit = cache.sequences_that_fit(max_len, budget)
    if max_sequences is None:
        max_sequences = fit
    if max_sequences < 1 or fit < max_sequences:
        raise ValueError(f"max_len, max_sequences: {max_sequences} sequences of {max_len:,} tokens do not fit in "
                         f"{budget / _MIB:,.0f} MiB of cache ({fit} do)")
    pages = {f: 1 + max_sequences * n for f, n in pages_per_sequence(cfg, max_len).items()}
    cache_bytes = KVCacheManager(cache, pages).pool_footprint().total
    return MemoryPlan(memory, weights, workspace, graph, max_sequences, max_len, pages, cache_bytes)


def pages_per_sequence(cfg: V4Config, max_len: int) -> dict[str, int]:
    """Pages one sequence of up to ``max_len`` tokens holds per allocator family: its window
    ring, its CSA and HCA rows, one compressor-state slot."""
    rows = {"window": cfg.sliding_window,
            "csa": max_len // cfg.compress_rates[0] if CSA in cfg.layer_types else 0,
            "hca": max_len // cfg.compress_rates[1] if HCA in cfg.layer_types else 0}
    pages = {f: -(-n // ops.PAGE_ROWS) for f, n in rows.items()}
    pages["state"] = 1 if any(cfg.compress_ratios) else 0
    return pages
