"""The OpenAI-compatible HTTP layer of `jaxllm serve` (FastAPI on uvicorn).

Routes: `GET /health`, `GET /v1/models`, `POST /v1/completions`,
`POST /v1/chat/completions`, each answering in the OpenAI API's JSON, with
`stream: true` as server-sent events. A bad request gets the OpenAI error
JSON (`{"error": {"message", "type", "param", "code"}}`) with its status: 400
for malformed JSON or a bad field, 401 for a missing or wrong API key, 404
for an unknown model or route. The requests themselves run in a `Scheduler`
on one background thread; a client that goes away cancels its request, which
frees its slot.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from jaxllm.serve.scheduler import Request, Scheduler

MAX_STOP_STRINGS = 4  # as the OpenAI API allows
DEFAULT_COMPLETION_TOKENS = 16  # the OpenAI completions default


class APIError(Exception):
    """A request the server refuses, as the OpenAI API words it."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status, message, param, code, type)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


@dataclass
class ServedModel:
    """What the routes need: the scheduler, the tokenizer and how chat
    messages become a prompt (`style`: "template" for the tokenizer's chat
    template, else a jaxllm prompt format such as "alpaca")."""

    name: str
    scheduler: Scheduler
    tokenizer: Any
    style: str
    created: int = 0

    @property
    def context_length(self) -> int:
        return self.scheduler.engine.config.context_length

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """The prompt ids of chat messages."""
        if self.style == "template":
            return self.tokenizer.encode_chat(messages)
        from jaxllm.finetune.instruct import format_prompt

        roles = [m["role"] for m in messages]
        if roles != ["user"]:
            raise APIError(400, f"this model's prompt format ({self.style}) takes a single user "
                                f"message, as it was fine-tuned on; got the roles {roles} (a "
                                f"model with a chat template takes whole conversations)",
                           param="messages")
        return self.tokenizer.encode(
            format_prompt({"instruction": messages[0]["content"], "input": ""}, self.style))


# -- reading a request ---------------------------------------------------------
def _number(body: dict, name: str, default, low: float, high: float):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise APIError(400, f"{name} must be a number from {low:g} to {high:g}, got {value!r}",
                       param=name)
    return float(value)


def _integer(body: dict, name: str, low: int | None = None):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        raise APIError(400, f"{name} must be an integer{f' >= {low}' if low is not None else ''}"
                            f", got {value!r}", param=name)
    return value


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or not all(isinstance(s, str) for s in stops)
            or len(stops) > MAX_STOP_STRINGS):
        raise APIError(400, f"stop must be a string or a list of up to {MAX_STOP_STRINGS} "
                            f"strings, got {stop!r}", param="stop")
    return [s for s in stops if s]


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {role, content} objects",
                       param="messages")
    out = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported",
                               param="messages")
            content = "".join(p.get("text", "") for p in content)
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                or not isinstance(content, str):
            raise APIError(400, f"messages[{i}] must be an object with a string role and "
                                f"content, got {m!r}", param="messages")
        out.append({"role": m["role"], "content": content})
    return out


def _prompt(model: ServedModel, body: dict) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return model.tokenizer.encode_prompt(prompt)
    vocab = model.scheduler.engine.config.vocab_size
    if (isinstance(prompt, list) and prompt and all(isinstance(t, int)
                                                    and not isinstance(t, bool) for t in prompt)):
        if not all(0 <= t < vocab for t in prompt):
            raise APIError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
        return prompt
    raise APIError(400, "prompt must be a string, a list of one string, or a list of token ids "
                        "(one prompt per request)", param="prompt")


