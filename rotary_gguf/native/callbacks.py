"""Native eval callbacks compiled from csrc/: the routing tap, and reading tensors from any backend."""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import weakref
from functools import cache
from pathlib import Path

import llama_cpp
import numpy as np

from ..errors import UserError
from ..user_cache import cache_dir
from .ggml import LIB_DIR, _nbytes, _tensor_get, c_size_t, c_void_p

# --- native eval callbacks (csrc/): the routing tap and the expert cache's hot path ---------------
# llama.cpp calls the eval callback for every graph node; a Python callback costs ~0.3 us a call,
# more than a whole decode step of a small model is worth. Both answer in C and keep their figures
# in memory that numpy views read in place. They are compiled on first use, into one library in a
# cache folder, so the expert cache can record into a tap from its own callback.
NATIVE_SOURCES = tuple(Path(__file__).parent.parent / "csrc" / name for name in ("moe_tap.c", "expert_cache.c", "split_compute.c"))
NATIVE_HEADERS = tuple(Path(__file__).parent.parent / "csrc" / name for name in ("topk.h", "split_compute.h"))
GGML_INCLUDE_DIR = Path(llama_cpp.__file__).parent.parent / "include"  # installed with llama-cpp-python
EvalCallback = llama_cpp.ggml_backend_sched_eval_callback


def _build_native(sources: tuple[Path, ...], purpose: str) -> Path:
    """The library compiled from `sources` for these headers and this ggml; built once, then
    reused. `purpose` names it in errors ("the native eval callbacks")."""
    headers = [GGML_INCLUDE_DIR / h for h in ("ggml.h", "ggml-backend.h", "ggml-cpu.h")]
    if not all(h.exists() for h in headers):
        raise UserError(f"the ggml headers are missing from {GGML_INCLUDE_DIR}; re-run the setup to reinstall llama-cpp-python")
    key = hashlib.sha256(b"".join(p.read_bytes() for p in (*sources, *NATIVE_HEADERS, *headers)) + str(LIB_DIR).encode())
    target = cache_dir() / f"rotary-native-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {target.parent} for {purpose} ({e.strerror}); "
                        "set XDG_CACHE_HOME to a writable folder") from None
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    compiler = os.environ.get("CC", "cc")
    cmd = [compiler, "-O2", "-std=c11", "-shared", "-fPIC", "-I", str(GGML_INCLUDE_DIR), *map(str, sources),
           "-o", str(tmp), "-L", str(LIB_DIR), "-lggml-base", "-lggml-cpu", "-lpthread", "-lm", f"-Wl,-rpath,{LIB_DIR}"]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise UserError(f"{purpose} needs a C compiler to be built ({compiler}: {e.strerror})") from None
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        first = next((line for line in result.stderr.splitlines() if "error" in line), result.stderr.strip()[:200])
        raise UserError(f"could not compile {purpose}: {first}")
    os.replace(tmp, target)  # atomic: a concurrent build writes the same bytes
    return target


