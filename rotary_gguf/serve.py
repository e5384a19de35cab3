"""`rotary-gguf serve`: an OpenAI-compatible HTTP API over one engine.

Requests are checked and tokenized on the event loop's side, then wait in a bounded queue for the
one worker thread that owns the engine. Tokens flow back to each request's coroutine as they are
generated; a client that goes away sets its job's cancel flag, which the engine checks between
tokens. Figures come from the engine's `LiveStats` (see /metrics), never measured here.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import queue
import re
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from . import log
from .engine import Engine, GenerationStats, PromptError, SamplingParams
from .errors import UserError
from .stats import Snapshot

RETRY_AFTER_SECONDS = 1
# A connection must deliver a request's headers this soon after it opens (or after the request
# starts), and then its body as soon again; idle keep-alive connections close after
# IDLE_TIMEOUT_SECONDS. Half-open connections (a slow or stalled client) cannot pile up.
READ_TIMEOUT_SECONDS = 10.0
IDLE_TIMEOUT_SECONDS = 5
MAX_STOP_STRINGS = 4
MAX_STOP_LENGTH = 1000  # characters per stop string


# --- errors ----------------------------------------------------------------------------------------
class ApiError(Exception):
    """An error answered with an OpenAI-style body: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def unsupported(param: str, why: str) -> ApiError:
    return ApiError(400, f"{param}: {why}", param=param, code="unsupported_value")


def _validation_error(exc: RequestValidationError) -> ApiError:
    errors = exc.errors()
    if errors[0].get("type") == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON ({errors[0].get('ctx', {}).get('error', 'decode error')})")
    # Of the errors about the first bad field, the most specific one (a union reports each member).
    paths = [_field_path(e.get("loc", ())) for e in errors]
    field_errors = [(path, e) for path, e in zip(paths, errors) if path[:1] == paths[0][:1]]
    path, error = max(field_errors, key=lambda pe: len(pe[0]))
    param = ".".join(path) or None
    return ApiError(400, f"{param or 'request body'}: {error['msg']}", param=param)


_UNION_MEMBER = re.compile(r"^(str|int|float|bool|dict|list|none)$|[\[\]-]")


def _field_path(loc) -> list[str]:
    """A pydantic error location as field names and indexes, without 'body' and union member tags."""
    return [str(p) for p in loc[1:] if isinstance(p, int) or not _UNION_MEMBER.search(p)]


# --- request bodies --------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    include_usage: bool = False


class _Body(BaseModel):
    # Unknown fields are ignored (clients send many optional ones); known but unsupported ones are
    # refused by `refuse_unsupported` when they ask for something this server does not do.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, le=2**31 - 1)
    min_p: float = Field(0.0, ge=0, le=1)
    repeat_penalty: float = Field(1.0, gt=0, le=10)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    logprobs: bool | int | None = None
    logit_bias: dict[str, float] | None = None

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            repeat_penalty=self.repeat_penalty, frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty, seed=self.seed,
        )

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        if len(stops) > MAX_STOP_STRINGS:
            raise ApiError(400, f"stop: at most {MAX_STOP_STRINGS} stop strings", param="stop")
        if any(len(s) > MAX_STOP_LENGTH for s in stops):
            raise ApiError(400, f"stop: a stop string has at most {MAX_STOP_LENGTH} characters", param="stop")
        return stops

    def refuse_unsupported(self) -> None:
        if self.n != 1:
            raise unsupported("n", "only n=1 is supported (one choice per request)")
        if self.logprobs:
            raise unsupported("logprobs", "log probabilities are not supported")
        if self.logit_bias:
            raise unsupported("logit_bias", "logit_bias is not supported")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def for_template(self) -> dict:
        """The message as chat templates expect it: a role and one string of content."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or ())
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    top_logprobs: int | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools or self.tool_choice not in (None, "none", "auto"):
            raise unsupported("tools", "tool calls are not supported")
        if self.top_logprobs:
            raise unsupported("top_logprobs", "log probabilities are not supported")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise unsupported("response_format", "only the 'text' response format is supported")

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Body):
    prompt: str | list[str] | list[int]
    max_tokens: int = Field(16, ge=1)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise unsupported("echo", "echo is not supported")
        if self.suffix:
            raise unsupported("suffix", "suffix (fill-in-the-middle) is not supported")
        if self.best_of not in (None, 1):
            raise unsupported("best_of", "only best_of=1 is supported")
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) and len(self.prompt) != 1:
            raise unsupported("prompt", "send one prompt per request")


# --- the worker: one thread owns the engine --------------------------------------------------------
@dataclass
class Job:
    """One generation request: what to generate, and where its output goes."""

    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    output: asyncio.Queue = field(default_factory=asyncio.Queue)  # str pieces, then stats or an exception
    cancel: threading.Event = field(default_factory=threading.Event)
    stats: GenerationStats | None = None

    def send(self, item) -> None:
        """Hand `item` to the request's coroutine (called from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.output.put_nowait, item)
        except RuntimeError:  # the event loop is gone: the server is shutting down
            self.cancel.set()

    async def pieces(self) -> AsyncIterator[str]:
        """The generated text as it comes; afterwards `stats` holds the request's figures. A reader
        that fell behind gets what has piled up as one piece (fewer, larger writes)."""
        try:
            while True:
                items = [await self.output.get()]
                while not self.output.empty():
                    items.append(self.output.get_nowait())
                if text := "".join(item for item in items if isinstance(item, str)):
                    yield text
                end = items[-1]  # the worker's last item is the stats or an exception
                if isinstance(end, GenerationStats):
                    self.stats = end
                    return
                if isinstance(end, BaseException):
                    raise end
        finally:
            self.cancel.set()  # a no-op after the end; stops the generation if the reader went away

    async def text(self) -> str:
        return "".join([piece async for piece in self.pieces()])


