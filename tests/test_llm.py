"""Text in, text out (dsv4rs.llm) on a tiny checkpoint with a real BPE tokenizer and a chat
template: generate against a hand loop over Engine.step, seeds, stop strings, max_tokens, context
overflow, logprobs, the chat template against transformers', streaming text, and `dsv4rs
generate`."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dsv4rs.llm import SamplingParams

MAX_LEN = 256

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPTS = ["Hello, world! How are you", "The quick brown fox", "Café 東京 🙂"]


@pytest.fixture(scope="module")
def llm(tiny_checkpoint: str):
    from dsv4rs import LLM

    return LLM(tiny_checkpoint, max_sequences=4, max_len=MAX_LEN, speculative=False)


@pytest.fixture(scope="module")
def spec(tiny_checkpoint: str):
    from dsv4rs import LLM

    return LLM(tiny_checkpoint, max_sequences=6, max_len=MAX_LEN)


def hand_loop(llm, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding by hand: one Engine.step per token, the arg max of its logits."""
    from dsv4rs.runtime import Engine

    eng = Engine(llm.engine.model, max_sequences=1, max_len=MAX_LEN)
    seq, _ = eng.add_sequence()
    logits = eng.step([seq], [prompt])[0]
    out, all_logits = [], []
    for _ in range(n):
        all_logits.append(logits)
        out.append(int(logits.argmax()))
        logits = eng.step([seq], [[out[-1]]])[0]
    return out, all_logits


def test_generate_greedy_equals_a_hand_loop_over_engine_step(llm, spec) -> None:
    """Batched greedy generation (continuous batching, ragged prompts) gives the tokens of one
    sequence decoded by hand; and so does MTP speculation (identical greedy text)."""
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
    outs = llm.generate(PROMPTS, greedy)
    specs = spec.generate(PROMPTS, greedy)
    for text, out, sp in zip(PROMPTS, outs, specs):
        ids = llm.encode(text)
        assert ids[0] == llm.tokenizer.bos_token_id and out.prompt_token_ids == ids
        want, logits = hand_loop(llm, ids, 12)
        assert out.token_ids == want and out.finish_reason == "length"
        assert out.text == llm.tokenizer.decode(want)
        assert sp.token_ids == want and sp.text == out.text
        assert sp.drafted > 0 and 0 <= sp.acceptance_rate <= 1
        # logprobs: the model's log-softmax; the greedy token is the most likely
        for lp, lg, tok in zip(out.logprobs, logits, want):
            ref = torch.log_softmax(lg, -1)
            assert lp.token_id == tok and lp.top[0][0] == tok and len(lp.top) == 2
            assert lp.logprob == pytest.approx(float(ref[tok]), abs=1e-4)
    assert llm.engine.manager.sequence_ids() == [] and spec.engine.manager.sequence_ids() == []
    spec.engine.manager.check()


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm, spec) -> None:
    params = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    for m in (llm, spec):
        alone = m.generate(PROMPTS[0], params)[0]
        batched = m.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]],
                             [SamplingParams(max_tokens=7, seed=5), params, SamplingParams(max_tokens=3)])[1]
        assert alone.token_ids == batched.token_ids and len(alone.token_ids) == 10
        other = m.generate(PROMPTS[0], SamplingParams(max_tokens=10, temperature=0.9, seed=99, ignore_eos=True))[0]
        assert other.token_ids != alone.token_ids


