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
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from . import log
from .access_log import AccessLog, record_job
from .api import anthropic as messages_api
from .api import openai as oai
from .engine import Engine, GenerationStats, PromptError, SamplingParams, TokenLogprob
from .errors import UserError
from .metrics import prometheus_text
from .thinking import Thinking

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

    def anthropic_body(self) -> dict:
        """The Anthropic Messages API's form of the error."""
        kinds = {401: "authentication_error", 404: "not_found_error", 503: "overloaded_error"}
        kind = kinds.get(self.status, "api_error" if self.status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": self.message}}

    def response(self, request: Request | None = None) -> JSONResponse:
        """The error response; in the Anthropic form for requests to /v1/messages."""
        anthropic = request is not None and request.url.path.startswith("/v1/messages")
        return JSONResponse(self.anthropic_body() if anthropic else self.body(), status_code=self.status,
                            headers=self.headers)


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
        if self.logit_bias:
            raise unsupported("logit_bias", "logit_bias is not supported")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Body, oai.ChatOptions):
    messages: list[oai.ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=oai.MAX_TOP_LOGPROBS)

    def logprob_count(self) -> int | None:
        """How many alternatives each token's log probability comes with; None: no log probabilities."""
        if self.top_logprobs and not self.logprobs:
            raise ApiError(400, "top_logprobs: needs logprobs set to true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Body):
    prompt: str | list[str] | list[int]
    max_tokens: int = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def logprob_count(self) -> int | None:
        return self.logprobs

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
    grammar: str | None = None
    thinking: Thinking | None = None
    logprobs: int | None = None  # top alternatives per token; None: no log probabilities
    checkpoint_at: tuple[int, ...] = ()  # prompt positions where a hybrid model keeps its state
    # str pieces (each after its tokens' TokenLogprobs, when asked for), then stats or an exception
    output: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    stats: GenerationStats | None = None
    token_logprobs: list[TokenLogprob] = field(default_factory=list)  # of the pieces read so far

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
                self.token_logprobs.extend(item for item in items if isinstance(item, TokenLogprob))
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
                job.prompt, max_tokens=job.max_tokens, sampling=job.sampling, stop=job.stop, cancel=job.cancel,
                checkpoint_at=job.checkpoint_at, grammar=job.grammar, thinking=job.thinking, logprobs=job.logprobs,
            ):
                stats = event.stats
                if event.logprob is not None and event.token is not None:
                    job.send(event.logprob)
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
    thinking_budget: int | None = None  # for chat requests that set none
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
    async def _api_error(request: Request, exc: ApiError):
        return exc.response(request)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _validation_error(exc).response(request)

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
    app.add_middleware(AccessLog)  # outermost: refused requests are logged too
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
        checkpoints = engine.checkpoints.snapshot() if engine.checkpoints is not None else None
        return PlainTextResponse(prometheus_text(engine.live.snapshot(), memory, cache, checkpoints),
                                 media_type="text/plain; version=0.0.4")

    @api.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        body.refuse_unsupported()
        plan = _checked(lambda: body.plan(body.messages, engine.chat_template))
        job, parser = await _chat_job(worker, engine, body, plan, body.token_limit, options)
        return await _respond(oai.Reply("chat", options.model_id, parser), job, body, request)

    @api.post("/v1/messages")
    async def anthropic_messages(body: messages_api.MessagesRequest, request: Request):
        chat_messages, chat_options = _checked(body.chat)
        plan = _checked(lambda: chat_options.plan(chat_messages, engine.chat_template))
        job, parser = await _chat_job(worker, engine, body, plan, body.max_tokens, options)
        reply = messages_api.MessageReply(options.model_id)
        if body.stream:
            return _sse(_guarded(reply.stream(parser, job, len(job.prompt)), ApiError.anthropic_body), named=True)
        parser.feed(await _unless_disconnected(request, job))
        parser.finish()
        return reply.whole(*parser.message(), job.stats)

    @api.post("/v1/messages/count_tokens")
    async def anthropic_count_tokens(body: messages_api.CountTokensRequest):
        chat_messages, chat_options = _checked(body.chat)
        plan = _checked(lambda: chat_options.plan(chat_messages, engine.chat_template))
        text = await _rendered(engine, plan)
        return {"input_tokens": len(await _tokenized(engine, lambda: engine.chat_tokens(text), "messages"))}

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        body.refuse_unsupported()
        if isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], int):
            prompt = _token_prompt(engine, body.prompt)
        else:
            text = body.prompt if isinstance(body.prompt, str) else "".join(body.prompt)  # at most one
            prompt = await _tokenized(engine, lambda: engine.tokenize(text), "prompt")
        job = _submit(worker, engine, body, prompt, body.max_tokens)
        return await _respond(oai.Reply("completion", options.model_id), job, body, request)

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
            error = ApiError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>')",
                             code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            await error.response(Request(scope))(scope, receive, send)  # Anthropic's form on /v1/messages
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope) -> bool:
        headers = dict(scope["headers"])
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() != b"bearer":  # Anthropic clients send the key as x-api-key
            token = headers.get(b"x-api-key", b"")
        return hmac.compare_digest(token.strip(), self.key)


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


