"""The OpenAI-compatible HTTP API on FastAPI: ``/v1/completions``, ``/v1/chat/completions`` (both
with ``stream=true`` as server-sent events), ``/v1/models`` and ``/health``.

Errors come as OpenAI's ``{"error": {"message", "type", "param", "code"}}``: 422 for a body that
does not parse or validate, 400 for a request the model cannot serve (the prompt and
``max_tokens`` exceed the context, a bad sampling value, a chat template error), 404 for another
model name, 429 when the request queue is full, 503 while shutting down. A client that
disconnects has its request aborted (its sequence released) at the next step.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from dsv4rs.llm.outputs import Delta
from dsv4rs.serve import format as fmt
from dsv4rs.serve.protocol import ChatRequest, CompletionRequest
from dsv4rs.serve.worker import EngineWorker, Handle, Overloaded, ShuttingDown


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def _error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


def create_app(llm, model_name: str | None = None, max_pending: int = 64, shutdown_grace: float = 30.0) -> FastAPI:
    """The app serving ``llm`` (a :class:`dsv4rs.LLM`, owned by the app's engine thread from
    startup to shutdown). ``max_pending``: requests in flight before 429; ``shutdown_grace``:
    seconds running requests get to finish at shutdown before they are aborted."""
    name = model_name or llm.model_name
    worker = EngineWorker(llm, max_pending)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        await asyncio.to_thread(worker.shutdown, shutdown_grace)

    app = FastAPI(title="dsv4rs", lifespan=lifespan)
    app.state.worker, app.state.llm = worker, llm

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {}
        param = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
        return _error(422, f"{param or 'body'}: {first.get('msg', 'invalid request')}", "invalid_request_error", param)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.kind, exc.param)

    @app.get("/health")
    async def health() -> JSONResponse:
        if worker.error is not None or not worker._thread.is_alive():
            return _error(503, "the engine is not running", "server_error")
        return JSONResponse({"status": "ok", "in_flight": worker.in_flight})

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "dsv4rs",
                                            "max_model_len": llm.max_len}]}

    def admit(body, ids_of, max_tokens: int | None, logprobs: int | None) -> Handle:
        if body.model is not None and body.model != name:
            raise APIError(404, f"model: {body.model!r} is not served here (this server serves {name!r})",
                           "not_found_error", "model")
        try:
            ids = ids_of()
            params = body.params(max_tokens, logprobs)
            llm.max_tokens(len(ids), params)
        except ValueError as e:
            raise APIError(400, str(e), param=str(e).split(":", 1)[0]) from None
        try:
            return worker.submit(ids, params)
        except Overloaded as e:
            raise APIError(429, str(e), "rate_limit_error") from None
        except ShuttingDown as e:
            raise APIError(503, str(e), "server_error") from None

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        h = admit(body, lambda: llm.encode(body.prompt_input()), body.max_tokens, body.logprobs)
        return await respond(h, request, body, fmt.CompletionFormat(name, llm.tokenizer))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        kwargs = body.chat_template_kwargs or {}
        taken = sorted({"messages", "add_generation_prompt", "tokenize"} & set(kwargs))
        if taken:
            raise APIError(400, f"chat_template_kwargs: {', '.join(taken)} may not be set here (the request's own "
                           "fields set them)", param="chat_template_kwargs")
        h = admit(body, lambda: llm.encode_chat([m.as_dict() for m in body.messages], body.add_generation_prompt,
                                                **kwargs),
                  body.max_completion_tokens or body.max_tokens, body.logprobs_n())
        return await respond(h, request, body, fmt.ChatFormat(name, llm.tokenizer))

    async def respond(h: Handle, request: Request, body, form):
        usage = fmt.Usage(len(h.ids))
        if body.stream:
            return StreamingResponse(events(h, form, usage, body.include_usage), media_type="text/event-stream")
        deltas = await collect(h, request)
        for d in deltas:
            usage.add(d)
        return JSONResponse(form.whole(deltas, usage))

    async def events(h: Handle, form, usage, include_usage: bool) -> AsyncIterator[str]:
        try:
            first = form.first_chunk()
            if first is not None:
                yield _sse(first)
            while True:
                item = await h.queue.get()
                if isinstance(item, BaseException):
                    yield _sse({"error": {"message": str(item), "type": "server_error", "code": 500}})
                    break
                usage.add(item)
                if item.text or item.finished or item.logprobs:  # (tokens of a character still incomplete)
                    yield _sse(form.chunk(item))
                if item.finished:
                    break
            if include_usage:
                yield _sse(form.usage_chunk(usage))
            yield "data: [DONE]\n\n"
        finally:  # the client went away (the task is cancelled) or the stream ended
            worker.cancel(h)
            worker.release(h)

    async def collect(h: Handle, request: Request) -> list[Delta]:
        deltas: list[Delta] = []
        try:
            while True:
                get = asyncio.ensure_future(h.queue.get())
                while not get.done():
                    await asyncio.wait({get}, timeout=0.25)
                    if not get.done() and await request.is_disconnected():
                        get.cancel()
                        raise APIError(499, "the client closed the request")
                item = get.result()
                if isinstance(item, ValueError):
                    raise APIError(400, str(item))
                if isinstance(item, BaseException):
                    raise APIError(500, str(item), "server_error")
                deltas.append(item)
                if item.finished:
                    return deltas
        finally:
            worker.cancel(h)
            worker.release(h)

    return app


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
