"""dsv4rs: DeepSeek-V4's long-context attention machinery in Rust and CUDA.

Importing the package loads the Rust extension but never touches CUDA; GPU kernels are loaded on
first use. Public modules:

- :mod:`dsv4rs.ops`: the ops (compressor, indexer top-k, sparse attention, KV-entry formats), CPU
  and CUDA.
- :mod:`dsv4rs.compat`: FlashMLA's and DeepGEMM's entry points on the ops (docs/embedding.md).
- :mod:`dsv4rs.cache`: the paged KV-cache allocator and byte accounting (docs/model.md section 5).
- :mod:`dsv4rs.cost`: per-token FLOPs and KV-cache bytes of V4 and its baselines.
- :mod:`dsv4rs.reference`: the float64 pure-torch reference of every op (docs/model.md sections 2-5).
- :mod:`dsv4rs.llm`: text in, text out: :class:`LLM` and :class:`SamplingParams` (also here).
- :mod:`dsv4rs.serve`: the OpenAI-compatible HTTP server.
- :mod:`dsv4rs.cli`: the ``dsv4rs`` command.
"""

from dsv4rs._core import CacheStateError, CudaError, OutOfPagesError, __version__

__all__ = ["LLM", "CacheStateError", "CudaError", "OutOfPagesError", "SamplingParams", "__version__"]


def __getattr__(name: str):
    """``LLM`` and ``SamplingParams`` load on first use (importing dsv4rs stays free of torch)."""
    if name in ("LLM", "SamplingParams"):
        from dsv4rs import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'dsv4rs' has no attribute {name!r}")