def _checked(make: Callable):
    """`make()`, with a request the model cannot serve as asked answered by a 400."""
    try:
        return make()
    except oai.RequestError as e:
        raise ApiError(400, str(e), param=e.param) from None


async def _chat_job(worker: Worker, engine: Engine, body, plan: oai.ChatPlan, max_tokens: int | None,
                    options: ServeOptions):
    """Render, tokenize and queue a chat request; returns its job and the parser for its reply."""
    if plan.thinking_budget is None:
        plan.thinking_budget = options.thinking_budget
    text = await _rendered(engine, plan)
    prompt = await _tokenized(engine, lambda: engine.chat_tokens(text), "messages")
    turn_start = await run_in_threadpool(lambda: engine.turn_start(plan.messages, prompt, **plan.variables))
    return _submit(worker, engine, body, prompt, max_tokens, plan, text, turn_start), plan.parser(text)


async def _rendered(engine: Engine, plan: oai.ChatPlan) -> str:
    """The chat prompt's text; a template that refuses the messages, or a grammar llama.cpp does not
    parse, is the client's error (400)."""

    def render() -> str:
        if plan.grammar is not None:
            try:
                engine.check_grammar(plan.grammar)
            except PromptError as e:
                raise oai.RequestError(plan.grammar_param, str(e)) from None
        return engine.chat_text(plan.messages, **plan.variables)

    try:
        return await run_in_threadpool(render)
    except oai.RequestError as e:
        raise ApiError(400, str(e), param=e.param) from None
    except PromptError as e:
        raise ApiError(400, str(e), param="messages") from None


def _submit(worker: Worker, engine: Engine, body: _Body, prompt: list[int], max_tokens: int | None,
            plan: oai.ChatPlan | None = None, prompt_text: str = "", checkpoint_at: tuple[int, ...] = ()) -> Job:
    job = Job(
        prompt=prompt,
        max_tokens=max_tokens or engine.n_ctx,  # the engine also stops where the context ends
        sampling=body.sampling(),
        stop=body.stop_strings(),
        loop=asyncio.get_running_loop(),
        grammar=plan.grammar if plan else None,
        thinking=plan.thinking(prompt_text) if plan else None,
        logprobs=body.logprob_count(),
        checkpoint_at=checkpoint_at,
    )
    worker.submit(job)
    record_job(job)
    return job


async def _respond(reply: oai.Reply, job: Job, body: _Body, request: Request):
    if body.stream:
        return _sse(_guarded(reply.chunks(job, body.include_usage), ApiError.body))
    return reply.whole(await _unless_disconnected(request, job), job)


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


def _sse(events: AsyncIterator[dict], *, named: bool = False) -> StreamingResponse:
    """Server-sent events: OpenAI's (data lines, then [DONE]) or, `named`, Anthropic's (each with
    an event line naming its type)."""

    async def lines() -> AsyncIterator[str]:
        async for event in events:
            name = f"event: {event['type']}\n" if named else ""
            yield f"{name}data: {json.dumps(event, ensure_ascii=False, separators=(',', ':'))}\n\n"
            if "error" in event:  # the stream ends here, without [DONE]
                return
        if not named:
            yield "data: [DONE]\n\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(lines(), media_type="text/event-stream", headers=headers)


async def _guarded(events: AsyncIterator[dict], error_body: Callable[[ApiError], dict]) -> AsyncIterator[dict]:
    """A response's stream events; a failure after the response started ends it with an error
    event in the API's form (clients raise it)."""
    try:
        async for event in events:
            yield event
    except ShuttingDown as e:
        yield error_body(ApiError(503, str(e), type="server_error"))
    except Exception as e:
        yield error_body(ApiError(500, f"generation failed: {e}", type="server_error"))


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
    # uvicorn's access log is off: ours (access_log.py, set up by the caller) carries the tokens.
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