class ShuttingDown(Exception):
    """The server stopped before this request's generation could finish."""


class Worker:
    """Runs generations one at a time, in arrival order, from a queue of at most `max_queue`."""

    def __init__(self, engine: Engine, max_queue: int):
        self.engine = engine
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._current: Job | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rotary-gguf-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        if self._stopping.is_set():
            raise ApiError(503, "the server is shutting down", type="server_error")
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            self.engine.live.request_rejected()
            raise ApiError(
                503, f"the server is busy: {self._jobs.maxsize} requests are already waiting; retry shortly",
                type="server_error", code="queue_full", headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            ) from None
        self.engine.live.set_queue_length(self._jobs.qsize())

    def cancel_all(self) -> None:
        """Stop accepting work, end the running generation after its current token, drop the queue."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if (job := self._current) is not None:
            job.cancel.set()
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.send(ShuttingDown("the server is shutting down"))
        self._jobs.put(None)  # wakes the thread, which then exits

    def close(self) -> None:
        """cancel_all, then wait for the thread (the engine is free afterwards)."""
        self.cancel_all()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            self.engine.live.set_queue_length(self._jobs.qsize())
            self._current = job
            if self._stopping.is_set():  # after setting _current: cancel_all sees the job or we see it
                job.cancel.set()
            try:
                self._generate(job)
            finally:
                self._current = None

    def _generate(self, job: Job) -> None:
        stats = GenerationStats(prompt_tokens=len(job.prompt), finish_reason="cancelled")
        if job.cancel.is_set():  # its client left while it waited, or the server is stopping
            self._finish(job, stats)
            return
        try:
            for event in self.engine.generate(
                job.prompt, max_tokens=job.max_tokens, sampling=job.sampling, stop=job.stop, cancel=job.cancel
            ):
                stats = event.stats
                if event.text:
                    job.send(event.text)
        except Exception as e:  # a failure inside llama.cpp: the request gets a 500, the server lives on
            log.logger.exception("generation failed")
            job.send(e)
            return
        self._finish(job, stats)

    def _finish(self, job: Job, stats: GenerationStats) -> None:
        if self._stopping.is_set() and stats.finish_reason == "cancelled":
            job.send(ShuttingDown("the server is shutting down"))
        else:
            job.send(stats)


# --- the app ---------------------------------------------------------------------------------------
@dataclass
class ServeOptions:
    """What `serve` was asked for besides the engine."""

    model_id: str  # the name /v1/models lists and responses carry
    max_queue: int  # requests that may wait for the engine; more get 503
    api_key: str | None = None  # required as a Bearer token on everything but /health
    read_timeout: float = READ_TIMEOUT_SECONDS  # see _TimedHttpProtocol


def create_app(engine: Engine, options: ServeOptions) -> FastAPI:
    """The FastAPI app for `engine`; its lifespan starts and stops the worker thread."""
    worker = Worker(engine, options.max_queue)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        worker.start()
        try:
            yield
        finally:
            await run_in_threadpool(worker.close)

    app = FastAPI(title="rotary-gguf", version="1", lifespan=lifespan)
    app.state.worker = worker

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return ApiError(exc.status_code, str(exc.detail), type=kind, headers=dict(exc.headers or {})).response()

    @app.exception_handler(Exception)
    async def _server_error(_request: Request, exc: Exception):
        log.logger.error("internal error: %r", exc)
        return ApiError(500, "internal server error", type="server_error").response()

    if options.api_key is not None:
        app.add_middleware(_RequireApiKey, api_key=options.api_key)
    api = APIRouter()
    created = int(time.time())

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": options.model_id}

    @api.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(options.model_id, created)]}

    @api.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        memory = await run_in_threadpool(engine.accelerator_memory)
        cache = engine.expert_cache.snapshot() if engine.expert_cache is not None else None
        return PlainTextResponse(prometheus_text(engine.live.snapshot(), memory, cache), media_type="text/plain; version=0.0.4")

    @api.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        body.refuse_unsupported()
        messages = [m.for_template() for m in body.messages]
        prompt = await _tokenized(engine, lambda: engine.chat_prompt(messages), "messages")
        job = _submit(worker, engine, body, prompt, body.token_limit)
        return await _respond(Reply("chat", options.model_id), job, body, request)

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        body.refuse_unsupported()
        if isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], int):
            prompt = _token_prompt(engine, body.prompt)
        else:
            text = body.prompt if isinstance(body.prompt, str) else "".join(body.prompt)  # at most one
            prompt = await _tokenized(engine, lambda: engine.tokenize(text), "prompt")
        job = _submit(worker, engine, body, prompt, body.max_tokens)
        return await _respond(Reply("completion", options.model_id), job, body, request)

    app.include_router(api)
    return app


class _RequireApiKey:
    """ASGI middleware: every HTTP request but /health must carry the API key, checked before the
    request is routed or its body read (a bad body without the key is 401, not 400), and covering
    /docs and /openapi.json too."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health" and not self._authorized(scope):
            error = ApiError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                             code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope) -> bool:
        value = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, token = value.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)