@pytest.mark.parametrize("speculative", [False, True])
def test_random_joins_and_aborts_leave_each_request_as_alone(tiny_checkpoint: str, speculative: bool) -> None:
    """Seeded random runs of add_request (random prompts and settings: greedy and sampled,
    top-k, top-p, a penalty, logprobs), abort and step, with a token budget of 16 so prompts
    are cut into chunks beside running decodes: every request that was not aborted gives the
    tokens and text it gives run alone afterwards, and its log-probabilities within float32
    rounding (prefix hits, forks and chunking included); the cache is empty at the end."""
    import random

    from dsv4rs import LLM

    m = LLM(tiny_checkpoint, max_sequences=6, max_len=MAX_LEN, speculative=speculative, token_budget=16)
    r = random.Random(11 + speculative)
    prompts = [*PROMPTS, "a b c d e f g h i j k l m n o p " * 3]

    def params() -> SamplingParams:
        kw = {"max_tokens": r.randint(1, 12), "seed": r.randrange(1 << 30), "ignore_eos": r.random() < 0.7,
              "temperature": r.choice([0.0, 0.8, 1.0])}
        for key, p, values in (("top_k", 0.3, [1, 5, 50]), ("top_p", 0.3, [0.5, 0.9]),
                               ("repetition_penalty", 0.2, [1.3]), ("logprobs", 0.2, [2])):
            if r.random() < p:
                kw[key] = r.choice(values)
        return SamplingParams(**kw)

    requests: dict[int, tuple[str, SamplingParams]] = {}
    for _ in range(150):
        op = r.random()
        if op < 0.3:
            p, sp = r.choice(prompts), params()
            requests[m.add_request(p, sp)] = (p, sp)
        elif op < 0.38 and requests:
            m.abort(r.choice(list(requests)))
        else:
            m.step()
    while m.has_unfinished():
        m.step()
    assert m.engine.manager.sequence_ids() == []
    kept = 0
    for rid, (p, sp) in requests.items():
        got = m.completion(rid)
        if got.finish_reason == "abort":
            continue
        alone = m.generate(p, sp)[0]
        assert (got.token_ids, got.text, got.finish_reason) == (alone.token_ids, alone.text, alone.finish_reason), rid
        if sp.logprobs is not None:  # the same alternatives, values within float32 rounding
            for a, b in zip(got.logprobs, alone.logprobs, strict=True):
                assert a.token_id == b.token_id and [i for i, _ in a.top] == [i for i, _ in b.top], rid
                assert abs(a.logprob - b.logprob) <= 1e-5 and all(
                    abs(x - y) <= 1e-5 for (_, x), (_, y) in zip(a.top, b.top)), rid
        kept += 1
    assert kept >= 20


def test_stop_strings_cut_exactly(llm, spec) -> None:
    """With the same seed the text runs as before up to the stop string and ends right before it;
    the tokens end with the one completing it."""
    for m in (llm, spec):
        base = SamplingParams(max_tokens=30, temperature=1.0, seed=7, ignore_eos=True)
        full = m.generate(PROMPTS[1], base)[0]
        text = full.text
        # a 2-character stop string whose first occurrence is past the first few characters
        i = next(i for i in range(4, len(text) - 2)
                 if text.find(text[i : i + 2]) == i and "\ufffd" not in text[i - 1 : i + 3])
        stop = text[i : i + 2]
        cut = m.generate(PROMPTS[1], SamplingParams(max_tokens=30, temperature=1.0, seed=7, ignore_eos=True,
                                                     stop=("\x00never", stop)))[0]
        assert cut.text == text[:i] and cut.finish_reason == "stop"
        n = len(cut.token_ids)
        assert cut.token_ids == full.token_ids[:n] and stop in m.tokenizer.decode(cut.token_ids)
        assert stop not in m.tokenizer.decode(cut.token_ids[:-1])
        assert m.engine.manager.sequence_ids() == []


def test_max_tokens_and_stop_token_ids(llm) -> None:
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"
    # the third greedy token as a stop token id: kept in the ids, left out of the text
    stop = out.token_ids[2]
    first = out.token_ids.index(stop)
    cut = llm.generate(PROMPTS[0], SamplingParams(max_tokens=5, temperature=0, stop_token_ids=(stop,)))[0]
    assert cut.token_ids == out.token_ids[: first + 1] and cut.finish_reason == "stop"
    assert cut.text == llm.tokenizer.decode(out.token_ids[:first])
    # max_tokens=None runs to the end of the context
    ids = list(range(10, 10 + MAX_LEN - 4))
    rest = llm.generate([ids], SamplingParams(max_tokens=None, temperature=0, ignore_eos=True))[0]
    assert len(rest.token_ids) == 4


def test_context_overflow_is_a_clear_error(llm) -> None:
    long = "The quick brown fox jumps over the lazy dog. " * 40
    n = len(llm.encode(long))
    assert n > MAX_LEN
    with pytest.raises(ValueError, match=f"prompt: {n} tokens leave no room in the context of {MAX_LEN} tokens"):
        llm.generate(long)
    with pytest.raises(ValueError, match=r"max_tokens: .* \+ max_tokens 250 exceed the context of 256 tokens"):
        llm.generate(PROMPTS[0], SamplingParams(max_tokens=250))
    with pytest.raises(ValueError, match="prompt: token id"):
        llm.generate([[5, 10**6]])
    assert llm.engine.manager.sequence_ids() == [] and not llm.has_unfinished()


