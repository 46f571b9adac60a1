"""Text in, text out, on top of :mod:`dsv4rs.runtime`.

- :class:`LLM` (:mod:`.engine`): a checkpoint's weights, tokenizer and chat template; ``generate``,
  ``chat``, ``stream`` and the step-at-a-time API the server drives.
- :class:`SamplingParams` (:mod:`.params`), :class:`Completion` and :class:`Delta`
  (:mod:`.outputs`).
- :mod:`.tokenizer` (tokenizer.json, chat templates), :mod:`.text` (incremental
  detokenization, stop strings), :mod:`.speculative` (MTP drafts and their verification).

Importing this package does not import torch; :class:`LLM` loads it on first use.
"""

from __future__ import annotations

from typing import Any

from dsv4rs.llm.outputs import Completion, Delta, TokenLogprob
from dsv4rs.llm.params import SamplingParams

__all__ = ["LLM", "Completion", "Delta", "SamplingParams", "TokenLogprob"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from dsv4rs.llm.engine import LLM

        return LLM
    raise AttributeError(f"module 'dsv4rs.llm' has no attribute {name!r}")
