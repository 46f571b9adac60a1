"""DeepSeek-V4 assembled on the dsv4rs ops.

- :class:`V4Config`: hyper-parameters from a Hugging Face ``config.json``, validated; presets.
- :class:`DeepseekV4`: the weights, with transformers' parameter names; :func:`init_random`.
- :class:`Engine`: prefill and decode of a batch of sequences through the paged KV cache
  (:mod:`dsv4rs.cache`) and the dsv4rs ops, CPU or CUDA.
- :func:`dense_forward`: the float64 reference forward pass (no cache).
- :func:`load_checkpoint`: safetensors checkpoints in transformers' or DeepSeek's layout.
"""

from dsv4rs.model.config import V4Config, YaRN
from dsv4rs.model.dense import dense_forward, float64_copy
from dsv4rs.model.engine import Engine
from dsv4rs.model.modules import DeepseekV4, init_random

__all__ = ["DeepseekV4", "Engine", "V4Config", "YaRN", "dense_forward", "float64_copy", "init_random"]