@pytest.mark.parametrize(("kw", "name"), [
    ({"token_budget": "x"}, "token_budget"), ({"token_budget": 0}, "token_budget"), ({"token_budget": True}, "token_budget"),
    ({"speculative": "yes"}, "speculative"), ({"progress": "x"}, "progress"), ({"quantized": "no"}, "quantized"),
    ({"activations": None}, "activations"), ({"quant": 1}, "quant"), ({"max_len": -1}, "max_len"),
])
def test_llm_options_are_checked_naming_them(tiny_checkpoint: str, kw: dict, name: str) -> None:
    from dsv4rs import LLM

    with pytest.raises(ValueError, match=f"^{name}: "):
        LLM(tiny_checkpoint, device="cpu", **({"max_sequences": 2, "max_len": 64} | kw))


@pytest.mark.parametrize(("prompt", "error"), [
    ([1.7, 2], TypeError), ([True, 2], TypeError), ([None], TypeError), (["a"], TypeError), (torch.tensor([1.5]), TypeError),
    (torch.tensor([[1, 2]]), TypeError), (torch.tensor([True]), TypeError), (None, TypeError), (b"hi", TypeError),
    ([-1], ValueError), (torch.tensor([10**6]), ValueError),
])
def test_prompt_ids_are_ints_or_raise_naming_the_prompt(llm, prompt, error: type) -> None:
    """Token ids are ints (or a 1-d integer tensor): floats and bools are refused, not truncated,
    and nothing is queued."""
    for call in (lambda: llm.add_request(prompt, SamplingParams(max_tokens=1)),
                 lambda: llm.generate([PROMPTS[0], prompt], SamplingParams(max_tokens=1))):
        with pytest.raises(error, match="^prompt: "):
            call()
    with pytest.raises(TypeError, match="^prompts: "):
        llm.generate(None)
    assert llm.engine.manager.sequence_ids() == [] and not llm.has_unfinished()


def test_prompt_ids_as_a_tensor_or_array_equal_the_list(llm) -> None:
    ids = llm.encode(PROMPTS[1])
    want = llm.generate(ids, SamplingParams(max_tokens=3, temperature=0))[0].token_ids
    assert llm.generate(torch.tensor(ids), SamplingParams(max_tokens=3, temperature=0))[0].token_ids == want
    assert llm.encode(np.array(ids)) == ids == llm.encode(tuple(np.int64(t) for t in ids))


def test_llm_calls_name_their_arguments(llm) -> None:
    """Malformed calls raise naming the argument, and leave nothing queued."""
    msg = [{"role": "user", "content": "hi"}]
    for call, error, name in [
        (lambda: llm.add_request("hi", {"max_tokens": 3}), TypeError, "params"),
        (lambda: llm.generate(["hi"], 5), TypeError, "params"),
        (lambda: llm.generate(["hi", "yo"], [SamplingParams(), 3]), TypeError, "params"),
        (lambda: llm.abort("x"), TypeError, "rid"), (lambda: llm.abort(None), TypeError, "rid"),
        (lambda: llm.completion(999), ValueError, "rid"), (lambda: llm.completion(1.5), ValueError, "rid"),
        (lambda: llm.chat(None), TypeError, "conversations"), (lambda: llm.chat("hi"), TypeError, "conversations"),
        (lambda: llm.chat([{"role": "user", "content": 5}]), ValueError, "chat_template"),
        (lambda: llm.chat([[{"role": "user", "content": "hi"}], "hi"]), ValueError, "messages"),
        (lambda: llm.encode_chat(msg, add_generation_prompt="yes"), ValueError, "add_generation_prompt"),
        (lambda: list(llm.stream("hi", chat="x")), ValueError, "chat"),
        (lambda: llm.max_tokens(-1, SamplingParams()), ValueError, "prompt_tokens"),
        (lambda: llm.max_tokens(3, None), TypeError, "params"),
    ]:
        with pytest.raises(error, match=f"^{name}: "):
            call()
    assert not llm.has_unfinished() and llm.engine.manager.sequence_ids() == []
    llm.abort(12345)  # an id of no running request is ignored
    rid = llm.add_request("hi", SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match=f"^rid: request {rid} is not finished"):
        llm.completion(rid)
    llm.abort(rid)
    while llm.has_unfinished():
        llm.step()
    assert llm.completion(rid).finish_reason == "abort"