def _model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "rotary-gguf"}


async def _tokenized(engine: Engine, tokenize: Callable[[], list[int]], param: str) -> list[int]:
    """Tokenize off the event loop; a prompt the model cannot take is the client's error (400)."""
    try:
        tokens = await run_in_threadpool(tokenize)
    except PromptError as e:
        raise ApiError(400, str(e), param=param) from None
    return _fitting(engine, tokens, param)


def _token_prompt(engine: Engine, tokens: list[int]) -> list[int]:
    bad = next((t for t in tokens if not 0 <= t < engine.n_vocab), None)
    if bad is not None:
        raise ApiError(400, f"prompt: token id {bad} is outside the vocabulary (0..{engine.n_vocab - 1})", param="prompt")
    return _fitting(engine, tokens, "prompt")


def _fitting(engine: Engine, tokens: list[int], param: str) -> list[int]:
    try:
        engine.check_prompt(tokens)
    except PromptError as e:
        if not tokens:
            raise ApiError(400, str(e), param=param) from None
        raise ApiError(400, f"{e} (the server's --ctx)", param=param, code="context_length_exceeded") from None
    return tokens


def _submit(worker: Worker, engine: Engine, body: _Body, prompt: list[int], max_tokens: int | None) -> Job:
    job = Job(
        prompt=prompt,
        max_tokens=max_tokens or engine.n_ctx,  # the engine also stops where the context ends
        sampling=body.sampling(),
        stop=body.stop_strings(),
        loop=asyncio.get_running_loop(),
    )
    worker.submit(job)
    return job


async def _respond(reply: Reply, job: Job, body: _Body, request: Request):
    if body.stream:
        return _sse(reply.chunks(job, body.include_usage))
    return reply.whole(await _unless_disconnected(request, job), job.stats)


