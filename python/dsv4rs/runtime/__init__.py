"""The runtime: what strings the model's layers into steps over the paged KV cache.

- :mod:`.engine`: :class:`Engine`, sequences (add, fork, release, prefix reuse) and steps;
  :class:`SampledTokens`, tokens sampled on the device and fed without waiting for them.
- :mod:`.planner`: the per-step plan every layer shares (positions, rows to write, candidates).
- :mod:`.kv_cache`: the device tensors of the cache families.
"""

from dsv4rs.runtime.engine import Engine, SampledTokens

__all__ = ["Engine", "SampledTokens"]