def test_tokenizer_checks_its_arguments(llm) -> None:
    tok = llm.tokenizer
    ids = tok.encode("hi", add_special_tokens=False)
    assert tok.decode(ids) == tok.decode(tuple(ids)) == tok.decode(torch.tensor(ids)) == "hi"
    for call, error, name in [(lambda: tok.encode(None), TypeError, "text"), (lambda: tok.encode(5), TypeError, "text"),
                              (lambda: tok.encode("hi", add_special_tokens="x"), ValueError, "add_special_tokens"),
                              (lambda: tok.decode([-1]), ValueError, "ids"), (lambda: tok.decode([2**70]), ValueError, "ids"),
                              (lambda: tok.decode([1.5]), TypeError, "ids"), (lambda: tok.decode(None), TypeError, "ids"),
                              (lambda: tok.decode("ab"), TypeError, "ids"),
                              (lambda: tok.decode(ids, skip_special_tokens=None), ValueError, "skip_special_tokens")]:
        with pytest.raises(error, match=f"^{name}: "):
            call()


@pytest.mark.parametrize(("field", "value"), [
    ("temperature", -1), ("top_p", 0.0), ("top_k", -2), ("min_p", 1.5), ("repetition_penalty", 0),
    ("presence_penalty", 3), ("max_tokens", 0), ("stop", ("",)), ("seed", -1), ("logprobs", 21),
    ("temperature", float("nan")), ("stop_token_ids", (-1,)), ("stop", 5), ("stop_token_ids", 5),
    ("stop_token_ids", "ab"),
])
def test_sampling_params_errors_name_the_field(field: str, value) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        SamplingParams(**{field: value})


def test_streaming_text_equals_the_whole_and_never_splits_a_character(llm) -> None:
    from dsv4rs.llm.text import Detokenizer

    ids = llm.tokenizer.encode("emoji: 🙂 🚀 ✨ 東京 and 北京, naïve café", add_special_tokens=False)
    assert any("\ufffd" in llm.tokenizer.decode([i]) for i in ids)  # some token is part of a character
    d = Detokenizer(llm.tokenizer)
    pieces = [d.push([i]) for i in ids] + [d.flush()]
    assert "".join(pieces) == llm.tokenizer.decode(ids) and not any("\ufffd" in p for p in pieces)
    params = SamplingParams(max_tokens=16, temperature=0.8, seed=3, ignore_eos=True, stop=("zz",))
    deltas = list(llm.stream(PROMPTS[2], params))
    whole = llm.generate(PROMPTS[2], params)[0]
    assert "".join(x.text for x in deltas) == whole.text and deltas[-1].finished
    assert [t for x in deltas for t in x.token_ids] == whole.token_ids
    # leaving the iteration early aborts the request and frees its sequence
    it = llm.stream(PROMPTS[2], params)
    next(it)
    it.close()
    assert llm.engine.manager.sequence_ids() == [] and not llm.has_unfinished()


def test_stop_strings_hold_back_what_may_become_one() -> None:
    from dsv4rs.llm.text import StopStrings

    s = StopStrings(["world", "lo!"])
    assert s.feed("Hel") == "He"  # "l" may begin "lo!"
    assert s.feed("lo w") == "llo "  # "w" may begin "world"
    assert s.feed("orl") == ""
    assert s.feed("d, and more") == "" and s.stopped and s.text == "Hello "
    t = StopStrings(["abc"])
    assert t.feed("xxab") == "xx" and t.feed("", final=True) == "ab" and not t.stopped


