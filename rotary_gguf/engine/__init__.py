"""The engine: the only layer that calls llama.cpp. Loads a model with a placement, tokenizes,
decodes, samples, and streams tokens with the statistics every front end shows.

Front ends (generate, serve, chat, bench) consume `Engine.generate`, one stream of `TokenEvent`s
that carry the text and the running `GenerationStats`; none of them measures speed on its own.
"""

from __future__ import annotations

import codecs
import ctypes
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import llama_cpp
import numpy as np
from gguf import GGMLQuantizationType

from .. import native
from ..chat_template import render_chat_template
from ..draft import DEFAULT_DRAFT_MAX, DRAFT_MODES, check_mtp, mtp_expert_overrides
from ..draft.mtp import MtpDrafter, Speculation
from ..errors import PromptError, UserError
from ..inventory import read_inventory
from ..plan import DEFAULT_BATCH, DEFAULT_FLASH_ATTN, DEFAULT_KV_TYPE, Placement, context_settings
from ..prompt_cache import DEFAULT_CHECKPOINT_BYTES, CheckpointStore
from ..stats import LiveStats
from ..thinking import Thinking, ThinkTracker
from .events import GenerationStats, LoadReport, SamplingParams, TokenEvent, TokenLogprob
from .loading import (_FLASH_ATTN_TYPES, _graph_reuse_disabled, _refuse_unsafe_buffer_types, buffer_types,  # noqa: F401
                      default_threads)
from .sampling import Sampler, StopFilter, _grammar_sampler

__all__ = ["Engine", "GenerationStats", "LoadReport", "PromptError", "Sampler", "SamplingParams", "StopFilter",
           "TokenEvent", "TokenLogprob", "buffer_types", "default_threads"]


