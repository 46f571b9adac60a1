"""DeepSeek-V4 assembled on the dsv4rs ops.

- :class:`V4Config` (:mod:`.config`): hyper-parameters from a Hugging Face ``config.json``,
  validated; presets. Importing it does not import torch.
- :class:`DeepseekV4` (:mod:`.model`): the weights, with transformers' parameter names, and the
  forward pass over the paged KV cache, built from :mod:`.layers`; :func:`init_random`.
- :func:`load_checkpoint` (:mod:`.loader`): safetensors checkpoints in transformers' or DeepSeek's
  layout.

Run a model with :class:`dsv4rs.runtime.Engine`; its float64 reference forward pass is
:func:`dsv4rs.reference.dense.dense_forward`.
"""

from __future__ import annotations

from typing import Any

from dsv4rs.model.config import V4Config, YaRN

__all__ = ["CheckpointError", "DeepseekV4", "V4Config", "YaRN", "init_random", "load_checkpoint"]

_LAZY = {"DeepseekV4": "model", "init_random": "model", "load_checkpoint": "loader", "CheckpointError": "loader"}


def __getattr__(name: str) -> Any:
    """The torch-backed names load on first use, so that the config (and ``dsv4rs cost``) stays
    free of torch."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"dsv4rs.model.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'dsv4rs.model' has no attribute {name!r}")
