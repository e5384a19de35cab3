"""The server's access log: one line per HTTP request, written once its response has been sent:

    2026-05-01T12:00:00 127.0.0.1 POST /v1/chat/completions 200 prompt=24 completion=96 1532 ms

Tokens are the request's generation's (from the engine's stats), "-" where it ran none or did not
finish. The lines go to the "rotary_gguf.access" logger; `configure` sends them to stderr (above a
live dashboard there, without tearing it), to a file, or nowhere; `Recent` keeps the last few for
the dashboard.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING

from . import log
from .errors import UserError

if TYPE_CHECKING:
    from .serve import Job

logger = logging.getLogger("rotary_gguf.access")
FORMAT = logging.Formatter("%(asctime)s %(client)s %(message)s", datefmt="%Y-%m-%dT%H:%M:%S")
# The generations the request being handled started (set per request by AccessLog).
_request_jobs: contextvars.ContextVar[list["Job"]] = contextvars.ContextVar("request_jobs")


def record_job(job: "Job") -> None:
    """Count `job`'s tokens in the access-log line of the request that submitted it."""
    jobs = _request_jobs.get(None)
    if jobs is not None:
        jobs.append(job)


class AccessLog:
    """ASGI middleware: one access-log line per HTTP request, after the last byte of its response
    (a stream's too), or when the client left."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status, jobs = time.perf_counter(), None, []

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        token = _request_jobs.set(jobs)
        try:
            await self.app(scope, receive, sending)
        finally:
            _request_jobs.reset(token)
            client = scope.get("client")
            logger.info(access_line(scope["method"], scope["path"], status, jobs, time.perf_counter() - started),
                        extra={"client": client[0] if client else "-"})


def access_line(method: str, path: str, status: int | None, jobs: list["Job"], seconds: float) -> str:
    """One request's line, less its time and client (the handlers' format adds them)."""
    finished = [job.stats for job in jobs if job.stats is not None]
    if finished and len(finished) == len(jobs):
        tokens = (f"prompt={sum(s.prompt_tokens for s in finished)} "
                  f"completion={sum(s.completion_tokens for s in finished)}")
    else:
        tokens = "prompt=- completion=-"
    return f"{method} {path} {status or '-'} {tokens} {seconds * 1e3:.0f} ms"


class _ConsoleLines(logging.Handler):
    """Lines printed on the tool's stderr console: above a live dashboard drawn there, not through it."""

    def emit(self, record: logging.LogRecord) -> None:
        log.stderr.print(self.format(record), markup=False, highlight=False, soft_wrap=True)


class Recent(logging.Handler):
    """Keeps the last `n` lines (without time and client) for the dashboard to show."""

    def __init__(self, n: int = 1):
        super().__init__()
        self.lines: deque[str] = deque(maxlen=n)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def configure(where: str) -> None:
    """Send access-log lines to `where`: "-" (stderr), "off", or a file (appended to); a UserError
    if the file cannot be opened."""
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO)
    if where == "-":
        logger.addHandler(_ConsoleLines())
        logger.handlers[-1].setFormatter(FORMAT)
    elif where != "off":
        path = Path(where)
        try:
            handler = logging.FileHandler(path, encoding="utf-8")
        except OSError as e:
            raise UserError(f"--access-log {where}: cannot write there ({e.strerror or e})") from None
        handler.setFormatter(FORMAT)
        logger.addHandler(handler)
