"""The live expert cache: which host experts hold a slot in accelerator memory, per MoE block, and
split compute (hits on the accelerator while a CPU worker computes the misses). The control plane
is here; the hot path is C (csrc/expert_cache.c and csrc/split_compute.c, through `native`).
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from dataclasses import dataclass

import llama_cpp
import numpy as np

from .. import arch as names
from .. import native
from ..errors import UserError
from ..log import logger
from .policies import DEFAULT_DECAY, CacheStats, Policy, Trace, fits, make_policy, play_step, total

TOPK_PREFIX = b"ffn_moe_topk-"
RECENT_SECONDS = 10.0  # the window of the "recent" hit rate and upload speed
SAMPLE_SECONDS = 0.25  # snapshots closer together than this share a sample
SELF_CHECK_TEXT = "The cache checks itself once."
# Split compute serves decode calls of up to this many tokens (decode, drafts, short turns); longer
# prompt batches take llama.cpp's own path and leave the slots as decode filled them.
SPLIT_MAX_TOKENS = 16
# What the cache relies on: the llama-cpp-python whose ggml it was verified against, and struct
# ggml_tensor's layout there (ggml.h): the fields it rebinds and the name it reads.
VERIFIED_LLAMA_CPP_PYTHON = ("0.3.36",)
GGML_TENSOR_OFFSETS = {"buffer": 8, "ne": 16, "nb": 48, "src": 152, "view_src": 232, "data": 248, "name": 256}


def platform_problem() -> str | None:
    """Why the live cache cannot run on this llama-cpp-python, or None."""
    version = getattr(llama_cpp, "__version__", "unknown")
    if version not in VERIFIED_LLAMA_CPP_PYTHON:
        return f"llama-cpp-python {version} is not one the cache was verified with ({', '.join(VERIFIED_LLAMA_CPP_PYTHON)})"
    wrong = [f for f, offset in GGML_TENSOR_OFFSETS.items() if getattr(native.GgmlTensor, f).offset != offset]
    if wrong:
        return f"struct ggml_tensor is laid out differently than expected ({', '.join(wrong)})"
    return None


class TraceRecorder:
    """An eval callback that records every `ffn_moe_topk-<layer>` selection into a Trace: hand
    `callback` and `user_data` to Engine.load (its `telemetry` argument). Python, so it costs
    about a microsecond per graph node: for tests and the simulator, not for serving."""

    user_data = None

    def __init__(self, n_expert: int, n_expert_used: int):
        self.trace = Trace(n_expert, n_expert_used)
        self.callback = native.EvalCallback(self._eval)

    def _eval(self, tensor, ask, _user_data) -> bool:
        t = native.GgmlTensor.from_address(tensor)
        if ask:
            return t.name.startswith(TOPK_PREFIX)
        layer = int(t.name[len(TOPK_PREFIX):])
        ids = topk_ids(tensor, t)
        self.trace.record(layer, ids.tolist())
        return True


def topk_ids(tensor: int, t: native.GgmlTensor) -> np.ndarray:
    """[n_tokens, n_used] expert ids of a topk view, wherever it lives."""
    raw = np.frombuffer(native.tensor_bytes(tensor), dtype=np.uint8)
    n_used, n_tokens, row = t.ne[0], t.ne[1], t.nb[1]
    padded = np.zeros(n_tokens * row, dtype=np.uint8)
    padded[: raw.size] = raw
    return padded.reshape(n_tokens, row)[:, : n_used * 4].copy().view(np.int32)


# --- the live cache ---------------------------------------------------------------------------
WEIGHT_NODES = ("ffn_moe_gate", "ffn_moe_up", "ffn_moe_down", "ffn_moe_gate_up")  # MUL_MAT_ID nodes


@dataclass
class _ExpertTensor:
    """A host-resident expert weight of one block, and its slot buffer on the accelerator."""

    handle: int  # struct ggml_tensor *
    host_buffer: int
    host_data: int
    n_expert: int
    expert_bytes: int  # nb[2]
    slot_buffer: int = 0
    slot_base: int = 0


class ExpertCache:
    """Serves the experts of host-resident blocks from `slots` slots per block on the accelerator.

    Load with it (Engine.load(..., expert_cache=cache)), host experts in ggml's standard layout
    (Placement(repack=False)): it becomes the eval callback, and `attach(engine)` finds the host
    expert tensors with one look-only decode, allocates the slots and checks itself. Before each decode
    call, `before_decode(n_tokens)` binds the expert tensors to their slots, or, for a batch that
    could need more distinct experts than the slots hold, leaves them on the host (llama.cpp's own
    path for that call). At each block's `ffn_moe_topk` node the selected experts are admitted by
    the policy, misses uploaded, and the ids and routing probabilities rewritten to slot numbers.

    hot_path "native" runs that last step in C (csrc/expert_cache.c, decayed LFU only); "python"
    runs it here with any policy, and can record what it sees in `trace`.

    With `split`, misses are not uploaded: they go to an extra all-zero slot while a CPU worker
    computes them (csrc/split_compute.c) and fills their outputs in before the block's sum; missed
    experts are admitted into slots by `before_decode`, between calls, `upload_budget` bytes at most.
    Any slot count from 0 works; batches of up to SPLIT_MAX_TOKENS tokens are split.
    """

    user_data = None

    def __init__(self, n_layer: int, n_expert: int, n_expert_used: int, slots: int, accelerator_buft: int,
                 policy: str = "lfu-decay", hot_path: str = "native", *, split: bool = False,
                 upload_budget: int | None = None, n_threads: int = 0):
        split = split and slots < n_expert  # with a slot for every expert nothing is left for the CPU
        if split and not 0 <= slots < n_expert:
            raise UserError(f"split compute needs 0..{n_expert} slots per block, not {slots}")
        if not split and not n_expert_used <= slots <= n_expert:
            raise UserError(f"the expert cache needs {n_expert_used}..{n_expert} slots per block, not {slots}")
        if hot_path not in ("native", "python"):
            raise ValueError(f"unknown hot path {hot_path!r}")
        if hot_path == "native" and policy != "lfu-decay":
            raise UserError(f"the native expert cache runs the lfu-decay policy, not {policy!r}")
        if split and hot_path != "native":
            raise ValueError("split compute runs on the native hot path only")
        # Split compute: misses computed by a CPU worker while the accelerator computes the hits,
        # into one extra all-zero slot; missed experts admitted between calls, `upload_budget`
        # bytes per call at most (None: no limit).
        self.split, self.upload_budget, self.n_threads = split, upload_budget, n_threads
        self.n_expert, self.n_expert_used, self.slots = n_expert, n_expert_used, slots
        self.policy_name, self.buft = policy, accelerator_buft
        self.tensors: dict[int, list[_ExpertTensor]] = {}  # layer -> its host expert tensors
        self.policies: dict[int, Policy] = {}
        self.stats: dict[int, CacheStats] = {}
        self.uploaded_bytes = self.fallback_calls = 0  # fallback_calls: decode calls on llama.cpp's path
        self.split_tokens = 0  # tokens of the decode calls split compute served
        self._samples: deque[tuple[float, int, int, int]] = deque()  # (time, hits, misses, uploaded bytes)
        self._samples_lock = threading.Lock()  # snapshot() readers on several threads
        self.trace: Trace | None = None  # set to a Trace to record the steps the cache sees (python)
        self._mode = "look"  # look: find tensors; cached or split: serve; host: llama.cpp's path; off
        self.disabled_reason: str | None = None
        self._python_callback = native.EvalCallback(self._eval)
        self._native = None
        if hot_path == "native":
            self._native = native.NativeExpertCache(n_layer, n_expert, n_expert_used, slots, DEFAULT_DECAY,
                                                    self._python_callback)
            self.callback, self.user_data = self._native.callback, self._native.user_data
        else:
            self.callback = self._python_callback

    @classmethod
    def on_device(cls, inv, slots: int, device: str, **options) -> "ExpertCache":
        """A cache of `slots` slots per host block of model `inv` (its Inventory), in the memory
        of ggml device `device` (e.g. "CUDA0"); `options` as the constructor's (split, ...)."""
        buft = native.device_by_name(device).buffer_type
        return cls(inv.n_layer, inv.n_expert, inv.n_expert_used, slots, buft, **options)

    @classmethod
    def for_plan(cls, plan, inv, *, n_threads: int = 0) -> "ExpertCache | None":
        """The cache a plan sized (slots per host block on its accelerator, split or uploading
        misses), or None when the plan has none. `inv` is the planned model's inventory."""
        if plan is None or plan.expert_cache is None:
            return None
        cache = plan.expert_cache
        return cls.on_device(inv, cache.slots, plan.accelerator.name, split=cache.split,
                             upload_budget=cache.upload_budget, n_threads=n_threads)

    @property
    def buffer_type(self) -> str:
        """The name of the accelerator buffer type its slots are allocated in (e.g. "RPC0[host:port]")."""
        return native.buffer_type_name(self.buft)

    @property
    def slot_bytes(self) -> int:
        """Accelerator bytes allocated for the slots (and split compute's zero slot)."""
        return sum(self._slots_allocated * t.expert_bytes for tensors in self.tensors.values() for t in tensors if t.slot_buffer)

    @property
    def _slots_allocated(self) -> int:
        return self.slots + 1 if self.split else self.slots

    @property
    def _serving_mode(self) -> str:
        return "split" if self.split else "cached"

    @property
    def enabled(self) -> bool:
        return self._mode != "off"

    def _set_mode(self, mode: str) -> None:
        self._mode = mode
        if self._native is not None:
            self._native.set_mode(mode if mode in ("look", "cached", "split") else "host")

    # --- control plane -----------------------------------------------------------------------
    def attach(self, engine) -> None:
        """Find the host expert tensors (one look-only decode, then forgotten), allocate the
        slots and check that a cached decode gives the uncached logits; on any failed check the
        cache turns itself off (`disabled_reason` says why) and llama.cpp's own path runs."""
        problem = platform_problem()
        if problem:
            self.disable(problem)
            return
        engine.reset()
        engine.eval(engine.tokenize("a")[:1])
        engine.reset()
        self._set_mode("host")
        if not self.tensors:
            self.disable("no host-resident expert tensors in this placement")
            return
        for layer, tensors in self.tensors.items():
            for t in tensors:
                t.slot_buffer = native.alloc_buffer(self.buft, self._slots_allocated * t.expert_bytes)
                t.slot_base = native.buffer_base(t.slot_buffer)
                if self.split:
                    native.clear_buffer(t.slot_buffer)  # the zero slot: its experts output exactly 0
            for index, t in enumerate(tensors if self._native is not None else ()):
                self._native.set_weight(layer, index, t.handle, t.host_data, t.expert_bytes)
        if self.split:
            problem = self._start_split_worker()
            if problem:
                self.disable(problem)
                return
        self._reset_policies()
        if not self._self_check(engine):
            self.disable("a cached decode did not reproduce the uncached logits")
            return
        self._reset_policies()  # the check's uploads and counts are not the user's

    def _start_split_worker(self) -> str | None:
        """Hand the host expert weights to the CPU worker by role; why it cannot run, or None."""
        shapes = set()
        for layer, tensors in self.tensors.items():
            roles = {}
            for t in tensors:
                g = native.GgmlTensor.from_address(t.handle)
                role = names.expert_kind(g.name.decode())
                if role is None:
                    return f"block {layer}: an expert weight named {g.name.decode()!r} is not one split compute knows"
                roles[role] = g
                self._native.set_split_weight(layer, role, g.type, g.ne[0], g.ne[1], t.host_data)
            if "down" not in roles or not ("gate_up" in roles or {"gate", "up"} <= roles.keys()):
                return f"block {layer}: split compute needs down and gate+up expert weights on the host"
            shapes.add((roles["down"].ne[1], roles["down"].ne[0]))  # (n_embd, n_ff)
        if len(shapes) != 1:
            return "split compute needs the same expert shape in every block"
        (n_embd, n_ff), = shapes
        self._native.enable_split(n_embd, n_ff, SPLIT_MAX_TOKENS, self.n_threads or os.cpu_count() or 1)
        return None

    def count_routing(self, telemetry) -> None:
        """Count every routing selection into `telemetry` (a RoutingTelemetry) from this cache's
        callback: a context has one eval callback. Counting goes on when the cache is off."""
        if self._native is None:
            raise ValueError("routing telemetry needs the native hot path of the expert cache")
        self._native.set_tap(telemetry)

    def _reset_policies(self) -> None:
        # (the native hot path keeps its own policy state; these stand for the blocks it serves)
        self.policies = {layer: make_policy(self.policy_name, max(self.slots, 1), self.n_expert) for layer in self.tensors}
        self.stats = {layer: CacheStats() for layer in self.tensors}
        self.uploaded_bytes = self.fallback_calls = self.split_tokens = 0
        with self._samples_lock:
            self._samples.clear()
        if self._native is not None:
            self._native.reset()
        if self.trace is not None:
            self.trace = Trace(self.n_expert, self.n_expert_used)

    def _self_check(self, engine) -> bool:
        """Token-by-token decode of a short text with the experts on the host, then cached."""
        tokens = engine.tokenize(SELF_CHECK_TEXT)
        runs = []
        for cached in (False, True):
            engine.reset()
            logits = []
            for token in tokens:
                self._bind(cached)
                if cached and self.split:
                    self._native.admit_pending(None)  # the first token splits, the later ones hit too
                self._set_mode(self._serving_mode if cached else "host")
                engine.before_decode, hook = None, engine.before_decode
                try:
                    engine.eval([token])
                finally:
                    engine.before_decode = hook
                logits.append(engine.logits())
            runs.append(np.array(logits))
        engine.reset()
        self._bind(False)
        self._set_mode("host")
        return bool(np.array_equal(runs[0], runs[1]))

    def disable(self, reason: str) -> None:
        """Turn the cache off for good: experts back on the host, slots freed."""
        self.close()
        self.policies, self.disabled_reason = {}, reason
        self._set_mode("off")
        logger.warning(f"expert cache off: {reason}")

    def before_decode(self, n_tokens: int) -> None:
        """Bind the experts to their slots for this call, or leave them on the host when the
        batch could select more distinct experts than the slots hold (split compute: when it is
        longer than SPLIT_MAX_TOKENS). Split compute admits the experts missed so far first."""
        if not self.policies:
            return
        if self._native is not None and self._native.failures:
            self.disable("the native hot path met a routing node it could not serve")
            return
        if self.split and n_tokens <= SPLIT_MAX_TOKENS:
            self.split_tokens += n_tokens
            self._bind(True)  # first: uploads go to the slots, never into the host copy
            self._native.admit_pending(self.upload_budget)  # between calls: off the token's path
            self._set_mode("split")
        elif not self.split and fits(n_tokens, self.n_expert_used, self.slots):
            self._bind(True)
            self._set_mode("cached")
        else:
            self._bind(False)
            self._set_mode("host")
            self.fallback_calls += 1
            for s in self.stats.values():
                s.fallback_steps += 1
                s.steps += 1

    def close(self) -> None:
        self._bind(False)
        for tensors in self.tensors.values():
            for t in tensors:
                if t.slot_buffer:
                    native.free_buffer(t.slot_buffer)
                    t.slot_buffer = t.slot_base = 0

    def _bind(self, to_slots: bool) -> None:
        for tensors in self.tensors.values():
            for t in tensors:
                g = native.GgmlTensor.from_address(t.handle)
                if to_slots:
                    g.buffer, g.data, g.ne[2] = t.slot_buffer, t.slot_base, self._slots_allocated
                else:
                    g.buffer, g.data, g.ne[2] = t.host_buffer, t.host_data, t.n_expert
                g.nb[3] = g.ne[2] * g.nb[2]

    # --- the eval callback --------------------------------------------------------------------
    def _eval(self, tensor, ask, _user_data) -> bool:
        t = native.GgmlTensor.from_address(tensor)
        if ask:
            if self._mode == "look":
                self._look(t)
                return False
            return self._mode == "cached" and t.name.startswith(TOPK_PREFIX)
        self._remap(tensor, t, int(t.name[len(TOPK_PREFIX):]))
        return True

    def _look(self, t: native.GgmlTensor) -> None:
        kind, _, layer = t.name.decode().rpartition("-")
        if kind not in WEIGHT_NODES or not layer.isdigit() or not t.src[0]:
            return
        w = native.GgmlTensor.from_address(t.src[0])
        if w.ne[2] != self.n_expert or not w.buffer or not native.buffer_is_host(w.buffer):
            return
        known = self.tensors.setdefault(int(layer), [])
        if all(k.handle != t.src[0] for k in known):
            known.append(_ExpertTensor(t.src[0], w.buffer, w.data, w.ne[2], w.nb[2]))

    def _remap(self, tensor: int, t: native.GgmlTensor, layer: int) -> None:
        tensors = self.tensors.get(layer)
        if not tensors:
            return
        ids = topk_ids(tensor, t)
        if self.trace is not None:
            self.trace.record(layer, ids.tolist())
        uploads = play_step(self.policies[layer], ids.ravel().tolist(), self.stats[layer])
        if uploads is None:  # cannot happen: before_decode bounds the distinct experts
            raise RuntimeError(f"block {layer}: a batch needs more experts than the {self.slots} slots hold")
        for expert, slot in uploads:
            for w in tensors:
                native.tensor_set(w.handle, w.host_data + expert * w.expert_bytes, slot * w.expert_bytes, w.expert_bytes)
                self.uploaded_bytes += w.expert_bytes
        slot_of = self.policies[layer].slot_of
        slots = np.vectorize(slot_of.__getitem__, otypes=[np.int32])(ids)
        # the topk view: rewrite the ids in its rows, keep the bytes between them
        raw = bytearray(native.tensor_bytes(tensor))
        row = t.nb[1]
        for i in range(ids.shape[0]):
            raw[i * row : i * row + 4 * ids.shape[1]] = slots[i].tobytes()
        native.set_tensor_bytes(tensor, bytes(raw))
        # the routing weights are gathered from the probabilities with the remapped ids
        probs_handle = native.GgmlTensor.from_address(t.view_src).src[0]
        p = native.GgmlTensor.from_address(probs_handle)
        probs = np.frombuffer(native.tensor_bytes(probs_handle), dtype=np.float32).copy()
        stride = p.nb[1] // 4
        for i in range(ids.shape[0]):
            r = probs[i * stride : i * stride + self.n_expert]
            r[slots[i]] = r[ids[i]].copy()
        native.set_tensor_bytes(probs_handle, probs.tobytes())

    def summary(self) -> CacheStats:
        if self._native is not None:
            for layer, s in self.stats.items():
                s.hits, s.misses = int(self._native.hits[layer]), int(self._native.misses[layer])
            self.uploaded_bytes = self._native.uploaded_bytes
        return total(self.stats)

    def resident(self) -> dict[int, list[int]]:
        """The experts in the slots of each block."""
        if self._native is not None:
            return {layer: np.flatnonzero(self._native.slot_of(layer) >= 0).tolist() for layer in self.policies}
        return {layer: sorted(p.slot_of) for layer, p in self.policies.items()}

    def snapshot(self) -> dict:
        """The figures front ends show: hit rates (overall, per block, and recent: over about the
        last RECENT_SECONDS), uploaded bytes (and per second, recent), the residents of each block
        (file positions). Any number of readers may call it, from any thread."""
        now = time.monotonic()
        overall = self.summary()
        with self._samples_lock:
            if not self._samples or now - self._samples[-1][0] >= SAMPLE_SECONDS:
                self._samples.append((now, overall.hits, overall.misses, self.uploaded_bytes))
            while len(self._samples) > 1 and now - self._samples[1][0] >= RECENT_SECONDS:
                self._samples.popleft()
            then, hits, misses, uploaded = self._samples[0]
        recent = CacheStats(hits=overall.hits - hits, misses=overall.misses - misses)
        return {
            "enabled": self.enabled,
            "disabled_reason": self.disabled_reason,
            "slots": self.slots,
            "policy": self.policy_name,
            "hits": overall.hits,
            "misses": overall.misses,
            "hit_rate": overall.hit_rate,
            "recent_hit_rate": recent.hit_rate if recent.hits + recent.misses else overall.hit_rate,
            "layer_hit_rate": {layer: s.hit_rate for layer, s in self.stats.items()},
            "fallback_calls": self.fallback_calls,
            "uploaded_bytes": self.uploaded_bytes,
            "uploaded_bytes_per_s": (self.uploaded_bytes - uploaded) / (now - then) if now > then else 0.0,
            "resident": self.resident(),
            # split compute: hits ran on the accelerator, misses on the CPU worker meanwhile
            "split": self.split,
            "upload_budget": self.upload_budget,
            **self._split_figures(),
        }

    def _split_figures(self) -> dict:
        """Split compute's per-token figures: the CPU worker's time, the time the graph waited for
        it, and the bytes admitted into slots, over the tokens it served."""
        live = self.split and self._native is not None and bool(self.policies)
        cpu = self._native.cpu_seconds if live else 0.0
        wait = self._native.wait_seconds if live else 0.0
        hot = self._native.hot_path_seconds if live else 0.0
        per_token = lambda total: total / self.split_tokens if self.split_tokens else 0.0  # noqa: E731
        return {"split_tokens": self.split_tokens, "cpu_seconds": cpu, "cpu_wait_seconds": wait, "hot_seconds": hot,
                "cpu_seconds_per_token": per_token(cpu), "cpu_wait_seconds_per_token": per_token(wait),
                "hot_seconds_per_token": per_token(hot), "uploaded_bytes_per_token": per_token(self.uploaded_bytes)}