class Engine:
    """A loaded model and one context. Not thread-safe: one generation at a time."""

    load_report: LoadReport  # what llama.cpp allocated, set by `load`
    # Make every token of a batch an output, so every block routes every token: some archs
    # (qwen3moe) run the last block's FFN only for output tokens. For routing profiles; costs
    # n_batch x n_vocab floats of logits.
    output_every_token = False  # needs a context loaded with all_outputs
    all_outputs = False
    expert_cache = None
    drafter: MtpDrafter | None = None  # the MTP head's context, with draft="mtp"
    before_decode = None  # called with each batch's size before llama_decode (the expert cache)
    _device_buffers: dict[str, str] | None = None  # buffer type name -> device name (placed_bytes)

    def __init__(self, path: Path, model, ctx, placement: Placement, keepalive: list,
                 checkpoint_bytes: int = DEFAULT_CHECKPOINT_BYTES):
        self.path = path
        self.placement = placement
        self._model, self._ctx = model, ctx
        self._keepalive = keepalive  # ctypes arrays llama.cpp points into
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.n_ctx = llama_cpp.llama_n_ctx(ctx)
        self.n_batch = llama_cpp.llama_n_batch(ctx)
        self._cached: list[int] = []  # tokens whose state is in the context memory
        # Hybrid and recurrent models keep checkpoints of their recurrent state (prompt_cache).
        recurrent = llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model)
        self.checkpoints = CheckpointStore(checkpoint_bytes) if recurrent else None
        self.inventory = read_inventory(path)
        self.live = LiveStats()  # totals over every generation, read by /metrics and the dashboard

    # --- lifecycle -----------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        placement: Placement | None = None,
        *,
        n_ctx: int | None = None,
        n_batch: int = DEFAULT_BATCH,
        n_ubatch: int | None = None,
        kv_type: str = DEFAULT_KV_TYPE,
        flash_attn: str = DEFAULT_FLASH_ATTN,
        all_outputs: bool = False,
        n_threads: int | None = None,
        telemetry=None,
        expert_cache=None,
        checkpoint_bytes: int = DEFAULT_CHECKPOINT_BYTES,
        draft: str = "off",
        draft_max: int = DEFAULT_DRAFT_MAX,
    ) -> "Engine":
        """Load `path` with `placement` (default: everything on the CPU) and create a context.
        `telemetry` (e.g. a `telemetry.RoutingTelemetry`) is installed as llama.cpp's eval callback:
        anything with `callback` (an EvalCallback) and `user_data`. `expert_cache` (an
        `experts.cache.ExpertCache`) takes the eval callback's place and is attached after loading;
        with both, the cache's callback also counts the routing for the telemetry. A hybrid model
        keeps prompt checkpoints within `checkpoint_bytes` of host memory. The context holds `n_ctx`
        tokens, decodes `n_batch` per call in micro-batches of `n_ubatch` (default: `n_batch`), keeps K
        and V as `kv_type`, and returns the logits of one token per batch unless `all_outputs` (every
        token's: a compute buffer that grows by n_ubatch x n_vocab floats). `draft="mtp"` drafts up
        to `draft_max` tokens a step with the model's multi-token-prediction head (`draft`)."""
        callback = expert_cache if expert_cache is not None else telemetry
        path = Path(path)
        inv = read_inventory(path)  # clear errors for missing/broken files before llama.cpp sees them
        context = context_settings(inv, n_ctx, n_batch, n_ubatch, kv_type, flash_attn)
        if draft == "mtp":
            check_mtp(inv, draft_max, context.n_ubatch)
        elif draft != "off":
            raise UserError(f"unknown draft mode {draft!r} (known: {', '.join(DRAFT_MODES)})")
        placement = placement or Placement.all_cpu()
        if placement.offload_min_batch is not None:
            native.set_offload_min_batch(placement.offload_min_batch)
        llama_cpp.llama_backend_init()

        keepalive: list = []
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = placement.n_gpu_layers
        mparams.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP if placement.use_mmap else llama_cpp.LLAMA_LOAD_MODE_NONE
        mparams.use_extra_bufts = placement.repack and not _refuse_unsafe_buffer_types()
        mparams.load_mtp = draft == "mtp"
        devs = [native.device_by_name(n).handle for n in placement.devices]
        dev_array = native.device_array(devs)
        keepalive.append(dev_array)
        mparams.devices = native.address(dev_array)
        if placement.tensor_split:
            if len(placement.tensor_split) != len(devs):
                raise UserError(f"a tensor split of {len(placement.tensor_split)} devices for {len(devs)} devices")
            split = native.split_array(placement.tensor_split)
            keepalive.append(split)
            mparams.tensor_split = ctypes.cast(split, ctypes.POINTER(ctypes.c_float))
        drafting = () if draft != "mtp" else (
            placement.draft_overrides if placement.draft_overrides is not None else mtp_expert_overrides(inv, placement))
        overrides = tuple(drafting) + tuple(placement.overrides)
        if overrides:
            bufts = buffer_types()
            missing = [b for _, b in overrides if b not in bufts]
            if missing:
                raise UserError(f"unknown buffer type {missing[0]!r} (known: {', '.join(sorted(bufts))})")
            ov = native.override_array([(p, bufts[b]) for p, b in overrides])
            keepalive.append(ov)
            mparams.tensor_buft_overrides = native.address(ov)

        with native.capture_llama_log() as log_lines:
            model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
            if not model:
                raise UserError(f"llama.cpp could not load {path} (arch {inv.arch}); run with --verbose for its log")
            cparams = llama_cpp.llama_context_default_params()
            cparams.n_ctx = context.ctx
            cparams.n_batch, cparams.n_ubatch = context.n_batch, context.n_ubatch
            # 0: every token of a batch; a draft round verifies its token and drafts in one batch
            cparams.n_outputs_max = 0 if all_outputs else draft_max + 1 if draft == "mtp" else 1
            cparams.type_k = cparams.type_v = GGMLQuantizationType[context.kv_type.upper()].value
            cparams.flash_attn_type = _FLASH_ATTN_TYPES[context.flash_attn]
            threads = n_threads or default_threads()
            cparams.n_threads = cparams.n_threads_batch = threads
            cparams.no_perf = True
            cparams.n_rs_seq = draft_max if draft == "mtp" else 0  # recurrent snapshots to roll drafts back
            if callback is not None:
                cparams.cb_eval, cparams.cb_eval_user_data = callback.callback, callback.user_data
                keepalive.extend((callback, telemetry))
            with _graph_reuse_disabled(expert_cache is not None):
                ctx = llama_cpp.llama_init_from_model(model, cparams)
            if not ctx:
                llama_cpp.llama_model_free(model)
                raise UserError(f"llama.cpp could not create a context of {context.ctx} tokens for {path}")
            engine = cls(path, model, ctx, placement, keepalive, checkpoint_bytes)
            if draft == "mtp":  # in the load log too: the plan counts the head's context
                try:
                    engine.drafter = MtpDrafter(model, ctx, cparams, draft_max)
                except BaseException:
                    engine.close()
                    raise
        engine.context, engine.all_outputs = context, all_outputs
        engine.load_report = LoadReport.from_log(log_lines)
        if expert_cache is not None:
            engine.expert_cache, engine.before_decode = expert_cache, expert_cache.before_decode
            try:
                expert_cache.attach(engine)
                if telemetry is not None:
                    expert_cache.count_routing(telemetry)
            except BaseException:
                engine.close()
                raise
        return engine

    def close(self) -> None:
        if self.drafter is not None:
            self.drafter.close()
            self.drafter = None
        if self.expert_cache is not None:  # give the model its host expert tensors back first
            self.expert_cache.close()
            self.expert_cache = None
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def accelerator_memory(self) -> dict[str, tuple[int, int]]:
        """(used, total) bytes of each accelerator in the placement, as the device reports them."""
        return {
            d.name: (d.total - d.free, d.total)
            for d in native.devices()
            if d.is_accelerator and d.name in self.placement.devices
        }

    def placed_bytes(self) -> dict[str, int]:
        """Bytes llama.cpp (weights, KV cache, recurrent state, compute and output buffers) and the
        expert cache's slots took on each accelerator of the placement, by device name. A buffer
        counts for the device whose buffer type has its exact name: two ggml-rpc servers both call
        their device "RPC0" inside their buffer names ("RPC0[host:port]"), told apart by endpoint."""
        if self._device_buffers is None:  # names never change: asked once (an RPC device answers over the network)
            self._device_buffers = {native.buffer_type_name(d.buffer_type): d.name for d in native.devices()
                                    if d.name in self.placement.devices}
        by_buffer = self._device_buffers
        placed = dict.fromkeys(self.placement.devices, 0)
        report = self.load_report
        for sizes in (report.weight_bytes, report.kv_bytes, report.recurrent_bytes, report.compute_bytes, report.output_bytes):
            for buffer, n in sizes.items():
                if buffer in by_buffer:
                    placed[by_buffer[buffer]] += n
        cache = self.expert_cache
        if cache is not None and cache.buffer_type in by_buffer:
            placed[by_buffer[cache.buffer_type]] += cache.slot_bytes
        return placed

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- text --------------------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate, e.g. from a JSON "\ud800" escape
            raise PromptError(f"the text is not valid Unicode ({e.reason} at character {e.start})") from None
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

    @property
    def chat_template(self) -> str | None:
        """The model's default chat template (GGUF tokenizer.chat_template), if it has one."""
        template = llama_cpp.llama_model_chat_template(self._model, None)
        return template.decode("utf-8", errors="replace") if template else None

    def chat_text(self, messages: Sequence[dict], **variables) -> str:
        """`messages` ({"role", "content", ...} dicts) in the model's chat template, ending where the
        assistant's reply begins; `variables` (tools, enable_thinking, ...) go to the template."""
        template = self.chat_template
        if not template:
            raise PromptError(f"{self.path.name} has no chat template; send a plain completion prompt instead")
        bos, eos = llama_cpp.llama_vocab_bos(self._vocab), llama_cpp.llama_vocab_eos(self._vocab)
        return render_chat_template(
            template, messages, **{"bos_token": self._special_text(bos), "eos_token": self._special_text(eos), **variables}
        )

    def chat_prompt(self, messages: Sequence[dict], **variables) -> list[int]:
        """The tokens of `chat_text(messages, **variables)`."""
        return self.chat_tokens(self.chat_text(messages, **variables))

    def turn_start(self, messages: Sequence[dict], prompt: Sequence[int], **variables) -> tuple[int, ...]:
        """Where the new turn begins in the chat prompt `prompt` of `messages` (before the
        generation prompt), as `checkpoint_at` for `generate`: the checkpoint a hybrid model
        restarts from next turn, when its template rewrites this turn (drops its thinking).
        Empty for other models, or when the template's text without the generation prompt is not
        a prefix of the prompt."""
        if self.checkpoints is None:
            return ()
        try:
            head = self.chat_prompt(messages, add_generation_prompt=False, **variables)
        except PromptError:
            return ()
        return (len(head),) if 0 < len(head) < len(prompt) and list(prompt[: len(head)]) == head else ()

    def chat_tokens(self, text: str) -> list[int]:
        """The tokens of a rendered chat prompt (special tokens parsed, one BOS at most)."""
        bos = llama_cpp.llama_vocab_bos(self._vocab)
        tokens = self.tokenize(text, add_special=True, parse_special=True)
        if len(tokens) > 1 and tokens[0] == tokens[1] == bos:  # the template wrote the BOS llama.cpp adds
            del tokens[0]
        return tokens

    def _special_text(self, token: int) -> str:
        if token == llama_cpp.LLAMA_TOKEN_NULL:
            return ""
        return llama_cpp.llama_vocab_get_text(self._vocab, token).decode("utf-8", errors="replace")

    # --- evaluation --------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the context memory (KV cache and recurrent state) and its checkpoints."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)
        self._cached = []
        if self.checkpoints is not None:
            self.checkpoints.clear()

    def eval(self, tokens: Sequence[int], every_row: bool = False) -> None:
        """Append `tokens` to the context, in batches of n_batch; logits of the last one are kept
        (of every one with `every_row`, within one batch)."""
        if len(self._cached) + len(tokens) > self.n_ctx:
            raise UserError(f"{len(self._cached) + len(tokens)} tokens do not fit the context of {self.n_ctx}")
        for start in range(0, len(tokens), self.n_batch):
            chunk = list(tokens[start : start + self.n_batch])
            arr = (llama_cpp.llama_token * len(chunk))(*chunk)
            batch = llama_cpp.llama_batch_get_one(arr, len(chunk))
            if self.output_every_token or every_row:
                if self.output_every_token and not self.all_outputs:  # llama.cpp aborts on more outputs than n_outputs_max
                    raise RuntimeError("output_every_token needs an engine loaded with all_outputs=True")
                outputs = (ctypes.c_int8 * len(chunk))(*[1] * len(chunk))
                batch.logits = ctypes.cast(outputs, type(batch.logits))
            if self.before_decode is not None:
                self.before_decode(len(chunk))
            rc = llama_cpp.llama_decode(self._ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed with code {rc}")
            if self.drafter is not None:
                self.drafter.follow(chunk, len(self._cached))
            self._cached.extend(chunk)

    def logits(self, row: int = -1) -> np.ndarray:
        """A copy of the logits after the last evaluated token (after token `row` of the last batch)."""
        ptr = llama_cpp.llama_get_logits_ith(self._ctx, row)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def token_logprob(self, token: int, top: int, row: int = -1) -> TokenLogprob:
        """`token`'s log probability after the last evaluated token (or `row`), and the `top`
        likeliest tokens'."""
        logits = self.logits(row).astype(np.float64)
        logprobs = logits - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))

        def entry(t: int) -> tuple[str, bytes, float]:
            data = self.token_bytes(int(t))
            return data.decode("utf-8", errors="replace"), data, float(logprobs[t])

        best = []
        if top > 0:  # a partial sort: a full one of a 248k vocabulary costs more than a decode step
            best = np.argpartition(-logprobs, min(top, self.n_vocab - 1))[:top]
            best = best[np.argsort(-logprobs[best], kind="stable")]
        text, data, logprob = entry(token)
        return TokenLogprob(text, data, logprob, [entry(t) for t in best])

    def check_grammar(self, grammar: str) -> None:
        """PromptError unless llama.cpp's grammar sampler accepts the GBNF text `grammar`."""
        sampler = _grammar_sampler(self._vocab, grammar)
        llama_cpp.llama_sampler_free(sampler)

    def prepare(self, prompt: Sequence[int], checkpoint_at: Sequence[int] = ()) -> int:
        """Make the context hold exactly `prompt`, reusing the longest prefix it shares with what is
        cached: all of it when the prompt extends the cache; else, attention-only models trim their
        KV cache, and hybrid ones restart from the longest checkpoint of their recurrent state
        within it. On hybrid models, checkpoints are taken at the `checkpoint_at` positions (turn
        boundaries). Returns how many prompt tokens were reused."""
        prompt = list(prompt)
        common = next((i for i, (a, b) in enumerate(zip(self._cached, prompt)) if a != b),
                      min(len(self._cached), len(prompt)))
        keep = min(common, len(prompt) - 1)  # the last prompt token is evaluated for its logits
        if 0 < keep == len(self._cached) or (0 < keep and self.checkpoints is None and self._trim(keep)):
            reused = keep
        elif self.checkpoints is not None and (checkpoint := self.checkpoints.best(prompt, keep)) and self._restore(checkpoint):
            reused = len(checkpoint.tokens)
        else:
            self.reset()
            reused = 0
        if self.checkpoints is not None:
            self.checkpoints.retain(prompt)
        start = reused
        for at in sorted(set(checkpoint_at)) if self.checkpoints is not None else ():
            if start < at <= len(prompt):
                self.eval(prompt[start:at])
                self._checkpoint()
                start = at
        if start < len(prompt):
            self.eval(prompt[start:])
        return reused

    def _trim(self, n: int) -> bool:
        """Drop the cached tokens after the first `n`; False where the memory cannot (recurrent)."""
        if not llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self._ctx), 0, n, -1):
            return False
        del self._cached[n:]
        return True

    def _checkpoint(self) -> None:
        """Keep the recurrent state after the cached tokens as a checkpoint."""
        flags = llama_cpp.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY
        size = llama_cpp.llama_state_seq_get_size_ext(self._ctx, 0, flags)
        state = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data_ext(self._ctx, state, size, 0, flags)
        if written == size:
            self.checkpoints.add(tuple(self._cached), bytes(state))

    def _restore(self, checkpoint) -> bool:
        """Restore a checkpoint's recurrent state, then drop the KV cache after its tokens (in this
        order: the hybrid memory refuses the trim before the restore)."""
        flags = llama_cpp.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY
        state = (ctypes.c_uint8 * len(checkpoint.state)).from_buffer_copy(checkpoint.state)
        if not llama_cpp.llama_state_seq_set_data_ext(self._ctx, state, len(checkpoint.state), 0, flags):
            return False
        return self._trim(len(checkpoint.tokens))

    # --- generation --------------------------------------------------------------------------------
    def generate(
        self,
        prompt: Sequence[int],
        *,
        max_tokens: int = 128,
        sampling: SamplingParams | None = None,
        stop: Sequence[str] = (),
        cancel: threading.Event | None = None,
        checkpoint_at: Sequence[int] = (),
        grammar: str | None = None,
        thinking: Thinking | None = None,
        logprobs: int | None = None,
    ) -> Iterator[TokenEvent]:
        """Stream tokens after `prompt`. Text is whole UTF-8 characters; stop strings are cut out.
        Setting `cancel` (from any thread) ends the generation before its next token; a hybrid model
        keeps checkpoints at the `checkpoint_at` prompt positions (see `prepare`). `grammar`
        (GBNF) constrains the reply after any thinking (`thinking`); `logprobs` (the number of top
        alternatives, 0 for none) adds each token's log probability to its event."""
        self.check_prompt(prompt)
        stats = GenerationStats(prompt_tokens=len(prompt))
        sampler = Sampler(self, sampling or SamplingParams(), history=prompt, grammar=grammar)
        think = ThinkTracker(thinking, lambda text: self.tokenize(text, add_special=False, parse_special=True))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text_filter = StopFilter(stop)
        budget = min(max_tokens, self.n_ctx - len(prompt))
        speculation = Speculation(self, stats) if self.drafter is not None else None
        row = lambda: speculation.row if speculation is not None else -1  # noqa: E731
        self.live.generation_started(stats)
        try:
            t0 = time.perf_counter()
            stats.cached_prompt_tokens = self.prepare(prompt, checkpoint_at)
            # llama_decode returns before an accelerator (CUDA, ggml-rpc) has computed the batch:
            # wait here, or the prompt's time lands in the first token's decode time
            llama_cpp.llama_synchronize(self._ctx)
            stats.prompt_seconds = time.perf_counter() - t0
            t_decode = time.perf_counter()
            held = 0.0  # seconds the consumer held tokens (printing, sending): not the engine's time
            while True:
                if cancel is not None and cancel.is_set():
                    stats.finish_reason = "cancelled"
                    return
                token = think.forced_token()
                if token is None:
                    token = sampler.sample(constrained=not think.active, row=row())
                else:
                    sampler.accept(token)
                logprob = self.token_logprob(token, logprobs, row()) if logprobs is not None else None
                stats.completion_tokens += 1
                if stats.completion_tokens == 1:
                    stats.ttft_seconds = time.perf_counter() - t0
                if self.is_end_of_generation(token):
                    stats.completion_tokens -= 1
                    stats.finish_reason = "stop"
                    tail = text_filter.flush(decoder.decode(b"", final=True))
                    yield TokenEvent(None, tail, stats, logprob)
                    return
                piece = decoder.decode(self.token_bytes(token))
                think.saw(piece)
                text, stopped = text_filter.feed(piece)
                if stopped:
                    stats.finish_reason = "stop"
                elif stats.completion_tokens >= budget:
                    stats.finish_reason = "length"
                    text += text_filter.flush(decoder.decode(b"", final=True))
                handed = time.perf_counter()
                stats.decode_seconds = handed - t_decode - held
                yield TokenEvent(token, text, stats, logprob)
                held += time.perf_counter() - handed
                if stats.finish_reason:
                    return
                # Evaluated once the consumer asks for the next token: it can hand this one on first
                # (a server thread then sends it while llama.cpp computes).
                if speculation is not None:
                    speculation.advance(token, budget - stats.completion_tokens)
                else:
                    self.eval([token])
        except GeneratorExit:  # the consumer stopped reading (perhaps right after the last token)
            stats.finish_reason = stats.finish_reason or "cancelled"
            raise
        except Exception:
            stats.finish_reason = "error"
            self.reset()  # a failed decode leaves the context memory in an unknown state
            raise
        finally:
            if speculation is not None and stats.finish_reason != "error":
                speculation.finish()
            sampler.close()
            self.live.generation_finished(stats)

    def check_prompt(self, prompt: Sequence[int]) -> None:
        """PromptError unless `prompt` leaves room in the context for at least one new token."""
        if not prompt:
            raise PromptError("the prompt is empty")
        if len(prompt) >= self.n_ctx:
            raise PromptError(
                f"the prompt is {len(prompt)} tokens, which leaves no room in the context of {self.n_ctx} tokens"
            )

    def greedy(self, prompt: Sequence[int], n: int) -> list[int]:
        """The `n` greedy tokens after `prompt` (stops early at end of generation)."""
        return [e.token for e in self.generate(prompt, max_tokens=n) if e.token is not None]
