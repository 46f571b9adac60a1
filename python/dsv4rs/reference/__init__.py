"""The float64 reference of dsv4rs, in plain torch: what the kernels and the model are tested
against. Tests and tools import it; the model and the runtime never do.

- :mod:`.ops`: the twin of every op (RoPE with YaRN, the compressor in prefill and token-by-token
  form, indexer scores and top-k, attention with a sink, the quantizers and the exact cache
  bytes), re-exported here.
- :mod:`.mhc`: the twins of :func:`dsv4rs.ops.mhc_mix`, ``mhc_weights``, ``mhc_collapse`` and
  ``mhc_combine``.
- :mod:`.dense`: the float64 forward pass of one sequence, no cache (imports the model).
- :mod:`.export`: writes a model as a checkpoint in DeepSeek's quantized layout (imports the model).
"""

from dsv4rs.reference.mhc import mhc_collapse, mhc_combine, mhc_mix, mhc_weights, sinkhorn
from dsv4rs.reference.ops import *  # noqa: F403
from dsv4rs.reference.ops import __all__ as _ops_all

__all__ = [*_ops_all, "mhc_collapse", "mhc_combine", "mhc_mix", "mhc_weights", "sinkhorn"]
