"""The OpenAI-compatible server (dsv4rs.serve) on a free local port, driven by real HTTP clients
(the openai client and httpx): completions, chat, streaming, concurrency, errors (422, 400, 404,
429), a client disconnecting mid-stream, graceful shutdown. Every test ends with the cache empty."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

MAX_LEN = 256

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn running create_app(llm) in a thread of the test process."""

    def __init__(self, llm, **kwargs) -> None:
        import uvicorn

        from dsv4rs.serve import create_app

        self.llm, self.port = llm, free_port()
        self.app = create_app(llm, model_name="tiny", **kwargs)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                timeout_graceful_shutdown=30)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"
        self.worker = self.app.state.worker

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        assert not self.thread.is_alive()

    def idle(self, timeout: float = 60) -> None:
        """Waits until no request is in flight, then checks the cache holds no sequence (the
        engine thread is then blocked on its empty inbox)."""
        deadline = time.monotonic() + timeout
        while self.worker.in_flight or self.worker.active:
            assert time.monotonic() < deadline, f"{self.worker.in_flight} requests still in flight"
            time.sleep(0.02)
        assert self.llm.engine.manager.sequence_ids() == []
        assert sum(self.llm.engine.manager.used_pages().values()) == 0


@pytest.fixture(scope="module")
def server(tiny_checkpoint: str):
    from dsv4rs import LLM

    llm = LLM(tiny_checkpoint, max_sequences=8, max_len=MAX_LEN)
    s = Server(llm, max_pending=3)
    yield s
    s.stop()


def client(server: Server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def test_models_health_completions_and_chat(server: Server) -> None:
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    out = c.completions.create(model="tiny", prompt="Hello, world!", max_tokens=8, temperature=0, logprobs=2,
                               extra_body={"ignore_eos": True})
    ch = out.choices[0]
    assert ch.finish_reason == "length" and out.usage.completion_tokens == 8
    assert len(ch.logprobs.tokens) == 8 and all(len(t) == 2 for t in ch.logprobs.top_logprobs)
    stream = c.completions.create(model="tiny", prompt="Hello, world!", max_tokens=8, temperature=0, stream=True,
                                  extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert "".join(x.choices[0].text for x in chunks) == ch.text and chunks[-1].choices[0].finish_reason == "length"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Café? 🙂"}]
    chat = c.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0, seed=3,
                                     extra_body={"ignore_eos": True})
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 6
    assert chat.usage.prompt_tokens == len(server.llm.tokenizer.apply_chat_template(messages, tokenize=True))
    parts = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0, seed=3,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True}))
    assert parts[0].choices[0].delta.role == "assistant" and parts[-1].usage.completion_tokens == 6
    text = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
    assert text == chat.choices[0].message.content
    server.idle()


def test_concurrent_requests_get_their_own_text(server: Server) -> None:
    """Three requests at once (continuous batching) each get what they get alone."""
    prompts = ["The quick brown fox", "Hello, world! How are you", "東京 and 北京"]
    c = client(server)

    def run(p: str) -> str:
        return c.completions.create(model="tiny", prompt=p, max_tokens=10, temperature=0,
                                    extra_body={"ignore_eos": True}).choices[0].text

    alone = [run(p) for p in prompts]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(run, prompts))
    assert together == alone
    server.idle()


@pytest.mark.parametrize(("body", "status", "needle"), [
    ({"prompt": 5}, 422, "prompt"),
    ({"prompt": "hi", "temperature": -1}, 422, "temperature"),
    ({"prompt": "hi", "max_tokens": 0}, 422, "max_tokens"),
    ({"prompt": "hi", "n": 2}, 422, "n"),
    ({}, 422, "prompt"),
    ({"prompt": list(range(300))}, 400, "context of 256 tokens"),
    ({"prompt": "hi", "max_tokens": 300}, 400, "exceed the context of 256 tokens"),
    ({"prompt": [1, 10**6]}, 400, "token id"),
    ({"prompt": "hi", "model": "gpt-4"}, 404, "not served here"),
])
def test_bad_requests_are_refused_clearly(server: Server, body: dict, status: int, needle: str) -> None:
    r = httpx.post(server.url + "/v1/completions", json=body)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]
    bad = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 422
    chat = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]})
    assert chat.status_code == 400 and "unknown role" in chat.json()["error"]["message"]
    server.idle()


