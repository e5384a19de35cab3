"""The worker: one thread owns the engine and runs generations one at a time, in arrival order."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


from .. import log
from ..engine import Engine, GenerationStats, SamplingParams, TokenLogprob
from ..thinking import Thinking
from .schemas import ApiError


RETRY_AFTER_SECONDS = 1


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
