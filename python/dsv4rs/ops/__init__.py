"""dsv4rs ops on torch tensors, CPU or CUDA (docs/model.md sections 2-6).

Every op checks dtype, shape, device and index ranges (errors name the argument), dispatches to
the Rust CPU kernel or the CUDA kernel on the tensors' device and the current stream, and is
registered as a ``torch.library`` op (namespace ``dsv4rs``) with a fake implementation, so that
``torch.compile`` and CUDA graphs see one node. GPU ops never synchronize and allocate only
their outputs (and workspace).

- :mod:`.formats`: the cache formats and their rows: ``kv_write``/``kv_read``,
  ``index_key_write``/``index_key_read``, ``index_key_round_trip``, ``copy_rows``,
  ``hadamard128``, new caches.
- :mod:`.rope`: ``rope``, ``ROPE_TABLES`` (how every op that rotates computes its angles),
  ``rms_norm_rope`` (a norm then RoPE, one kernel).
  :mod:`.norm`: ``rms_norm`` (the casts around it included). :mod:`.mhc`: ``mhc_weights``,
  ``mhc_collapse``, ``mhc_combine``, ``mhc_mix``, ``mhc_pre``. :mod:`.sample`: ``sample_gumbel`` (one token per row).
- :mod:`.compress`: ``compress``, ``compress_batch``, ``compressor_state``.
- :mod:`.indexer`: ``indexer_topk``, ``indexer_scores``.
- :mod:`.attention`: ``sparse_attention``, ``attention_kernel``.
- :mod:`.quant`: weights as DeepSeek ships them: ``quant_linear`` (block-scaled FP8 or MXFP4
  weights, FP8 or bf16 activations) and ``moe_experts`` (the fused MoE over MXFP4 experts, in
  DeepSeek's rows or in ``weight_tiles``'s 64-row tiles, which the GPU reads faster).
- :mod:`.route`: ``moe_route`` (the experts and weights of each token from the router's logits).
  :mod:`.swiglu`: ``swiglu`` (the shared expert's clamped SwiGLU).
- :mod:`.step_rows`: ``step_rows`` (a decode step's window and HCA candidate rows).
- :mod:`.linear`: ``linear_rows`` (``x W^T`` for a decode step's few rows: the router's logits).
"""

from __future__ import annotations

import torch

from dsv4rs import _core
from dsv4rs.ops._checks import cuda_index
from dsv4rs.ops.attention import ENTRY_SCALE, attention_kernel, sparse_attention
from dsv4rs.ops.compress import Quant, compress, compress_batch, compressor_state
from dsv4rs.ops.formats import (
    ENTRY_DIM,
    FP4_BLOCK,
    FP8_BLOCK,
    INDEX_DIM,
    INDEX_KEY_BYTES,
    MAIN_DATA_BYTES,
    MAIN_ENTRY_BYTES,
    NOPE_DIM,
    PAGE_ROWS,
    ROPE_DIM,
    IndexKeyFormat,
    copy_rows,
    hadamard128,
    index_key_read,
    index_key_round_trip,
    index_key_write,
    kv_read,
    kv_write,
    new_index_key_cache,
    new_kv_cache,
    quantize_entries,
    quantize_index_keys,
)
from dsv4rs.ops.indexer import TIE_BREAKS, indexer_scores, indexer_topk
from dsv4rs.ops.linear import MAX_LINEAR_ROWS, linear_rows
from dsv4rs.ops.mhc import mhc_collapse, mhc_combine, mhc_mix, mhc_pre, mhc_weights
from dsv4rs.ops.norm import rms_norm
from dsv4rs.ops.quant import moe_experts, quant_linear, weight_rows, weight_tiles
from dsv4rs.ops.rope import NORM_ROPE_ROW_MAX, ROPE_TABLES, RopeTable, rms_norm_rope, rope
from dsv4rs.ops.route import moe_route
from dsv4rs.ops.sample import sample_gumbel
from dsv4rs.ops.step_rows import step_rows
from dsv4rs.ops.swiglu import swiglu

__all__ = [
    "ENTRY_DIM", "ENTRY_SCALE", "FP4_BLOCK", "FP8_BLOCK", "INDEX_DIM", "INDEX_KEY_BYTES", "MAIN_DATA_BYTES",
    "MAIN_ENTRY_BYTES", "MAX_LINEAR_ROWS", "NORM_ROPE_ROW_MAX", "NOPE_DIM", "PAGE_ROWS", "ROPE_DIM", "ROPE_TABLES", "TIE_BREAKS", "IndexKeyFormat", "Quant",
    "RopeTable",
    "attention_kernel", "compress", "compress_batch", "compressor_state", "copy_rows", "hadamard128",
    "index_key_read", "index_key_round_trip", "index_key_write", "indexer_scores", "indexer_topk", "kv_read",
    "kv_write", "linear_rows", "mhc_collapse", "mhc_combine", "mhc_mix", "mhc_pre", "mhc_weights", "moe_experts", "moe_route", "new_index_key_cache",
    "new_kv_cache", "quant_linear", "quantize_entries", "quantize_index_keys", "rms_norm", "rms_norm_rope", "rope", "sample_gumbel", "sparse_attention", "step_rows", "swiglu",
    "weight_rows", "weight_tiles",
    "warm_up",
]


def warm_up(device: torch.device | str | int = "cuda") -> None:
    """Loads the CUDA kernels on ``device`` now; call before capturing a CUDA graph."""
    _core.warm_up(cuda_index(device))