def read_request(model: ServedModel, body: Any, chat: bool) -> tuple[Request, bool, bool]:
    """(the scheduler's request, stream?, include usage in the stream?) from
    a request body, every field checked."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    name = body.get("model")
    if not isinstance(name, str):
        raise APIError(400, "model is required: a model name from GET /v1/models",
                       param="model")
    if name != model.name:
        raise APIError(404, f"the model {name!r} does not exist; this server serves "
                            f"{model.name!r}", param="model", code="model_not_found")
    if body.get("n", 1) != 1:
        raise APIError(400, f"n must be 1 (one choice per request), got {body.get('n')!r}",
                       param="n")
    for unsupported in (("echo", "logprobs", "best_of", "suffix") if not chat
                        else ("logprobs", "tools", "functions")):
        if body.get(unsupported) not in (None, False, 1 if unsupported == "best_of" else None):
            raise APIError(400, f"{unsupported} is not supported by jaxllm serve",
                           param=unsupported)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, f"stream must be true or false, got {stream!r}", param="stream")
    options = body.get("stream_options") or {}
    usage = bool(isinstance(options, dict) and options.get("include_usage"))
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise APIError(400, "top_p must be greater than 0", param="top_p")
    seed = _integer(body, "seed")
    seed = secrets.randbits(31) if seed is None else seed % 2 ** 32
    limit_name = "max_completion_tokens" if chat and "max_completion_tokens" in body \
        else "max_tokens"
    max_tokens = _integer(body, limit_name, 1)
    stop = _stops(body)
    prompt = model.chat_prompt(_messages(body)) if chat else _prompt(model, body)
    ctx = model.context_length
    if len(prompt) > ctx:
        raise APIError(400, f"the prompt has {len(prompt)} tokens, more than the model's "
                            f"context length of {ctx}", param="messages" if chat else "prompt",
                       code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = ctx - len(prompt) if chat else min(DEFAULT_COMPLETION_TOKENS,
                                                        ctx - len(prompt))
        if max_tokens < 1:
            raise APIError(400, f"the prompt has {len(prompt)} tokens and fills the context "
                                f"length of {ctx}: no room for an answer",
                           param="messages" if chat else "prompt",
                           code="context_length_exceeded")
    elif len(prompt) + max_tokens > ctx:
        raise APIError(400, f"{limit_name} {max_tokens} with a prompt of {len(prompt)} tokens "
                            f"goes past the model's context length of {ctx}: ask for at most "
                            f"{ctx - len(prompt)}", param=limit_name,
                       code="context_length_exceeded")
    return (Request(prompt, max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                    stop=stop), stream, usage)


# -- the app -------------------------------------------------------------------
def create_app(model: ServedModel, *, api_key: str | None = None):
    """The FastAPI app serving `model` (its scheduler already running)."""
    app = FastAPI(title="jaxllm serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(_, err: APIError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def http_error(_, err: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return JSONResponse(APIError(err.status_code, str(err.detail), code=code).body(),
                            status_code=err.status_code)

    @app.middleware("http")
    async def check_key(request: HTTPRequest, call_next):
        if api_key is not None and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                err = APIError(401, "a valid API key is required: send the header "
                                    "'Authorization: Bearer KEY' (jaxllm serve --api-key)",
                               code="invalid_api_key")
                return JSONResponse(err.body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        s = model.scheduler
        return {"status": "ok", "model": model.name, "slots": s.engine.slots,
                "busy": s.busy, "waiting": len(s.waiting), "finished": dict(s.finished)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model.name, "object": "model",
                                            "created": model.created, "owned_by": "jaxllm"}]}

    async def body_of(request: HTTPRequest):
        raw = await request.body()
        try:
            return json.loads(raw)
        except ValueError as err:
            raise APIError(400, f"the request body is not valid JSON: {err}") from None

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await answer(request, await body_of(request), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        return await answer(request, await body_of(request), chat=True)

    async def answer(request: HTTPRequest, body, chat: bool):
        req, stream, include_usage = read_request(model, body, chat)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        req.listener = lambda delta, reason: loop.call_soon_threadsafe(
            queue.put_nowait, (delta, reason))
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        try:
            model.scheduler.submit(req)
        except ValueError as err:  # read_request checked; kept for safety
            raise APIError(400, str(err), code="context_length_exceeded") from None

        def failed() -> APIError:
            return APIError(500, f"the model failed while answering: {model.scheduler.error}",
                            type="server_error")

        def usage():
            return {"prompt_tokens": len(req.prompt), "completion_tokens": req.drawn,
                    "total_tokens": len(req.prompt) + req.drawn}

        def choice(text: str | None, reason: str | None, first: bool = False) -> dict:
            if not chat:
                return {"index": 0, "text": text or "", "logprobs": None,
                        "finish_reason": reason}
            if not stream:
                return {"index": 0, "message": {"role": "assistant", "content": text},
                        "logprobs": None, "finish_reason": reason}
            delta = {"role": "assistant", "content": ""} if first else \
                ({"content": text} if text else {})
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}

        def chunk(choices, with_usage=None) -> str:
            data = {"id": ident, "object": "chat.completion.chunk" if chat
                    else "text_completion", "created": created, "model": model.name,
                    "choices": choices}
            if include_usage:
                data["usage"] = with_usage
            return f"data: {json.dumps(data)}\n\n"

        if stream:
            async def events():
                try:
                    if chat:
                        yield chunk([choice(None, None, first=True)])
                    while True:
                        delta, reason = await queue.get()
                        if delta:
                            yield chunk([choice(delta, None)])
                        if reason == "error":
                            yield f"data: {json.dumps(failed().body())}\n\n"
                            return
                        if reason is not None:
                            yield chunk([choice(None, reason)])
                            if include_usage:
                                yield chunk([], usage())
                            yield "data: [DONE]\n\n"
                            return
                finally:
                    if not req.done.is_set():  # the client went away
                        model.scheduler.cancel(req)

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})

        try:
            while not req.done.is_set():
                try:
                    await asyncio.wait_for(queue.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        model.scheduler.cancel(req)
                        return JSONResponse({}, status_code=499)
        finally:
            if not req.done.is_set():
                model.scheduler.cancel(req)
        if req.finish_reason == "error":
            raise failed()
        return {"id": ident, "object": "chat.completion" if chat else "text_completion",
                "created": created, "model": model.name,
                "choices": [choice(req.text, req.finish_reason)], "usage": usage()}

    return app


def start_scheduler(scheduler: Scheduler) -> threading.Thread:
    """Run the scheduler's loop on a daemon thread."""
    thread = threading.Thread(target=scheduler.run, name="jaxllm-scheduler", daemon=True)
    thread.start()
    return thread
