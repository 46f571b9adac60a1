"""dsv4rs: DeepSeek-V4's long-context attention machinery in Rust and CUDA.

Importing the package loads the Rust extension but never touches CUDA; GPU kernels are loaded on
first use. Public modules:

- :mod:`dsv4rs.ops`: the ops (compressor, indexer top-k, sparse attention, KV-entry formats), CPU
  and CUDA.
- :mod:`dsv4rs.compat`: FlashMLA's and DeepGEMM's entry points on the ops (docs/embedding.md).
- :mod:`dsv4rs.cache`: the paged KV-cache allocator and byte accounting (docs/model.md section 5).
- :mod:`dsv4rs.cost`: per-token FLOPs and KV-cache bytes of V4 and its baselines.
- :mod:`dsv4rs.model`: the DeepSeek-V4 model on the ops: :class:`~dsv4rs.model.V4Config` (the
  config, from a ``config.json``), ``DeepseekV4`` (the weights and the forward pass over the
  paged cache) and ``load_checkpoint`` (Hugging Face or DeepSeek safetensors checkpoints).
- :mod:`dsv4rs.runtime`: running a model: ``Engine`` (prefill, chunked prefill and decode of a
  batch through the paged cache, CUDA graphs on a GPU), ``Scheduler`` (continuous batching,
  sampling), the memory planner.
- :mod:`dsv4rs.reference`: the float64 pure-torch reference of every op (docs/model.md sections 2-5)
  and of the model's forward pass.
- :mod:`dsv4rs.llm`: text in, text out: :class:`LLM` and :class:`SamplingParams` (also here).
- :mod:`dsv4rs.serve`: the OpenAI-compatible HTTP server.
- :mod:`dsv4rs.bench`: the benchmarks of ``dsv4rs bench``.
- :mod:`dsv4rs.cli`: the ``dsv4rs`` command (``dsv4rs --help``: info, cost, demo, bench, plan, generate,
  serve).

Errors: bad arguments raise ``ValueError``/``TypeError``/``IndexError`` naming the argument;
GPU failures raise :class:`CudaError`; the cache manager raises :class:`OutOfPagesError` and
:class:`CacheStateError`; a checkpoint that does not fit raises
``dsv4rs.model.CheckpointError`` (a ``ValueError``).
"""

from dsv4rs._core import CacheStateError, CudaError, OutOfPagesError, __version__

__all__ = ["LLM", "CacheStateError", "CudaError", "OutOfPagesError", "SamplingParams", "__version__"]


def __getattr__(name: str):
    """``LLM`` and ``SamplingParams`` load on first use (importing dsv4rs stays free of torch)."""
    if name in ("LLM", "SamplingParams"):
        from dsv4rs import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'dsv4rs' has no attribute {name!r}")