@cache
def _native_library() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(_build_native(NATIVE_SOURCES, "the native eval callbacks")))
    i32, i64p = ctypes.c_int32, ctypes.POINTER(ctypes.c_int64)
    lib.moe_tap_new.restype, lib.moe_tap_new.argtypes = c_void_p, [i32, i32, i32, i32, ctypes.c_bool]
    lib.moe_tap_free.restype, lib.moe_tap_free.argtypes = None, [c_void_p]
    lib.moe_tap_reset.restype, lib.moe_tap_reset.argtypes = None, [c_void_p]
    lib.moe_tap_set_enabled.restype, lib.moe_tap_set_enabled.argtypes = None, [c_void_p, ctypes.c_bool]
    for name in ("moe_tap_tokens", "moe_tap_counts", "moe_tap_recent", "moe_tap_pairs"):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = i64p, [c_void_p]
    lib.expert_cache_new.restype = c_void_p
    lib.expert_cache_new.argtypes = [i32, i32, i32, i32, ctypes.c_double, EvalCallback]
    lib.expert_cache_free.restype, lib.expert_cache_free.argtypes = None, [c_void_p]
    lib.expert_cache_reset.restype, lib.expert_cache_reset.argtypes = None, [c_void_p]
    lib.expert_cache_set_mode.restype, lib.expert_cache_set_mode.argtypes = None, [c_void_p, i32]
    lib.expert_cache_set_tap.restype, lib.expert_cache_set_tap.argtypes = None, [c_void_p, c_void_p]
    lib.expert_cache_set_weight.restype = ctypes.c_bool
    lib.expert_cache_set_weight.argtypes = [c_void_p, i32, i32, c_void_p, c_void_p, c_size_t]
    for name in ("expert_cache_hits", "expert_cache_misses", "expert_cache_uploaded_bytes", "expert_cache_failures"):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = i64p, [c_void_p]
    lib.expert_cache_slot_of.restype = ctypes.POINTER(ctypes.c_int32)
    lib.expert_cache_slot_of.argtypes = [c_void_p, i32]
    lib.expert_cache_enable_split.restype = ctypes.c_bool
    lib.expert_cache_enable_split.argtypes = [c_void_p, i32, ctypes.c_int64, i32, i32]
    lib.expert_cache_set_split_weight.restype = ctypes.c_bool
    lib.expert_cache_set_split_weight.argtypes = [c_void_p, i32, i32, i32, ctypes.c_int64, ctypes.c_int64, c_void_p]
    lib.expert_cache_admit_pending.restype = ctypes.c_int64
    lib.expert_cache_admit_pending.argtypes = [c_void_p, ctypes.c_int64]
    for name in ("expert_cache_wait_ns", "expert_cache_cpu_ns", "expert_cache_hot_ns"):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = i64p, [c_void_p]
    return lib


class MoeTap:
    """The native routing tap of one context. Hand `callback` and `user_data` to the context
    (llama_context_params.cb_eval); the arrays count in expert positions of the file:
    tokens [n_layer], counts and recent [n_layer, n_expert], pairs [n_layer, n_expert, n_expert]
    (None unless asked for). They are views of C memory: copy what must outlive the tap."""

    def __init__(self, n_layer: int, n_expert: int, n_used: int, *, window: int, pairs: bool):
        lib = _native_library()
        handle = lib.moe_tap_new(n_layer, n_expert, n_used, window, pairs)
        if not handle:
            raise UserError(f"could not allocate routing telemetry for {n_layer} blocks of {n_expert} experts")
        self._lib, self.user_data = lib, handle
        self.callback = EvalCallback(ctypes.cast(lib.moe_tap_eval, c_void_p).value)
        view = lambda fn, *shape: np.ctypeslib.as_array(fn(handle), shape=shape)  # noqa: E731
        self.tokens = view(lib.moe_tap_tokens, n_layer)
        self.counts = view(lib.moe_tap_counts, n_layer, n_expert)
        self.recent = view(lib.moe_tap_recent, n_layer, n_expert)
        self.pairs = view(lib.moe_tap_pairs, n_layer, n_expert, n_expert) if pairs else None
        self._free = weakref.finalize(self, lib.moe_tap_free, handle)

    def set_enabled(self, enabled: bool) -> None:
        """A disabled tap answers every question with no: the graph runs unsplit."""
        self._lib.moe_tap_set_enabled(self.user_data, enabled)

    def reset(self) -> None:
        """Zero every count (between decode calls, not during one)."""
        self._lib.moe_tap_reset(self.user_data)


class GgmlTensor(ctypes.Structure):
    """struct ggml_tensor (ggml.h), the fields up to its name: what a Python eval callback reads."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", c_void_p * 10),
        ("view_src", c_void_p),
        ("view_offs", c_size_t),
        ("data", c_void_p),
        ("name", ctypes.c_char * 64),
    ]


def tensor_bytes(tensor: int) -> bytes:
    """All bytes a tensor spans (a view's rows and the gaps between them), from any backend."""
    size = _nbytes(tensor)
    buf = ctypes.create_string_buffer(size)
    _tensor_get(tensor, buf, 0, size)
    return buf.raw
