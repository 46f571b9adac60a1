"""What :class:`dsv4rs.LLM` returns: a :class:`Completion` per finished request and a
:class:`Delta` per request and step while streaming (no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model and the most likely alternatives
    ``(token id, logprob)``, best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Delta:
    """What one step added to a request: new text (never a partial character, nothing that may
    still turn out to be a stop string), the new token ids, their logprobs (when asked), and
    ``finish_reason`` (``"stop"``, ``"length"`` or ``"abort"``) and the whole ``completion``
    (timings, acceptance) on the request's last delta."""

    request_id: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None = None
    finish_reason: str | None = None
    completion: Completion | None = None

    @property
    def finished(self) -> bool:
        """Whether this is the request's last delta (it has a ``finish_reason``)."""
        return self.finish_reason is not None


@dataclass
class Completion:
    """A finished request.

    Attributes:
        text: the generated text (cut before a stop string; a stop token's text left out).
        token_ids: the generated tokens (through the one that ended it).
        finish_reason: ``"stop"`` (a stop string, a stop token or end of sequence), ``"length"``
            (``max_tokens``) or ``"abort"``.
        time_to_first_token, elapsed: seconds from the request's arrival.
        drafted, accepted: speculative decoding's draft tokens verified and accepted.
    """

    request_id: int
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    time_to_first_token: float | None = None
    elapsed: float | None = None
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted over drafted tokens (None without speculation or before any draft)."""
        return self.accepted / self.drafted if self.drafted else None
