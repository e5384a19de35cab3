"""The API's errors and request bodies: what a request may hold, checked before the engine sees it."""

from __future__ import annotations

import re

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ..api import openai as oai
from ..engine import SamplingParams


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


def validation_error(exc: RequestValidationError) -> ApiError:
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


class RequestBody(BaseModel):
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


class ChatCompletionRequest(RequestBody, oai.ChatOptions):
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


class CompletionRequest(RequestBody):
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