async def _unless_disconnected(request: Request, job: Job) -> str:
    """The whole generated text; a client that hangs up meanwhile cancels its generation."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.cancel.set()

    watcher = asyncio.create_task(watch())
    try:
        return await job.text()
    except ShuttingDown as e:
        raise ApiError(503, str(e), type="server_error") from None
    except Exception as e:
        raise ApiError(500, f"generation failed: {e}", type="server_error") from None
    finally:
        watcher.cancel()


def _sse(events: AsyncIterator[dict]) -> StreamingResponse:
    async def lines() -> AsyncIterator[str]:
        async for event in events:
            yield f"data: {json.dumps(event, ensure_ascii=False, separators=(',', ':'))}\n\n"
            if "error" in event:  # the stream ends without [DONE]
                return
        yield "data: [DONE]\n\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(lines(), media_type="text/event-stream", headers=headers)


class Reply:
    """The OpenAI response objects of one request: kind "chat" (chat.completion) or "completion"."""

    def __init__(self, kind: Literal["chat", "completion"], model_id: str):
        self.kind, self.model_id = kind, model_id
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _envelope(self, choices: list[dict], *, chunk: bool, **extra) -> dict:
        obj = {"chat": "chat.completion", "completion": "text_completion"}[self.kind]
        if chunk and self.kind == "chat":
            obj = "chat.completion.chunk"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_id, "choices": choices, **extra}

    def _choice(self, text: str, finish_reason: str | None, *, chunk: bool) -> dict:
        choice: dict = {"index": 0}
        if self.kind == "completion":
            choice["text"] = text
        elif chunk:
            choice["delta"] = {"content": text} if text else {}
        else:
            choice["message"] = {"role": "assistant", "content": text}
        return {**choice, "logprobs": None, "finish_reason": finish_reason}

    @staticmethod
    def usage(stats: GenerationStats) -> dict:
        return {
            "prompt_tokens": stats.prompt_tokens,
            "completion_tokens": stats.completion_tokens,
            "total_tokens": stats.prompt_tokens + stats.completion_tokens,
        }

    def whole(self, text: str, stats: GenerationStats) -> dict:
        """The non-streaming response."""
        return self._envelope([self._choice(text, stats.finish_reason, chunk=False)], chunk=False, usage=self.usage(stats))

    async def chunks(self, job: Job, include_usage: bool) -> AsyncIterator[dict]:
        """The streaming response's events. A failure after the response started becomes an error
        event (the OpenAI client raises it)."""
        usage_field = {"usage": None} if include_usage else {}

        def chunk(text: str, finish_reason: str | None = None) -> dict:
            return self._envelope([self._choice(text, finish_reason, chunk=True)], chunk=True, **usage_field)

        if self.kind == "chat":
            first = chunk("")
            first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            yield first
        try:
            async for piece in job.pieces():
                yield chunk(piece)
        except ShuttingDown as e:
            yield ApiError(503, str(e), type="server_error").body()
            return
        except Exception as e:
            yield ApiError(500, f"generation failed: {e}", type="server_error").body()
            return
        yield chunk("", job.stats.finish_reason)
        if include_usage:
            yield self._envelope([], chunk=True, usage=self.usage(job.stats))


# --- /metrics ----------------------------------------------------------------------------------------
def prometheus_text(s: Snapshot, accelerator_memory: dict[str, tuple[int, int]], cache: dict | None = None) -> str:
    """The live figures in Prometheus' text exposition format; `cache` is the expert cache's
    snapshot (ExpertCache.snapshot()), when the engine has one."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP rotary_gguf_{name} {help_text}")
        lines.append(f"# TYPE rotary_gguf_{name} {kind}")
        lines.extend(f"rotary_gguf_{name}{suffix} {_sample_value(value)}" for suffix, value in samples)

    def labelled(label: str, values: dict) -> list[tuple[str, float]]:
        return [(f'{{{label}="{key}"}}', value) for key, value in sorted(values.items())]

    metric("requests_total", "counter", "Generations finished, by finish reason.", labelled("finish_reason", s.requests))
    metric("requests_rejected_total", "counter", "Requests refused because the queue was full.", [("", s.rejected)])
    metric("prompt_tokens_total", "counter", "Prompt tokens of finished generations.", [("", s.prompt_tokens)])
    metric("prompt_tokens_cached_total", "counter", "Prompt tokens reused from the context cache.",
           [("", s.cached_prompt_tokens)])
    metric("completion_tokens_total", "counter", "Generated tokens.", [("", s.completion_tokens)])
    metric("decode_seconds_total", "counter", "Seconds spent generating after the first token.", [("", s.decode_seconds)])
    metric("decode_tokens_per_second", "gauge", "Decode speed of the last generation.", [("", s.last_decode_tps)])
    metric("decode_tokens_per_second_avg", "gauge", "Decode speed over all generations.", [("", s.avg_decode_tps)])
    metric("prompt_tokens_per_second", "gauge", "Prompt speed of the last generation.", [("", s.last_prompt_tps)])
    metric("time_to_first_token_seconds", "summary", "Time from a generation's start to its first token.",
           [("_sum", s.ttft_seconds_sum), ("_count", s.ttft_count)])
    metric("time_to_first_token_seconds_last", "gauge", "Time to first token of the last generation.",
           [("", s.last_ttft_seconds)])
    metric("queue_length", "gauge", "Requests waiting for the engine.", [("", s.queue_length)])
    metric("requests_in_flight", "gauge", "Generations running now.", [("", s.in_flight)])
    metric("accelerator_memory_used_bytes", "gauge", "Memory in use on each accelerator, as the device reports it.",
           labelled("device", {name: used for name, (used, _) in accelerator_memory.items()}))
    metric("accelerator_memory_total_bytes", "gauge", "Memory of each accelerator.",
           labelled("device", {name: total for name, (_, total) in accelerator_memory.items()}))
    if cache is not None:
        metric("expert_cache_enabled", "gauge", "1 while the expert cache serves decode calls, 0 once it turned itself off.",
               [("", int(cache["enabled"]))])
        metric("expert_cache_slots", "gauge", "Accelerator slots for experts, per cached block.", [("", cache["slots"])])
        metric("expert_cache_hits_total", "counter", "Expert selections served from a slot.", [("", cache["hits"])])
        metric("expert_cache_misses_total", "counter", "Expert selections uploaded into a slot first.",
               [("", cache["misses"])])
        metric("expert_cache_hit_rate", "gauge", "Share of expert selections served from a slot.", [("", cache["hit_rate"])])
        metric("expert_cache_hit_rate_recent", "gauge", "Share of expert selections served from a slot lately (about 10 s).",
               [("", cache["recent_hit_rate"])])
        metric("expert_cache_layer_hit_rate", "gauge", "Share of expert selections served from a slot, per block.",
               labelled("layer", cache["layer_hit_rate"]))
        metric("expert_cache_fallback_calls_total", "counter",
               "Decode calls that ran llama.cpp's own path: batches that could need more experts than the slots hold.",
               [("", cache["fallback_calls"])])
        metric("expert_cache_uploaded_bytes_total", "counter", "Expert bytes uploaded into slots.",
               [("", cache["uploaded_bytes"])])
        metric("expert_cache_upload_bytes_per_second", "gauge", "Expert upload speed lately (about 10 s).",
               [("", cache["uploaded_bytes_per_s"])])
        metric("expert_cache_resident_experts", "gauge", "Experts holding a slot, per block.",
               labelled("layer", {layer: len(experts) for layer, experts in cache["resident"].items()}))
    return "\n".join(lines) + "\n"


