"""The engine: the only layer that calls llama.cpp. Loads a model with a placement, tokenizes,
decodes, samples, and streams tokens with the statistics every front end shows.

Front ends (generate, serve, chat, bench) consume `Engine.generate`, one stream of `TokenEvent`s
that carry the text and the running `GenerationStats`; none of them measures speed on its own.
"""

from __future__ import annotations

import codecs
import ctypes
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp
import numpy as np

from . import native
from .errors import UserError
from .inventory import read_inventory
from .plan import Placement


@dataclass
class SamplingParams:
    """How the next token is chosen. temperature 0 means greedy (argmax)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None


@dataclass
class GenerationStats:
    """Per-request figures, updated as tokens stream."""

    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_seconds: float = 0.0
    decode_seconds: float = 0.0
    ttft_seconds: float = 0.0
    finish_reason: str | None = None

    @property
    def prompt_tps(self) -> float:
        evaluated = self.prompt_tokens - self.cached_prompt_tokens
        return evaluated / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        # The first generated token comes from the prompt pass; decode speed counts the rest.
        n = self.completion_tokens - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0


@dataclass
class TokenEvent:
    """One generated token: its id, the text it completes (may be '' mid-character), and stats."""

    token: int | None  # None for the closing event of an end-of-generation token
    text: str
    stats: GenerationStats


@dataclass
class LoadReport:
    """What llama.cpp actually allocated for the weights, per buffer type name."""

    weight_bytes: dict[str, int] = field(default_factory=dict)


class Engine:
    """A loaded model and one context. Not thread-safe: one generation at a time."""

    def __init__(self, path: Path, model, ctx, placement: Placement, keepalive: list):
        self.path = path
        self.placement = placement
        self._model, self._ctx = model, ctx
        self._keepalive = keepalive  # ctypes arrays llama.cpp points into
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.n_ctx = llama_cpp.llama_n_ctx(ctx)
        self.n_batch = llama_cpp.llama_n_batch(ctx)
        self._cached: list[int] = []  # tokens whose state is in the context memory
        self.inventory = read_inventory(path)

    # --- lifecycle -----------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        placement: Placement | None = None,
        *,
        n_ctx: int = 2048,
        n_batch: int = 512,
        n_threads: int | None = None,
    ) -> "Engine":
        """Load `path` with `placement` (default: everything on the CPU) and create a context."""
        path = Path(path)
        inv = read_inventory(path)  # clear errors for missing/broken files before llama.cpp sees them
        placement = placement or Placement.all_cpu()
        if placement.offload_min_batch is not None:
            native.set_offload_min_batch(placement.offload_min_batch)
        llama_cpp.llama_backend_init()

        keepalive: list = []
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = placement.n_gpu_layers
        mparams.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP if placement.use_mmap else llama_cpp.LLAMA_LOAD_MODE_NONE
        mparams.use_extra_bufts = placement.repack
        devs = [native.device_by_name(n).handle for n in placement.devices]
        dev_array = native.device_array(devs)
        keepalive.append(dev_array)
        mparams.devices = native.address(dev_array)
        if placement.overrides:
            bufts = buffer_types()
            missing = [b for _, b in placement.overrides if b not in bufts]
            if missing:
                raise UserError(f"unknown buffer type {missing[0]!r} (known: {', '.join(sorted(bufts))})")
            ov = native.override_array([(p, bufts[b]) for p, b in placement.overrides])
            keepalive.append(ov)
            mparams.tensor_buft_overrides = native.address(ov)

        model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not model:
            raise UserError(f"llama.cpp could not load {path} (arch {inv.arch}); run with --verbose for its log")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = cparams.n_ubatch = n_batch
        threads = n_threads or default_threads()
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.no_perf = True
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            llama_cpp.llama_model_free(model)
            raise UserError(f"llama.cpp could not create a context of {n_ctx} tokens for {path}")
        return cls(path, model, ctx, placement, keepalive)

    def close(self) -> None:
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- text --------------------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        buf = (llama_cpp.llama_token * (len(data) + 8))()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, len(buf), add_special, parse_special)
        if n < 0:
            buf = (llama_cpp.llama_token * -n)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, len(buf), add_special, parse_special)
        return list(buf[:n])

    def token_bytes(self, token: int, *, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def is_end_of_generation(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    # --- evaluation --------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the context memory (KV cache and recurrent state)."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)
        self._cached = []

    def eval(self, tokens: Sequence[int]) -> None:
        """Append `tokens` to the context, in batches of n_batch; logits of the last one are kept."""
        if len(self._cached) + len(tokens) > self.n_ctx:
            raise UserError(f"{len(self._cached) + len(tokens)} tokens do not fit the context of {self.n_ctx}")
        for start in range(0, len(tokens), self.n_batch):
            chunk = list(tokens[start : start + self.n_batch])
            arr = (llama_cpp.llama_token * len(chunk))(*chunk)
            rc = llama_cpp.llama_decode(self._ctx, llama_cpp.llama_batch_get_one(arr, len(chunk)))
            if rc != 0:
                raise RuntimeError(f"llama_decode failed with code {rc}")
            self._cached.extend(chunk)

    def logits(self) -> np.ndarray:
        """A copy of the logits after the last evaluated token."""
        ptr = llama_cpp.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def prepare(self, prompt: Sequence[int]) -> int:
        """Make the context hold exactly `prompt`, reusing a cached prefix when the prompt extends
        what is cached (multi-turn chat). Returns how many prompt tokens were reused."""
        prompt = list(prompt)
        n = len(self._cached)
        if 0 < n < len(prompt) and prompt[:n] == self._cached:
            self.eval(prompt[n:])
            return n
        self.reset()
        self.eval(prompt)
        return 0

    # --- generation --------------------------------------------------------------------------------
    def generate(
        self,
        prompt: Sequence[int],
        *,
        max_tokens: int = 128,
        sampling: SamplingParams | None = None,
        stop: Sequence[str] = (),
    ) -> Iterator[TokenEvent]:
        """Stream tokens after `prompt`. Text is whole UTF-8 characters; stop strings are cut out."""
        if not prompt:
            raise UserError("empty prompt")
        if len(prompt) >= self.n_ctx:
            raise UserError(f"the prompt has {len(prompt)} tokens; the context holds {self.n_ctx}")
        stats = GenerationStats(prompt_tokens=len(prompt))
        sampler = Sampler(self, sampling or SamplingParams(), history=prompt)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text_filter = StopFilter(stop)
        budget = min(max_tokens, self.n_ctx - len(prompt))
        try:
            t0 = time.perf_counter()
            stats.cached_prompt_tokens = self.prepare(prompt)
            stats.prompt_seconds = time.perf_counter() - t0
            t_decode = time.perf_counter()
            while True:
                token = sampler.sample()
                stats.completion_tokens += 1
                if stats.completion_tokens == 1:
                    stats.ttft_seconds = time.perf_counter() - t0
                if self.is_end_of_generation(token):
                    stats.completion_tokens -= 1
                    stats.finish_reason = "stop"
                    tail = text_filter.flush(decoder.decode(b"", final=True))
                    yield TokenEvent(None, tail, stats)
                    return
                text, stopped = text_filter.feed(decoder.decode(self.token_bytes(token)))
                if stopped:
                    stats.finish_reason = "stop"
                elif stats.completion_tokens >= budget:
                    stats.finish_reason = "length"
                    text += text_filter.flush(decoder.decode(b"", final=True))
                if stats.finish_reason:
                    stats.decode_seconds = time.perf_counter() - t_decode
                    yield TokenEvent(token, text, stats)
                    return
                self.eval([token])
                stats.decode_seconds = time.perf_counter() - t_decode
                yield TokenEvent(token, text, stats)
        finally:
            sampler.close()

    def greedy(self, prompt: Sequence[int], n: int) -> list[int]:
        """The `n` greedy tokens after `prompt` (stops early at end of generation)."""
        return [e.token for e in self.generate(prompt, max_tokens=n) if e.token is not None]


class Sampler:
    """llama.cpp's sampler chain for one request."""

    def __init__(self, engine: Engine, params: SamplingParams, history: Sequence[int]):
        self._engine = engine
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = lambda s: llama_cpp.llama_sampler_chain_add(chain, s)  # noqa: E731
        if params.repeat_penalty != 1.0:
            add(llama_cpp.llama_sampler_init_penalties(params.repeat_last_n, params.repeat_penalty, 0.0, 0.0))
        if params.temperature <= 0:
            add(llama_cpp.llama_sampler_init_greedy())
        else:
            if params.top_k > 0:
                add(llama_cpp.llama_sampler_init_top_k(params.top_k))
            if params.top_p < 1.0:
                add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
            if params.min_p > 0:
                add(llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
            add(llama_cpp.llama_sampler_init_temp(params.temperature))
            seed = params.seed if params.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED
            add(llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        for token in history[-params.repeat_last_n :] if params.repeat_penalty != 1.0 else ():
            llama_cpp.llama_sampler_accept(chain, token)
        self._chain = chain

    def sample(self) -> int:
        return llama_cpp.llama_sampler_sample(self._chain, self._engine._ctx, -1)

    def close(self) -> None:
        if self._chain:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None


class StopFilter:
    """Holds back text that could be the start of a stop string; cuts output at the first stop."""

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, whether a stop string was hit)."""
        self.pending += text
        if not self.stop:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        keep = max((k for s in self.stop for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(out) :]
        return out, False

    def flush(self, text: str = "") -> str:
        out, _ = self.feed(text)
        out, self.pending = out + self.pending, ""
        return out


def buffer_types() -> dict[str, int]:
    """Every buffer type a placement can name: each device's own, and pinned host memory."""
    out: dict[str, int] = {}
    for dev in native.devices():
        out[native.buffer_type_name(dev.buffer_type)] = dev.buffer_type
        if dev.host_buffer_type:
            out[native.buffer_type_name(dev.host_buffer_type)] = dev.host_buffer_type
    return out


def default_threads() -> int:
    return max(1, os.cpu_count() or 1)
