"""The FastAPI app: routes for the OpenAI and Anthropic APIs, /metrics and /health, over one worker."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import log
from ..access_log import AccessLog, record_job
from ..api import anthropic as messages_api
from ..api import openai as oai
from ..engine import Engine, PromptError
from ..metrics import prometheus_text
from .schemas import ApiError, ChatCompletionRequest, CompletionRequest, RequestBody, validation_error
from .worker import Job, ShuttingDown, Worker


# A connection must deliver a request's headers this soon after it opens (or after the request
# starts), and then its body as soon again; idle keep-alive connections close after
# IDLE_TIMEOUT_SECONDS. Half-open connections (a slow or stalled client) cannot pile up.
READ_TIMEOUT_SECONDS = 10.0
IDLE_TIMEOUT_SECONDS = 5


# --- the app ---------------------------------------------------------------------------------------
@dataclass
class ServeOptions:
    """What `serve` was asked for besides the engine."""

    model_id: str  # the name /v1/models lists and responses carry
    max_queue: int  # requests that may wait for the engine; more get 503
    api_key: str | None = None  # required as a Bearer token on everything but /health
    thinking_budget: int | None = None  # for chat requests that set none
    read_timeout: float = READ_TIMEOUT_SECONDS  # see _TimedHttpProtocol
    budgets: dict[str, int] = field(default_factory=dict)  # the plan's memory budget per accelerator (/metrics)


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
        return validation_error(exc).response(request)

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
        memory, placed = await run_in_threadpool(lambda: (engine.accelerator_memory(), engine.placed_bytes()))
        cache = engine.expert_cache.snapshot() if engine.expert_cache is not None else None
        checkpoints = engine.checkpoints.snapshot() if engine.checkpoints is not None else None
        text = prometheus_text(engine.live.snapshot(), memory, cache, checkpoints, placed, options.budgets)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

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


def _submit(worker: Worker, engine: Engine, body: RequestBody, prompt: list[int], max_tokens: int | None,
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


async def _respond(reply: oai.Reply, job: Job, body: RequestBody, request: Request):
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
