"""How to sample one request (:class:`SamplingParams`), validated on construction (no torch)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings of one request; a bad value raises ``ValueError`` naming the field.

    Attributes:
        max_tokens: tokens to generate at most (``None``: up to the end of the context).
        temperature: ``0`` is greedy (the arg max, lowest id on ties).
        top_p, top_k, min_p: nucleus (``1``: off), the ``top_k`` most likely (``0``: off), and
            tokens at least ``min_p`` times as likely as the most likely one (``0``: off); applied
            top-k, top-p, min-p (docs: :mod:`dsv4rs.runtime.sampling`).
        repetition_penalty: > 0, ``1`` off; presence_penalty, frequency_penalty: in [-2, 2],
            ``0`` off (see :func:`dsv4rs.runtime.sampling.penalize`).
        stop: strings that end the generation; the text is cut before the first one.
        stop_token_ids: token ids that end it (besides the tokenizer's end-of-sequence token
            unless ``ignore_eos``); their text is left out.
        seed: makes the request's samples reproducible, whatever else runs beside it (``None``:
            a fresh random seed).
        logprobs: ``None``, or report each generated token's log-probability (of the model's
            raw distribution) and the ``logprobs`` most likely alternatives (0 to 20).
        skip_special_tokens: leave special tokens out of the text.
    """

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = field(default=())
    stop_token_ids: tuple[int, ...] = field(default=())
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        for name, v in (("stop", self.stop), ("stop_token_ids", self.stop_token_ids)):
            if v is not None and not isinstance(v, str) and not isinstance(v, Iterable):
                raise ValueError(f"{name}: expected {'a string or ' if name == 'stop' else ''}a sequence, got {v!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        if self.top_k == -1:  # vLLM's spelling of "off"
            object.__setattr__(self, "top_k", 0)

        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"{name}: {what}, got {getattr(self, name)!r}")

        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: object) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        need(self.max_tokens is None or (is_int(self.max_tokens) and self.max_tokens >= 1), "max_tokens",
             "expected an int >= 1 or None")
        need(is_num(self.temperature) and self.temperature >= 0, "temperature", "expected a number >= 0")
        need(is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", "expected a number in (0, 1]")
        need(is_int(self.top_k) and self.top_k >= 0, "top_k", "expected an int >= 0 (or -1: off)")
        need(is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", "expected a number in [0, 1]")
        need(is_num(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty",
             "expected a number > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            need(is_num(getattr(self, name)) and -2 <= getattr(self, name) <= 2, name, "expected a number in [-2, 2]")
        need(all(isinstance(s, str) and s for s in self.stop), "stop", "expected non-empty strings")
        need(all(is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids", "expected ints >= 0")
        need(isinstance(self.ignore_eos, bool), "ignore_eos", "expected a bool")
        need(self.seed is None or (is_int(self.seed) and 0 <= self.seed < 1 << 63), "seed",
             "expected an int in [0, 2^63) or None")
        need(self.logprobs is None or (is_int(self.logprobs) and 0 <= self.logprobs <= 20), "logprobs",
             "expected an int in [0, 20] or None")
        need(isinstance(self.skip_special_tokens, bool), "skip_special_tokens", "expected a bool")
