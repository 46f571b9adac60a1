"""Other engines' calling conventions on dsv4rs's ops, so that a stack built around DeepSeek's
kernels can call dsv4rs instead (docs/embedding.md).

- :mod:`dsv4rs.compat.flash_mla`: FlashMLA's ``get_mla_metadata``, ``flash_mla_with_kvcache``
  (sparse FP8 decode) and ``flash_mla_sparse_fwd`` (sparse prefill) for DeepSeek-V4, any head
  count, any top-k, any page size, sm_80+ GPUs and the CPU.
- :mod:`dsv4rs.compat.deep_gemm`: DeepGEMM's ``get_paged_mqa_logits_metadata`` and
  ``fp8_paged_mqa_logits`` (the indexer's logits, for stacks that run their own top-k) and the
  fused ``paged_indexer_topk`` (the selection without the logits matrix).

Both run on the CPU too (the Rust ops), so a stack can test on a machine without a GPU.
Arguments the original libraries reject raise :class:`CompatRuntimeError` or
:class:`CompatAssertionError` (the exception types those libraries raise, and ValueErrors);
arguments dsv4rs cannot serve raise ValueError naming the argument.
"""

from dsv4rs.compat import deep_gemm, flash_mla
from dsv4rs.compat._common import GATHER_BUDGET_BYTES, CompatAssertionError, CompatRuntimeError

__all__ = ["GATHER_BUDGET_BYTES", "CompatAssertionError", "CompatRuntimeError", "deep_gemm", "flash_mla"]
