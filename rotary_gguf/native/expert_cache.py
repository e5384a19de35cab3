"""The expert cache's native side (experts/cache.py): slot buffers on the accelerator, uploads,
and the hot path of csrc/expert_cache.c with its split-compute worker."""

from __future__ import annotations

import ctypes
import weakref

import numpy as np

from ..errors import UserError
from .backends import buffer_type_name
from .callbacks import EvalCallback, _native_library
from .ggml import _buffer_base, _buffer_clear, _buffer_free, _buffer_is_host, _buft_alloc_buffer, _tensor_set, c_void_p


def alloc_buffer(buft: int, size: int) -> int:
    """A backend buffer of `size` bytes of buffer type `buft`; free it with `free_buffer`."""
    buf = _buft_alloc_buffer(buft, size)
    if not buf:
        raise UserError(f"could not allocate {size} bytes of {buffer_type_name(buft)}")
    return buf


def buffer_base(buf: int) -> int:
    return _buffer_base(buf)


def clear_buffer(buf: int) -> None:
    """Set every byte of a backend buffer to zero (a zero block is 0.0 in every ggml type)."""
    _buffer_clear(buf, 0)


def free_buffer(buf: int) -> None:
    _buffer_free(buf)


def buffer_is_host(buf: int) -> bool:
    return bool(_buffer_is_host(buf))


def tensor_set(tensor: int, src: int, offset: int, size: int) -> None:
    """Copy `size` bytes from host address `src` into `tensor` at byte `offset` (any backend)."""
    _tensor_set(tensor, src, offset, size)


def set_tensor_bytes(tensor: int, data: bytes) -> None:
    """Write all bytes a tensor spans (as `tensor_bytes` read them), on any backend."""
    _tensor_set(tensor, data, 0, len(data))


# --- the expert cache's hot path (csrc/expert_cache.c) -------------------------------------------
EXPERT_CACHE_MODES = {"host": 0, "cached": 1, "look": 2, "split": 3}
SPLIT_ROLES = {"gate_up": 0, "gate": 1, "up": 2, "down": 3}


class NativeExpertCache:
    """The native hot path of one context's expert cache (decayed-LFU policy, uploads, id and
    probability remap). Hand `callback` and `user_data` to the context; in "look" mode every
    question goes to `look` (a Python EvalCallback). hits and misses [n_layer] and slot_of(layer)
    [n_expert] are views of C memory."""

    def __init__(self, n_layer: int, n_expert: int, n_used: int, slots: int, decay: float, look):
        lib = _native_library()
        handle = lib.expert_cache_new(n_layer, n_expert, n_used, slots, decay, look)
        if not handle:
            raise UserError(f"could not set up the expert cache for {n_layer} blocks of {n_expert} experts")
        self._lib, self.user_data, self._look = lib, handle, look
        self.callback = EvalCallback(ctypes.cast(lib.expert_cache_eval, c_void_p).value)
        self.n_expert = n_expert
        self.hits = np.ctypeslib.as_array(lib.expert_cache_hits(handle), shape=(n_layer,))
        self.misses = np.ctypeslib.as_array(lib.expert_cache_misses(handle), shape=(n_layer,))
        self._uploaded = lib.expert_cache_uploaded_bytes(handle)
        self._failures = lib.expert_cache_failures(handle)
        self._free = weakref.finalize(self, lib.expert_cache_free, handle)

    def set_mode(self, mode: str) -> None:
        self._lib.expert_cache_set_mode(self.user_data, EXPERT_CACHE_MODES[mode])

    def set_weight(self, layer: int, index: int, tensor: int, host: int, expert_bytes: int) -> None:
        if not self._lib.expert_cache_set_weight(self.user_data, layer, index, tensor, host, expert_bytes):
            raise ValueError(f"no room for expert weight {index} of block {layer}")

    def reset(self) -> None:
        self._lib.expert_cache_reset(self.user_data)

    def set_tap(self, tap) -> None:
        """Also record every selection into `tap` (a MoeTap, or anything holding one's `user_data`),
        in place of the tap's own callback; None stops."""
        self._lib.expert_cache_set_tap(self.user_data, tap.user_data if tap is not None else None)
        self._tap = tap  # the tap's memory must outlive its use here

    def slot_of(self, layer: int) -> np.ndarray:
        return np.ctypeslib.as_array(self._lib.expert_cache_slot_of(self.user_data, layer), shape=(self.n_expert,))

    @property
    def uploaded_bytes(self) -> int:
        return int(self._uploaded[0])

    @property
    def failures(self) -> int:
        """topk nodes the hot path could not serve (the output of that call is wrong)."""
        return int(self._failures[0])

    # split compute (csrc/split_compute.c)
    def enable_split(self, n_embd: int, n_ff: int, max_tokens: int, n_threads: int) -> None:
        """Start the CPU worker that computes missed experts during split mode."""
        if not self._lib.expert_cache_enable_split(self.user_data, n_embd, n_ff, max_tokens, n_threads):
            raise UserError("could not start the split-compute CPU worker")
        self._wait_ns = self._lib.expert_cache_wait_ns(self.user_data)
        self._cpu_ns = self._lib.expert_cache_cpu_ns(self.user_data)
        self._hot_ns = self._lib.expert_cache_hot_ns(self.user_data)

    def set_split_weight(self, layer: int, role: str, ggml_type: int, ne0: int, ne1: int, host: int) -> None:
        """The host copy of one expert weight of `layer` ([ne0, ne1, n_expert]) for the CPU worker."""
        if not self._lib.expert_cache_set_split_weight(self.user_data, layer, SPLIT_ROLES[role], ggml_type, ne0, ne1, host):
            raise ValueError(f"block {layer} has no split weight {role!r}")

    def admit_pending(self, budget_bytes: int | None) -> int:
        """Upload experts missed in split mode into slots, at most `budget_bytes` (None: no limit)."""
        return int(self._lib.expert_cache_admit_pending(self.user_data, -1 if budget_bytes is None else budget_bytes))

    @property
    def cpu_seconds(self) -> float:
        """Time the CPU worker spent computing missed experts."""
        return int(self._cpu_ns[0]) / 1e9

    @property
    def wait_seconds(self) -> float:
        """Time the graph waited for the CPU worker."""
        return int(self._wait_ns[0]) / 1e9

    @property
    def hot_path_seconds(self) -> float:
        """Time split mode's callbacks spent on their own reads, remaps and writes."""
        return int(self._hot_ns[0]) / 1e9
