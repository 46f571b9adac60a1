"""Text out of token ids as they arrive: incremental detokenization that never splits a
multi-byte character (:class:`Detokenizer`), and stop strings that hold back text which could
still become one (:class:`StopStrings`)."""

from __future__ import annotations

from collections.abc import Sequence

from dsv4rs.llm.tokenizer import Tokenizer

_CONTEXT = 5  # prompt tokens decoded before the output, so the first token's spacing is right


class Detokenizer:
    """Turns a growing list of token ids into text deltas (as vLLM and transformers' streamers do).

    Decoding is not per-token additive (byte-level BPE splits a character's UTF-8 bytes across
    tokens; some decoders strip a leading space), so each push decodes the tokens since the last
    emitted point together with a few before it and emits the difference, holding everything back
    while the text ends in an incomplete character (U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer, prompt: Sequence[int] = (), skip_special_tokens: bool = True) -> None:
        self.tok, self.skip = tokenizer, skip_special_tokens
        self.ids = list(prompt[-_CONTEXT:])
        self.prefix = 0  # ids[prefix:read] decode to what was already emitted (plus context)
        self.read = len(self.ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def push(self, ids: Sequence[int]) -> str:
        """Adds token ids; returns the text they complete (possibly empty)."""
        self.ids.extend(ids)
        before = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(before) :]
        return ""

    def flush(self) -> str:
        """What is still held back (an incomplete character at the end, as U+FFFD)."""
        before = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return text[len(before) :]


class StopStrings:
    """Tracks the text of one request against its stop strings.

    :meth:`feed` takes each new piece of text and returns what may be shown: text that cannot
    belong to a stop string. When a stop string appears, the text is cut right before it and
    :attr:`stopped` is set.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.text = ""  # all text fed
        self.sent = 0  # characters of text returned
        self.stopped = False

    def feed(self, piece: str, final: bool = False) -> str:
        """Adds ``piece``; returns the newly showable text (everything left when ``final``)."""
        if self.stopped:
            return ""
        self.text += piece
        longest = max((len(s) for s in self.stops), default=0)
        start = max(0, self.sent - longest + 1)
        hits = [i for s in self.stops if (i := self.text.find(s, start)) >= 0]
        if hits:
            cut = min(hits)
            self.stopped = True
            self.text = self.text[:cut]
            out, self.sent = self.text[self.sent :], cut
            return out
        hold = 0 if final else self._partial()
        end = len(self.text) - hold
        out = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out

    def _partial(self) -> int:
        """Length of the longest end of the text that begins a stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best