# Values the random requests put in their fields: out-of-range, huge, tiny, wrongly typed.
WILD = [0, -1, 1, 2**31, 2**63, 2**64, 10**30, -(10**30), 1e308, -1e308, 1e-300, 0.5, True, False, None, "x", "", [],
        {}, [1], ["a"], {"a": 1}]
SAMPLING = {"max_tokens": 3, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "presence_penalty": 0.0,
            "frequency_penalty": 0.0, "repetition_penalty": 1.0, "stop": None, "stop_token_ids": None, "ignore_eos": True,
            "seed": 1, "n": 1, "stream": False, "stream_options": None, "logprobs": None, "model": None}


def test_no_request_takes_the_server_down(server: Server) -> None:
    """Seeded random requests, each with one to three fields set to a wild value (a top_k of
    2^64 once failed the engine thread in its sampling step, and with it every request after):
    each is answered (200, or a 4xx naming what is wrong; never a 500), and the server stays
    healthy."""
    import random

    r = random.Random(7)
    # First the requests that found defects (a 500, or the engine thread failed), then random ones.
    found = [(False, {"top_k": 2**64}), (False, {"top_k": 10**30, "temperature": 1e308}),
             (True, {"chat_template_kwargs": {"tokenize": True}}), (True, {"chat_template_kwargs": {"messages": 5}}),
             (True, {"chat_template_kwargs": {"add_generation_prompt": None}}),
             (True, {"messages": [{"role": "user", "content": 5}]})]
    with httpx.Client(timeout=120) as http:
        for i in range(120):
            chat = found[i][0] if i < len(found) else r.random() < 0.5
            body = {k: v for k, v in SAMPLING.items() if v is not None}
            if chat:
                body["messages"] = [{"role": "user", "content": "hi there"}]
                fields = [*SAMPLING, "messages", "max_completion_tokens", "top_logprobs", "chat_template_kwargs"]
            else:
                body["prompt"] = r.choice(["hello", [1, 2, 3], ["hello"]])
                fields = [*SAMPLING, "prompt", "echo"]
            for _ in range(r.randint(1, 3)) if i >= len(found) else ():
                key, value = r.choice(fields), r.choice(WILD)
                if key == "chat_template_kwargs" and r.random() < 0.6:
                    value = {r.choice(["tokenize", "messages", "add_generation_prompt", "tools", "x"]): r.choice(WILD)}
                elif key == "messages" and r.random() < 0.5:
                    value = [{"role": r.choice([*WILD, "user"]), "content": r.choice([*WILD, "x"])}]
                body[key] = value
            if i < len(found):
                body.update(found[i][1])
            url = server.url + ("/v1/chat/completions" if chat else "/v1/completions")
            resp = http.post(url, content=json.dumps(body), headers={"content-type": "application/json"})
            what = f"request {i}: {json.dumps(body)[:300]} -> {resp.status_code} {resp.text[:200]}"
            assert resp.status_code in (200, 400, 404, 422), what
            if resp.status_code != 200:
                assert resp.json()["error"]["message"], what
            assert http.get(server.url + "/health").status_code == 200, what
    server.idle()


def _open_stream(server: Server, stack: contextlib.ExitStack, max_tokens: int = 200):
    """A long streaming completion, its first event read; returns the line iterator."""
    http = stack.enter_context(httpx.Client(timeout=120))
    resp = stack.enter_context(http.stream("POST", server.url + "/v1/completions", json={
        "prompt": "The quick brown fox", "max_tokens": max_tokens, "temperature": 0, "stream": True,
        "ignore_eos": True}))
    assert resp.status_code == 200
    lines = resp.iter_lines()
    first = next(line for line in lines if line.startswith("data: "))
    assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
    return lines