def test_chat_template_as_transformers_renders_it(llm, tiny_checkpoint: str) -> None:
    transformers = pytest.importorskip("transformers")
    from dsv4rs.llm.tokenizer import ChatTemplateError

    hf = transformers.AutoTokenizer.from_pretrained(tiny_checkpoint)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, world!"},
            {"role": "assistant", "content": "Café"}, {"role": "user", "content": "東京 🙂?"}]
    for gen in (True, False):
        for kw in ({}, {"thinking": True}):
            want = hf.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False, **kw)
            assert llm.tokenizer.apply_chat_template(conv, add_generation_prompt=gen, **kw) == want
    ids = hf.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert llm.encode_chat(conv) == list(ids)
    assert llm.encode(PROMPTS[2]) == hf(PROMPTS[2])["input_ids"]
    with pytest.raises(ChatTemplateError, match="unknown role: robot"):
        llm.encode_chat([{"role": "robot", "content": "hi"}])
    with pytest.raises(ChatTemplateError, match="system message must come first"):
        llm.encode_chat([{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}])
    out = llm.chat(conv[:2], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    assert out.prompt_token_ids == llm.encode_chat(conv[:2]) and len(out.token_ids) == 4


def test_penalties_and_min_p_run_through_the_scheduler(llm) -> None:
    """A strong repetition penalty changes a random model's repetitive greedy text; min_p = 1 is
    greedy."""
    plain = llm.generate(PROMPTS[0], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    assert len(set(plain.token_ids)) < 12  # the tiny model repeats itself
    pen = llm.generate(PROMPTS[0], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                  repetition_penalty=3.0, presence_penalty=2.0))[0]
    assert pen.token_ids != plain.token_ids and len(set(pen.token_ids)) > len(set(plain.token_ids))
    minp = llm.generate(PROMPTS[0], SamplingParams(max_tokens=12, temperature=1.5, min_p=1.0, seed=4,
                                                   ignore_eos=True))[0]
    assert minp.token_ids == plain.token_ids


def test_generate_command(tiny_checkpoint: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as one_torch_thread
    out = subprocess.run([sys.executable, "-m", "dsv4rs.cli", "generate", tiny_checkpoint, "--prompt", "Hello",
                          "--chat", "--max-tokens", "8", "--max-len", "128", "--device", "cpu"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "tokens/s" in out.stdout and "time to first token" in out.stdout
    assert "acceptance rate" in out.stdout and "B/token" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "dsv4rs.cli", "generate", tiny_checkpoint, "--prompt", "Hello",
                          "--max-tokens", "500", "--max-len", "128", "--device", "cpu"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode == 2 and "exceed the context of 128 tokens" in bad.stderr


def test_generate_command_over_processes(tiny_checkpoint: str) -> None:
    """``dsv4rs generate --world 2`` spawns two CPU processes (gloo), each holding half the
    experts: rank 0 streams the text one process prints (greedy), then the timings."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    texts = []
    for world in ("1", "2"):
        out = subprocess.run([sys.executable, "-m", "dsv4rs.cli", "generate", tiny_checkpoint, "--prompt", "Hello",
                              "--max-tokens", "12", "--max-len", "128", "--device", "cpu", "--no-speculative",
                              "--world", world], capture_output=True, text=True, timeout=300, env=env)
        assert out.returncode == 0, out.stdout + out.stderr
        lines = out.stdout.splitlines()
        report = next(i for i, line in enumerate(lines) if line.startswith("-- "))
        texts.append("\n".join(lines[:report]))
        assert "tokens/s" in out.stdout and "B/token" in out.stdout
        if world == "2":
            assert "-- over 2 processes (dp; rank 0's share: experts 0..3)" in out.stdout
    assert texts[0] == texts[1] and texts[0].strip()


def test_llm_runs_the_checkpoint_as_stored_or_dequantized(tiny_checkpoint: str) -> None:
    """The tiny checkpoint is in DeepSeek's layout (FP8 linears, MXFP4 experts): LLM keeps them as
    stored by default, dequantizes them with quantized=False, and sets the activation rounding."""
    from dsv4rs import LLM
    from dsv4rs.model.layers.moe import Experts
    from dsv4rs.model.layers.quant import QuantLinear

    def quantized_layers(llm) -> list:
        return [m for m in llm.engine.model.modules()
                if isinstance(m, QuantLinear) or (isinstance(m, Experts) and m.quantized)]

    stored = LLM(tiny_checkpoint, max_sequences=2, max_len=64, speculative=False, activations="bf16")
    assert quantized_layers(stored) and {m.act for m in quantized_layers(stored)} == {"bf16"}
    dense = LLM(tiny_checkpoint, max_sequences=2, max_len=64, speculative=False, quantized=False)
    assert not quantized_layers(dense)
    # seeded and past the end-of-sequence token: lengths that do not depend on a random draw
    params = SamplingParams(max_tokens=4, seed=0, ignore_eos=True)
    assert len(stored.generate(["Hello"], params)[0].token_ids) == 4
    assert len(dense.generate(["Hello"], params)[0].token_ids) == 4
    with pytest.raises(ValueError, match="activations"):
        LLM(tiny_checkpoint, activations="int8")
    exact = LLM(tiny_checkpoint, max_sequences=2, max_len=64, speculative=False, rope_table="exact")
    assert {m.table for m in exact.engine.model.modules() if hasattr(m, "table")} == {"exact"}
    assert len(exact.generate(["Hello"], params)[0].token_ids) == 4
    with pytest.raises(ValueError, match="rope_table"):
        LLM(tiny_checkpoint, rope_table="float32")
