"""Text in, text out: :class:`LLM` loads a checkpoint (weights, tokenizer, chat template), runs
requests through the runtime's continuous-batching scheduler (:mod:`dsv4rs.runtime.scheduler`),
with MTP speculative decoding when the model has its MTP block (:mod:`.speculative`), and turns
tokens into text as they come (:mod:`.text`). With ``parallel=`` it runs over several processes
(:mod:`dsv4rs.parallel`), every process making the same calls.

The object is not thread-safe: one thread drives it (``dsv4rs serve`` gives it one engine thread,
:mod:`dsv4rs.serve.worker`).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dsv4rs import ops
from dsv4rs.llm.outputs import Completion, Delta, TokenLogprob
from dsv4rs.llm.params import SamplingParams
from dsv4rs.llm.speculative import SpeculativeScheduler
from dsv4rs.llm.text import Detokenizer, StopStrings
from dsv4rs.llm.tokenizer import Tokenizer
from dsv4rs.ops._checks import choice
from dsv4rs.parallel import ParallelConfig, host_max
from dsv4rs.runtime.engine import Engine, token_ids
from dsv4rs.runtime.scheduler import Scheduler

Prompt = str | Sequence[int]
Messages = Sequence[Mapping[str, Any]]


@dataclass
class _State:
    out: Completion
    stop_ids: frozenset[int]
    detok: Detokenizer
    stops: StopStrings
    start: float
    consumed: int = 0  # tokens of the scheduler's output looked at
    logprobs: bool = False
    deltas: list[Delta] = field(default_factory=list)


class LLM:
    """A DeepSeek-V4 checkpoint behind a text interface.

    Args:
        checkpoint: a folder with ``config.json``, safetensors shards, ``tokenizer.json`` and
            ``tokenizer_config.json`` (special tokens, chat template).
        device: where to run (default: CUDA if available, else the CPU).
        dtype: the dtype of the weights that are not quantized (default bfloat16 on a GPU,
            float32 on the CPU); with ``quantized=False``, of all of them.
        quantized: keep the FP8 linears and MXFP4 experts of a DeepSeek checkpoint as stored
            (default; ``load_checkpoint(quantized=True)``), or dequantize them to ``dtype``.
        activations: how the quantized weights' activations are rounded, ``"fp8"`` (DeepSeek's
            W8A8, default) or ``"bf16"`` (:meth:`~dsv4rs.model.DeepseekV4.set_activation_quant`).
        rope_table: how RoPE angles are computed, ``"official"`` (DeepSeek's float32 table,
            default) or ``"exact"`` (:meth:`~dsv4rs.model.DeepseekV4.set_rope_table`).
        speculative: MTP speculative decoding (default: when the checkpoint has an MTP block);
            it keeps a fork per running request, so at most ``max_sequences // 2`` run at once.
        token_budget: tokens fed per step (decodes first, then prefill chunks).
        parallel: this process's :class:`dsv4rs.parallel.ParallelConfig` when several processes
            share the model (under torchrun: :func:`dsv4rs.parallel.init`). Each loads its share
            (its routed experts; under ``"tp"`` its attention heads too), every process makes
            the same calls in the same order, and :meth:`generate` and :meth:`chat` return every
            prompt's completion on every process: under ``"dp"`` each process runs a share of
            the prompts (prompt ``i`` on rank ``i % world``) and the completions are gathered,
            under ``"tp"`` every process runs them all; :meth:`stream` gives every process rank
            0's deltas. See :meth:`step` for driving requests yourself.
        engine_options: :class:`dsv4rs.runtime.Engine`'s (``max_sequences``, ``max_len``,
            ``quant``, ``cuda_graphs``, ``memory_fraction``, ...).
    """

    def __init__(self, checkpoint: str | os.PathLike[str], device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, speculative: bool | None = None, token_budget: int = 512,
                 progress: bool = False, quantized: bool = True, activations: str = "fp8",
                 rope_table: str = "official", parallel: ParallelConfig | None = None,
                 **engine_options: Any) -> None:
        from dsv4rs.model.loader import load_checkpoint

        from dsv4rs.model.layers.quant import ACT_MODES

        path = os.fspath(checkpoint)
        # Checked before the (long) load; the model checks them again where they are set.
        choice("activations", activations, ACT_MODES)
        choice("rope_table", rope_table, ops.ROPE_TABLES)
        if speculative is not None and not isinstance(speculative, bool):
            raise ValueError(f"speculative: expected True, False or None, got {speculative!r}")
        if isinstance(token_budget, bool) or not isinstance(token_budget, int) or token_budget < 1:
            raise ValueError(f"token_budget: expected an int >= 1, got {token_budget!r}")
        if parallel is not None and not isinstance(parallel, ParallelConfig):
            raise ValueError(f"parallel: expected a dsv4rs.parallel.ParallelConfig, got {type(parallel).__name__}")
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = Tokenizer(path)
        share = {} if parallel is None else {
            "experts": parallel.experts, "tp": (parallel.rank, parallel.world) if parallel.mode == "tp" else None}
        model = load_checkpoint(path, device=dev, progress=progress, quantized=quantized,
                                dtype=dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32), **share)
        model.set_activation_quant(activations).set_rope_table(rope_table)
        if self.tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"tokenizer: {self.tokenizer.vocab_size} tokens, more than the model's vocab_size "
                             f"{model.config.vocab_size}")
        self.parallel = parallel
        self.engine = Engine(model, parallel=parallel, **engine_options)
        self.speculative = bool(len(model.mtp)) if speculative is None else speculative
        # Seeds drawn for requests without one: the same stream on every rank under "tp" (the
        # ranks sample the same tokens), rank 0's seed plus the rank under "dp".
        self._random: random.Random | Any = random
        if parallel is not None:
            base = host_max(parallel, [random.getrandbits(62) if parallel.rank == 0 else 0], "the seeds' agreement")[0]
            self._random = random.Random(base + (parallel.rank if parallel.mode == "dp" else 0))
        self.scheduler = (SpeculativeScheduler if self.speculative else Scheduler)(self.engine, token_budget)
        self.eos_ids = frozenset(_eos_ids(path) | ({self.tokenizer.eos_token_id} - {None}))
        self.model_name = os.path.basename(os.path.normpath(path))
        self._states: dict[int, _State] = {}

    @property
    def max_len(self) -> int:
        """The longest sequence (prompt and generated tokens) the cache holds."""
        return self.engine.max_len

    # -- prompts ---------------------------------------------------------------------------------

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a text prompt (with the tokenizer's special tokens), or ids checked: a
        sequence of ints or a 1-d integer tensor (bools, floats and other types raise TypeError
        naming ``prompt`` rather than being truncated to ints)."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else token_ids("prompt", prompt).tolist()
        if not ids:
            raise ValueError("prompt: empty")
        bad = [t for t in ids if not 0 <= t < self.engine.cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt: token id {bad[0]} outside [0, {self.engine.cfg.vocab_size})")
        return ids

    def encode_chat(self, messages: Messages, add_generation_prompt: bool = True, **template_kwargs: Any) -> list[int]:
        """A conversation through the checkpoint's chat template, as token ids."""
        if not isinstance(add_generation_prompt, bool):
            raise ValueError(f"add_generation_prompt: expected True or False, got {add_generation_prompt!r}")
        if "tokenize" in template_kwargs:
            raise ValueError("tokenize: encode_chat always returns token ids (the tokenizer's "
                             "apply_chat_template renders text)")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=True, **template_kwargs)

    def max_tokens(self, prompt_tokens: int, params: SamplingParams) -> int:
        """The tokens a prompt of ``prompt_tokens`` may generate under ``params`` (``max_tokens``,
        or up to the end of the context); ``ValueError`` when they do not fit the context."""
        if isinstance(prompt_tokens, bool) or not isinstance(prompt_tokens, int) or prompt_tokens < 1:
            raise ValueError(f"prompt_tokens: expected an int >= 1, got {prompt_tokens!r}")
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params: expected SamplingParams, got {type(params).__name__}")
        room = self.max_len - prompt_tokens
        if room < 1:
            raise ValueError(f"prompt: {prompt_tokens} tokens leave no room in the context of {self.max_len} tokens")
        if params.max_tokens is not None and params.max_tokens > room:
            raise ValueError(f"max_tokens: the prompt's {prompt_tokens} tokens + max_tokens {params.max_tokens} "
                             f"exceed the context of {self.max_len} tokens")
        return room if params.max_tokens is None else params.max_tokens

    # -- requests, one step at a time --------------------------------------------------------------

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None) -> int:
        """Queues a prompt (text or token ids); returns its request id. A prompt that does not fit
        the context with its ``max_tokens`` raises ``ValueError`` and queues nothing."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params: expected SamplingParams or None, got {type(params).__name__}")
        ids = self.encode(prompt)
        max_tokens = self.max_tokens(len(ids), params)
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids)
        seed = self._random.getrandbits(63) if params.seed is None else params.seed
        rid = self.scheduler.add(
            ids, max_tokens, stop_ids=stop_ids, temperature=float(params.temperature), top_k=params.top_k,
            top_p=float(params.top_p), min_p=float(params.min_p), repetition_penalty=float(params.repetition_penalty),
            presence_penalty=float(params.presence_penalty), frequency_penalty=float(params.frequency_penalty),
            seed=seed, logprobs=params.logprobs)
        self._states[rid] = _State(Completion(rid, ids, logprobs=[] if params.logprobs is not None else None),
                                   stop_ids, Detokenizer(self.tokenizer, ids, params.skip_special_tokens),
                                   StopStrings(params.stop), time.perf_counter(), logprobs=params.logprobs is not None)
        return rid

    def abort(self, rid: int) -> None:
        """Ends a request now; its sequence's pages go back to the cache. Its last delta (finish
        reason ``"abort"``) comes with the next :meth:`step`. An id of no running request (unknown,
        finished or aborted already) is ignored, as vLLM's ``abort_request`` does."""
        if isinstance(rid, bool) or not isinstance(rid, int):
            raise TypeError(f"rid: expected a request id (an int), got {type(rid).__name__}")
        if rid in self._states and self._states[rid].out.finish_reason is None:
            self.scheduler.abort(rid)

    def has_unfinished(self) -> bool:
        """Whether any request added is still running (queued, prefilling or decoding). In a
        parallel LLM: on any process (every process asks at the same point)."""
        mine = any(s.out.finish_reason is None for s in self._states.values())
        return mine if self.parallel is None else self._anywhere(mine)

    def _anywhere(self, mine: bool) -> bool:
        """Whether ``mine`` holds on any process of a parallel LLM."""
        return host_max(self.parallel, [int(mine)], "the requests' agreement")[0] > 0

    def step(self) -> list[Delta]:
        """One engine step: the deltas of the requests that advanced or finished. In a parallel
        LLM every process calls it the same number of times (while :meth:`has_unfinished`), each
        for its own requests: a process with nothing to run steps an empty batch, and with MTP
        speculation every process drafts after every step."""
        steps, drafts = self.engine.steps, self.engine.drafts
        if self.scheduler.waiting or self.scheduler.running:
            self.scheduler.step()
        if self.parallel is not None:
            if self.engine.steps == steps:  # nothing of ours ran: the others' MoE layers still exchange with us
                self.engine.step([], [])
            if self.speculative and self.engine.drafts == drafts:
                self.engine.draft([])
            if self.engine.steps != steps + 1 or self.speculative and self.engine.drafts != drafts + 1:
                raise RuntimeError(f"LLM.step: ran {self.engine.steps - steps} steps and {self.engine.drafts - drafts} "
                                   "drafts; a parallel LLM's processes run one of each (drafts with speculation)")
        deltas = []
        for rid, st in list(self._states.items()):
            if st.out.finish_reason is None:
                d = self._advance(rid, st)
                if d is not None:
                    deltas.append(d)
        return deltas

    def completion(self, rid: int) -> Completion:
        """A finished request's result (and forgets it)."""
        st = self._states.get(rid) if isinstance(rid, int) and not isinstance(rid, bool) else None
        if st is None:
            raise ValueError(f"rid: no request {rid!r} (never added, or its completion was taken)")
        if st.out.finish_reason is None:
            raise ValueError(f"rid: request {rid} is not finished")
        del self._states[rid]
        return st.out

    def _advance(self, rid: int, st: _State) -> Delta | None:
        r = self.scheduler.requests[rid]
        new = r.output[st.consumed :]
        if not new and not r.done:
            return None
        now = time.perf_counter()
        out, text, toks, lps, finish = st.out, [], [], [], None
        for k, tok in enumerate(new):
            i = st.consumed + k
            toks.append(tok)
            if st.logprobs and i < len(r.token_logprobs):
                lp, top = r.token_logprobs[i]
                lps.append(TokenLogprob(tok, lp, tuple(top)))
            if r.done and r.finish_reason == "stop" and i == len(r.output) - 1 and tok in st.stop_ids:
                finish = "stop"  # a stop token: kept in the ids, left out of the text
                break
            text.append(st.stops.feed(st.detok.push([tok])))
            if st.stops.stopped:
                finish = "stop"
                break
        st.consumed += len(new)
        if out.time_to_first_token is None and toks:
            out.time_to_first_token = now - st.start
        finish = finish or r.finish_reason
        if finish is not None and not st.stops.stopped:
            text.append(st.stops.feed(st.detok.flush(), final=True))
        out.text += "".join(text)
        out.token_ids += toks
        if out.logprobs is not None:
            out.logprobs += lps
        if finish is not None:
            out.finish_reason, out.elapsed = finish, now - st.start
            out.drafted, out.accepted = r.drafted, r.accepted
            if not r.done:
                self.scheduler.abort(rid)  # a stop string: free the sequence now
            self.scheduler.requests.pop(rid, None)
        return Delta(rid, "".join(text), tuple(toks), tuple(lps) if st.logprobs else None, finish,
                     out if finish is not None else None)

    # -- whole requests ---------------------------------------------------------------------------

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Completion]:
        """Runs every prompt (text or token ids) to completion, batched; results in order."""
        if isinstance(prompts, torch.Tensor):
            single = prompts.dim() == 1
        elif isinstance(prompts, str):
            single = True
        elif isinstance(prompts, Sequence):
            single = len(prompts) > 0 and isinstance(prompts[0], int) and not isinstance(prompts[0], bool)
        else:
            raise TypeError(f"prompts: expected text, token ids or a sequence of them, got {type(prompts).__name__}")
        return self._run([prompts] if single else list(prompts), params, self.encode)

    def chat(self, conversations: Messages | Sequence[Messages],
             params: SamplingParams | Sequence[SamplingParams] | None = None, **template_kwargs: Any
             ) -> list[Completion]:
        """Runs conversations (lists of ``{"role", "content"}`` messages) through the chat
        template, with the generation prompt; results in order."""
        if isinstance(conversations, (str, bytes, Mapping)) or not isinstance(conversations, Sequence):
            raise TypeError(f"conversations: expected a conversation (a list of messages) or a list of them, got "
                            f"{type(conversations).__name__}")
        single = len(conversations) > 0 and isinstance(conversations[0], Mapping)
        convs = [conversations] if single else list(conversations)
        return self._run(convs, params, lambda m: self.encode_chat(m, **template_kwargs))

    def _run(self, prompts: list, params, encode) -> list[Completion]:
        plist = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"params: {len(plist)} for {len(prompts)} prompts")
        ids = [encode(p) for p in prompts]  # every prompt checked on every process
        pc = self.parallel
        mine = range(len(ids)) if pc is None or pc.mode == "tp" else range(pc.rank, len(ids), pc.world)
        for n, sp in zip(map(len, ids), plist):  # every prompt checked before anything is queued, on every process
            self.max_tokens(n, SamplingParams() if sp is None else sp)
        rids: list[int] = []
        try:
            for i in mine:
                rids.append(self.add_request(ids[i], plist[i]))
            while self._busy(rids):
                self.step()
        except BaseException:
            for r in rids:
                self._forget(r)
            raise
        done = [self.completion(r) for r in rids]
        if pc is None or pc.mode == "tp":
            return done
        parts = self._gathered(done, "the completions' gathering")
        return [parts[i % pc.world][i // pc.world] for i in range(len(ids))]

    def _busy(self, rids: list[int]) -> bool:
        """Whether any of ``rids`` is unfinished (in a parallel LLM: any process's)."""
        mine = any(self._states[r].out.finish_reason is None for r in rids)
        return mine if self.parallel is None else self._anywhere(mine)

    def stream(self, prompt: Prompt | Messages, params: SamplingParams | None = None, chat: bool = False,
               **template_kwargs: Any) -> Iterator[Delta]:
        """Yields the request's deltas as they come (the last one has ``finish_reason``); the
        request is aborted if the iteration stops early. Other requests advance meanwhile.

        In a parallel LLM every process streams the same prompt and params and gets the same
        deltas: rank 0 runs the request (under ``"tp"`` every rank does, on its heads) and its
        deltas go to every process after each step (one small gather over the processes), so
        they all stop at the same step. Every process takes the stream to its end, or stops it
        after the same delta."""
        if not isinstance(chat, bool):
            raise ValueError(f"chat: expected True or False, got {chat!r}")
        ids = self.encode_chat(prompt, **template_kwargs) if chat else self.encode(prompt)
        pc = self.parallel
        if pc is not None:  # checked on every process, the ones that do not queue it too
            self.max_tokens(len(ids), SamplingParams() if params is None else params)
        rid = self.add_request(ids, params) if pc is None or pc.mode == "tp" or pc.rank == 0 else None
        try:
            while True:
                deltas = [d for d in self.step() if d.request_id == rid]
                if pc is not None:  # rank 0's, on every process
                    deltas = self._gathered(deltas if pc.rank == 0 else None, "the stream's deltas")[0]
                for d in deltas:
                    yield d
                    if d.finished:
                        return
        finally:
            if rid is not None and rid in self._states:
                self._forget(rid)

    def _gathered(self, mine: Any, what: str) -> list:
        """Every process's ``mine`` (picklable), in rank order, on every process of a parallel LLM."""
        import torch.distributed as dist

        from dsv4rs.parallel import collective, control_group

        pc = self.parallel
        parts: list = [None] * pc.world
        collective(pc, what, lambda: dist.all_gather_object(parts, mine, group=control_group(pc.group)))
        return parts

    def _forget(self, rid: int) -> None:
        """Aborts a request and drops what is kept of it."""
        self.abort(rid)
        self._states.pop(rid, None)
        self.scheduler.requests.pop(rid, None)


def _eos_ids(path: str) -> set[int]:
    """``eos_token_id`` of config.json and generation_config.json (an int or a list)."""
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        try:
            with open(os.path.join(path, name), encoding="utf-8") as f:
                v = json.load(f).get("eos_token_id")
        except (OSError, ValueError):
            continue
        ids |= {v} if isinstance(v, int) else {int(x) for x in v} if isinstance(v, list) else set()
    return ids