def test_queue_full_and_disconnect_mid_stream(server: Server, monkeypatch) -> None:
    """max_pending = 3: with three streams open a fourth request gets 429. Two clients then
    disconnect mid-stream: their requests are aborted (sequences released) while the third stream
    and new requests go on. (Steps are slowed to 20 ms, so the streams are still running.)"""
    step = server.llm.step

    def slow_step():
        time.sleep(0.02)
        return step()

    monkeypatch.setattr(server.llm, "step", slow_step)
    with contextlib.ExitStack() as keep, contextlib.ExitStack() as drop:
        a = _open_stream(server, drop, max_tokens=240)
        b = _open_stream(server, drop, max_tokens=240)  # (an iterator dropped would close its stream)
        c = _open_stream(server, keep, max_tokens=60)
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 429 and "queue is full" in r.json()["error"]["message"]
        next(a), next(b)
        drop.close()  # two clients go away mid-stream
        deadline = time.monotonic() + 60
        while server.worker.in_flight > 1 or server.worker.active > 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        ok = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3, "ignore_eos": True},
                        timeout=120)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
        rest = [json.loads(x[6:]) for x in c if x.startswith("data: {")]
        assert rest[-1]["choices"][0]["finish_reason"] == "length"
    aborted = [x for x in server.worker.finished if x.finish_reason == "abort"]
    assert len(aborted) == 2 and all(len(x.token_ids) < 240 for x in aborted)
    server.idle()


def test_graceful_shutdown_finishes_running_requests(tiny_checkpoint: str) -> None:
    """At shutdown a running stream finishes (uvicorn waits for it), new connections are refused,
    and the engine thread stops with every sequence released."""
    from dsv4rs import LLM

    llm = LLM(tiny_checkpoint, max_sequences=4, max_len=MAX_LEN)
    s = Server(llm, max_pending=4, shutdown_grace=30)
    with contextlib.ExitStack() as stack:
        lines = _open_stream(s, stack, max_tokens=40)
        stopper = threading.Thread(target=s.stop)
        stopper.start()
        events = [x for x in lines if x.startswith("data: ")]
        stopper.join(60)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"
    with pytest.raises(httpx.ConnectError):
        httpx.get(s.url + "/health")
    assert not s.worker._thread.is_alive() and llm.engine.manager.sequence_ids() == []
    llm.engine.manager.check()


def test_serve_command_over_processes(tiny_checkpoint: str) -> None:
    """``dsv4rs serve --world 2``: two CPU processes (gloo), rank 0 serving over HTTP
    (serve/parallel.py's Leader), rank 1 following; completions and chat give one process's greedy
    text, and Ctrl-C (SIGINT to the process group)
    shuts every process down cleanly (exit status 0)."""
    import os
    import signal
    import subprocess
    import sys

    from dsv4rs import LLM
    from dsv4rs.llm import SamplingParams

    greedy = SamplingParams(max_tokens=8, temperature=0)
    one = LLM(tiny_checkpoint, max_sequences=4, max_len=MAX_LEN, speculative=False)
    want = [c.text for c in one.generate(["Hello", "The quick brown fox"], greedy)]
    want_chat = one.chat([{"role": "user", "content": "Hi"}], greedy)[0].text
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dsv4rs.cli", "serve", tiny_checkpoint, "--world", "2", "--device",
                             "cpu", "--port", str(port), "--max-len", str(MAX_LEN), "--max-sequences", "4",
                             "--no-speculative"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health").status_code == 200:
                    break
            time.sleep(0.2)
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        name = c.models.list().data[0].id
        with ThreadPoolExecutor(2) as pool:  # two requests at once
            got = list(pool.map(lambda p: c.completions.create(model=name, prompt=p, max_tokens=8, temperature=0),
                                ["Hello", "The quick brown fox"]))
        assert [r.choices[0].text for r in got] == want
        chat = c.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                         temperature=0)
        assert chat.choices[0].message.content == want_chat
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            pytest.fail("the processes did not stop on SIGINT:\n" + out)
    assert proc.returncode == 0, out
