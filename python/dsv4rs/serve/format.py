"""OpenAI's response objects from :class:`dsv4rs.llm.Delta` s: whole responses, stream chunks,
usage and logprobs, for the completions and the chat API."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from dsv4rs.llm.outputs import Delta, TokenLogprob


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int = 0

    def add(self, d: Delta) -> None:
        self.completion_tokens += len(d.token_ids)

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class _Format:
    object = kind = prefix = ""

    def __init__(self, model: str, tokenizer) -> None:
        self.model, self.tok = model, tokenizer
        self.id, self.created = f"{self.prefix}-{uuid.uuid4().hex}", int(time.time())
        self.offset = 0  # characters of token text so far (completions' text_offset)

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def token(self, i: int) -> str:
        return self.tok.decode([i], skip_special_tokens=False)

    def first_chunk(self) -> dict | None:
        return None

    def usage_chunk(self, usage: Usage) -> dict:
        return {**self._head(self.object + ".chunk" if self.kind == "chat" else self.object), "choices": [],
                "usage": usage.as_dict()}


class CompletionFormat(_Format):
    object, kind, prefix = "text_completion", "completion", "cmpl"

    def logprobs(self, lps: Sequence[TokenLogprob] | None) -> dict | None:
        if lps is None:
            return None
        tokens = [self.token(lp.token_id) for lp in lps]
        offsets = []
        for t in tokens:
            offsets.append(self.offset)
            self.offset += len(t)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
                "top_logprobs": [{self.token(i): v for i, v in lp.top} for lp in lps], "text_offset": offsets}

    def chunk(self, d: Delta) -> dict:
        return {**self._head(self.object), "choices": [
            {"index": 0, "text": d.text, "logprobs": self.logprobs(d.logprobs), "finish_reason": d.finish_reason}]}

    def whole(self, deltas: list[Delta], usage: Usage) -> dict:
        lps = None if deltas[-1].logprobs is None else [lp for d in deltas for lp in d.logprobs or ()]
        return {**self._head(self.object), "choices": [
            {"index": 0, "text": "".join(d.text for d in deltas), "logprobs": self.logprobs(lps),
             "finish_reason": deltas[-1].finish_reason}], "usage": usage.as_dict()}


class ChatFormat(_Format):
    object, kind, prefix = "chat.completion", "chat", "chatcmpl"

    def _entry(self, i: int, v: float) -> dict:
        t = self.token(i)
        return {"token": t, "logprob": v, "bytes": list(t.encode("utf-8"))}

    def logprobs(self, lps: Sequence[TokenLogprob] | None) -> dict | None:
        if lps is None:
            return None
        return {"content": [{**self._entry(lp.token_id, lp.logprob), "top_logprobs": [self._entry(i, v) for i, v in lp.top]}
                            for lp in lps]}

    def first_chunk(self) -> dict:
        return {**self._head("chat.completion.chunk"), "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}

    def chunk(self, d: Delta) -> dict:
        delta = {"content": d.text} if d.text or not d.finished else {}
        return {**self._head("chat.completion.chunk"), "choices": [
            {"index": 0, "delta": delta, "logprobs": self.logprobs(d.logprobs), "finish_reason": d.finish_reason}]}

    def whole(self, deltas: list[Delta], usage: Usage) -> dict:
        lps = None if deltas[-1].logprobs is None else [lp for d in deltas for lp in d.logprobs or ()]
        return {**self._head(self.object), "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "".join(d.text for d in deltas)},
             "logprobs": self.logprobs(lps), "finish_reason": deltas[-1].finish_reason}], "usage": usage.as_dict()}