def _sample_value(value: float) -> str:
    """A sample value in full: integers exact (counters soon pass 6 digits), floats to the last digit."""
    return str(int(value)) if isinstance(value, int) else repr(float(value))


# --- running -----------------------------------------------------------------------------------------
class _Server(uvicorn.Server):
    """uvicorn, plus: a shutdown signal also ends running generations, so open streams close at once."""

    def __init__(self, config: uvicorn.Config, worker: Worker):
        super().__init__(config)
        self._worker = worker

    def handle_exit(self, sig: int, frame) -> None:
        super().handle_exit(sig, frame)
        # Runs inside a signal handler: do the work as an event-loop step, not between two bytecodes
        # of a request that is being queued.
        asyncio.get_running_loop().call_soon_threadsafe(self._worker.cancel_all)


class _TimedHttpProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol with deadlines for reading a request: its headers within
    `read_timeout` of the connection (or of the request's first byte), its body within as long
    again. A client that misses one is disconnected; uvicorn alone would keep a connection with
    half-sent headers open forever."""

    def __init__(self, *args, read_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self._read_timeout = read_timeout
        self._deadline: asyncio.TimerHandle | None = None

    def _arm(self, seconds: float | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(seconds, self._too_slow) if seconds is not None else None

    def _too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm(self._read_timeout)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm(self._read_timeout)

    def on_headers_complete(self) -> None:
        self._arm(self._read_timeout)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._arm(None)
        super().on_message_complete()

    def connection_lost(self, exc) -> None:
        self._arm(None)
        super().connection_lost(exc)


def run(engine: Engine, options: ServeOptions, sock: socket.socket) -> None:
    """Serve `engine` on `sock` (from `listen`) until SIGINT/SIGTERM, then shut down cleanly; the
    caller closes the engine."""
    app = create_app(engine, options)
    uvicorn_logger = logging.getLogger("uvicorn")
    uvicorn_logger.handlers[:] = log.logger.handlers
    uvicorn_logger.propagate = False
    uvicorn_logger.setLevel(logging.WARNING)
    protocol = functools.partial(_TimedHttpProtocol, read_timeout=options.read_timeout)
    config = uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=10,
                            http=protocol, timeout_keep_alive=IDLE_TIMEOUT_SECONDS)
    server = _Server(config, app.state.worker)
    # uvicorn re-raises the signal it shut down on once it is done; these handlers make that a no-op,
    # so a requested shutdown ends with exit status 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    host, port = sock.getsockname()[:2]
    log.logger.info("serving %s at http://%s:%d/v1 (Ctrl-C to stop)", options.model_id, host, port)
    try:
        server.run(sockets=[sock])
    finally:
        app.state.worker.close()
        sock.close()


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a UserError that says why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock
