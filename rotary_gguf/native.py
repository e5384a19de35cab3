"""The one module that declares ctypes: ggml-backend devices and buffer types, ggml-rpc, the
llama.cpp structs that llama-cpp-python leaves untyped, and log routing.

llama-cpp-python 0.3.36 binds libllama but not ggml-backend; we bind the few functions we need
from the shared libraries it ships in `llama_cpp/lib/`.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import socket
import struct
import subprocess
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import llama_cpp
import numpy as np

from .errors import UserError
from .log import llama_logger
from .plan import CUDA_RUNTIME_RESERVE, Accelerator, LinkFigures

LIB_DIR = Path(llama_cpp.__file__).parent / "lib"

DEVICE_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}

c_void_p, c_char_p, c_size_t = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t


def _load(name: str) -> ctypes.CDLL | None:
    path = LIB_DIR / name
    return ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL) if path.exists() else None


_libs = [lib for lib in (_load("libggml-base.so"), _load("libggml.so"), _load("libggml-rpc.so")) if lib]


def _bind(name: str, restype, *argtypes):
    for lib in _libs:
        fn = getattr(lib, name, None)
        if fn is not None:
            fn.restype, fn.argtypes = restype, list(argtypes)
            return fn
    return None


_dev_count = _bind("ggml_backend_dev_count", c_size_t)
_dev_get = _bind("ggml_backend_dev_get", c_void_p, c_size_t)
_dev_name = _bind("ggml_backend_dev_name", c_char_p, c_void_p)
_dev_description = _bind("ggml_backend_dev_description", c_char_p, c_void_p)
_dev_type = _bind("ggml_backend_dev_type", ctypes.c_int, c_void_p)
_dev_memory = _bind("ggml_backend_dev_memory", None, c_void_p, ctypes.POINTER(c_size_t), ctypes.POINTER(c_size_t))
_dev_buffer_type = _bind("ggml_backend_dev_buffer_type", c_void_p, c_void_p)
_dev_host_buffer_type = _bind("ggml_backend_dev_host_buffer_type", c_void_p, c_void_p)
_buft_name = _bind("ggml_backend_buft_name", c_char_p, c_void_p)
_register = _bind("ggml_backend_register", None, c_void_p)
_dev_backend_reg = _bind("ggml_backend_dev_backend_reg", c_void_p, c_void_p)
_reg_proc_address = _bind("ggml_backend_reg_get_proc_address", c_void_p, c_void_p, c_char_p)
_dev_init = _bind("ggml_backend_dev_init", c_void_p, c_void_p, c_char_p)
_dev_offload_op = _bind("ggml_backend_dev_offload_op", ctypes.c_bool, c_void_p, c_void_p)
_backend_free = _bind("ggml_backend_free", None, c_void_p)
_graph_compute = _bind("ggml_backend_graph_compute", ctypes.c_int, c_void_p, c_void_p)
_cpu_set_n_threads = _bind("ggml_backend_cpu_set_n_threads", None, c_void_p, ctypes.c_int)
_buft_alloc_buffer = _bind("ggml_backend_buft_alloc_buffer", c_void_p, c_void_p, c_size_t)
_buffer_base = _bind("ggml_backend_buffer_get_base", c_void_p, c_void_p)
_buffer_clear = _bind("ggml_backend_buffer_clear", None, c_void_p, ctypes.c_uint8)
_buffer_free = _bind("ggml_backend_buffer_free", None, c_void_p)
_alloc_ctx_tensors = _bind("ggml_backend_alloc_ctx_tensors_from_buft", c_void_p, c_void_p, c_void_p)
_tensor_set = _bind("ggml_backend_tensor_set", None, c_void_p, c_void_p, c_size_t, c_size_t)
_rpc_add_server = _bind("ggml_backend_rpc_add_server", c_void_p, c_char_p)
_rpc_start_server = _bind(
    "ggml_backend_rpc_start_server", None, c_char_p, c_char_p, c_size_t, c_size_t, ctypes.POINTER(c_void_p)
)


@dataclass(frozen=True)
class Device:
    """A ggml backend device as llama.cpp sees it."""

    name: str
    description: str
    type: str
    free: int
    total: int
    handle: int

    @property
    def is_rpc(self) -> bool:
        return self.name.startswith("RPC")

    @property
    def is_local_gpu(self) -> bool:
        """A GPU of this machine (ggml-rpc devices call themselves GPUs too)."""
        return self.type in ("gpu", "igpu") and not self.is_rpc

    @property
    def is_accelerator(self) -> bool:
        return self.is_local_gpu or self.is_rpc

    @property
    def buffer_type(self) -> int:
        return _dev_buffer_type(self.handle)

    @property
    def host_buffer_type(self) -> int | None:
        """Pinned host memory for fast uploads to this device, where the backend offers it."""
        return _dev_host_buffer_type(self.handle) or None


def _device(handle: int) -> Device:
    free, total = c_size_t(0), c_size_t(0)
    _dev_memory(handle, ctypes.byref(free), ctypes.byref(total))
    return Device(
        name=_dev_name(handle).decode(),
        description=(_dev_description(handle) or b"").decode(errors="replace"),
        type=DEVICE_TYPES.get(_dev_type(handle), "unknown"),
        free=free.value,
        total=total.value,
        handle=handle,
    )


_backends_loaded = False  # ggml registers its backends (and CUDA reads its settings) on first use


def devices() -> list[Device]:
    """Every device registered with ggml, CPU included, in registration order."""
    global _backends_loaded
    _backends_loaded = True
    return [_device(_dev_get(i)) for i in range(_dev_count())]


def device_by_name(name: str) -> Device:
    for dev in devices():
        if dev.name == name:
            return dev
    known = ", ".join(d.name for d in devices())
    raise UserError(f"unknown device {name!r} (llama.cpp sees: {known})")


def cpu_device() -> Device:
    return next(d for d in devices() if d.type == "cpu")


def buffer_type_name(buft: int) -> str:
    return _buft_name(buft).decode()


# --- the CPU backend as built: its extra buffer types and the instruction sets compiled in --------
# Extra buffer types hold weights in layouts for faster CPU kernels ("CPU_REPACK"); llama.cpp
# prefers them whenever `use_extra_bufts` is on (the default). ggml's AMX type ("AMX", compiled by
# a native build on Xeons with AMX) crashes at the first decode of a quantized model in this
# llama.cpp, so the engine never hands weights to a build that has it.
UNSAFE_EXTRA_BUFFER_TYPES = ("AMX",)


class _Feature(ctypes.Structure):
    _fields_ = [("name", c_char_p), ("value", c_char_p)]


def _cpu_proc(name: str) -> int | None:
    """A function the CPU backend exports by name (ggml_backend_reg_get_proc_address)."""
    if _dev_backend_reg is None or _reg_proc_address is None:
        return None
    return _reg_proc_address(_dev_backend_reg(cpu_device().handle), name.encode()) or None


@cache
def cpu_extra_buffer_types() -> tuple[str, ...]:
    """Names of the CPU backend's extra buffer types, in llama.cpp's order of preference."""
    address = _cpu_proc("ggml_backend_dev_get_extra_bufts")
    if address is None:
        return ()
    get = ctypes.CFUNCTYPE(ctypes.POINTER(c_void_p), c_void_p)(address)
    bufts = get(cpu_device().handle)
    names: list[str] = []
    while bufts and bufts[len(names)]:
        names.append(buffer_type_name(bufts[len(names)]))
    return tuple(names)


def unsafe_cpu_buffer_types() -> tuple[str, ...]:
    """Extra buffer types of this build that must not receive weights (see above)."""
    return tuple(name for name in cpu_extra_buffer_types() if name in UNSAFE_EXTRA_BUFFER_TYPES)


@cache
def cpu_backend_features() -> dict[str, str]:
    """What the CPU backend was compiled with ({"AVX2": "1", "AMX_INT8": "1", "REPACK": "1", ...})."""
    address = _cpu_proc("ggml_backend_get_features")
    if address is None:
        return {}
    get = ctypes.CFUNCTYPE(ctypes.POINTER(_Feature), c_void_p)(address)
    features = get(_dev_backend_reg(cpu_device().handle))
    out: dict[str, str] = {}
    while features and features[len(out)].name:
        f = features[len(out)]
        out[f.name.decode()] = (f.value or b"").decode()
    return out


def rpc_available() -> bool:
    return _rpc_add_server is not None


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """'HOST:PORT' -> (host, port), or a UserError that says what is wrong."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"bad RPC endpoint {endpoint!r}: expected HOST:PORT, e.g. 127.0.0.1:50052")
    return host, int(port)


# The RPC protocol's HELLO (ggml/src/ggml-rpc/ggml-rpc.cpp): cmd byte 14, u64 size, 24 caps bytes;
# the reply is u64 size + {major, minor, patch, pad, 24 caps bytes}. ggml aborts the whole process
# when a server is unreachable, so we say hello ourselves first.
_RPC_CMD_HELLO, _RPC_CAPS, _RPC_MAJOR = 14, 24, 7


def probe_rpc(endpoint: str, timeout: float = 3.0) -> None:
    """Check that a compatible ggml-rpc server answers at `endpoint`; UserError otherwise."""
    host, port = parse_endpoint(endpoint)
    hint = "start one with `rotary-gguf rpc-device --port PORT`"
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(struct.pack("<BQ", _RPC_CMD_HELLO, _RPC_CAPS) + bytes(_RPC_CAPS))
            reply = _recv_exact(s, 8 + 4 + _RPC_CAPS)
    except OSError as e:
        raise UserError(f"cannot reach an RPC device at {endpoint} ({e.strerror or e}); {hint}") from None
    (size,) = struct.unpack_from("<Q", reply)
    if size != 4 + _RPC_CAPS or reply[8] != _RPC_MAJOR:
        raise UserError(f"{endpoint} is not a compatible ggml-rpc server (protocol {reply[8]}, need {_RPC_MAJOR})")


def _recv_exact(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise OSError("connection closed during handshake")
        data += chunk
    return data


@cache
def add_rpc_device(endpoint: str) -> Device:
    """Register the ggml-rpc server at `endpoint` as a device (named RPC<n>) and return it."""
    if not rpc_available():
        raise UserError("this llama-cpp-python was built without ggml-rpc; re-run the setup (it adds -DGGML_RPC=on)")
    probe_rpc(endpoint)
    before = {d.handle for d in devices()}
    reg = _rpc_add_server(endpoint.encode())
    if not reg:
        raise UserError(f"the RPC server at {endpoint} offers no devices")
    _register(reg)
    new = [d for d in devices() if d.handle not in before]
    if not new:
        raise UserError(f"the RPC server at {endpoint} registered no device")
    return new[0]


def serve_rpc(endpoint: str, n_threads: int) -> None:
    """Serve this machine's CPU as a ggml-rpc device at `endpoint`; blocks until killed."""
    if not rpc_available():
        raise UserError("this llama-cpp-python was built without ggml-rpc; re-run the setup (it adds -DGGML_RPC=on)")
    parse_endpoint(endpoint)
    cpu = (c_void_p * 1)(cpu_device().handle)
    _rpc_start_server(endpoint.encode(), None, n_threads, 1, cpu)


# --- the accelerator as the planner sees it ------------------------------------------------------
def find_accelerator(rpc: str | None = None) -> Accelerator | None:
    """The device to plan for: the ggml-rpc server at `rpc` when given, else the first GPU, else None."""
    if rpc:
        dev = add_rpc_device(rpc)
    else:
        dev = next((d for d in devices() if d.is_local_gpu), None)
        if dev is None:
            return None
    streams = offloads_ops(dev)
    pinned = dev.host_buffer_type
    return Accelerator(
        name=dev.name,
        buffer_type=buffer_type_name(dev.buffer_type),
        pinned_host_buffer_type=buffer_type_name(pinned) if pinned else None,
        free_bytes=dev.free,
        streams_host_ops=streams,
        runtime_reserve=CUDA_RUNTIME_RESERVE if streams else 0,
    )


class _InitParams(ctypes.Structure):
    """struct ggml_init_params, passed by value to ggml_init."""

    _fields_ = [("mem_size", c_size_t), ("mem_buffer", c_void_p), ("no_alloc", ctypes.c_bool)]


_GGML_TYPE_F32 = 0
_ggml_init = _bind("ggml_init", c_void_p, _InitParams)
_ggml_free = _bind("ggml_free", None, c_void_p)
_tensor_overhead = _bind("ggml_tensor_overhead", c_size_t)
_graph_overhead = _bind("ggml_graph_overhead", c_size_t)
_new_tensor_2d = _bind("ggml_new_tensor_2d", c_void_p, c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_mul_mat = _bind("ggml_mul_mat", c_void_p, c_void_p, c_void_p, c_void_p)
_new_graph = _bind("ggml_new_graph", c_void_p, c_void_p)
_build_forward_expand = _bind("ggml_build_forward_expand", None, c_void_p, c_void_p)
_row_size = _bind("ggml_row_size", c_size_t, ctypes.c_int, ctypes.c_int64)


@contextmanager
def _metadata_context(n_tensors: int) -> Iterator[int]:
    """A ggml context that holds tensor and graph metadata only; data lives in backend buffers."""
    ctx = _ggml_init(_InitParams(n_tensors * _tensor_overhead() + _graph_overhead(), None, True))
    try:
        yield ctx
    finally:
        _ggml_free(ctx)


def offloads_ops(dev: Device) -> bool:
    """Whether the device's backend runs ops on host-resident weights (offload_op): CUDA does for
    large enough batches; ggml-rpc does not. Asked with a matmul over a very large batch."""
    with _metadata_context(3) as ctx:
        weight = _new_tensor_2d(ctx, _GGML_TYPE_F32, 256, 256)
        batch = _new_tensor_2d(ctx, _GGML_TYPE_F32, 256, 1 << 20)
        return bool(_dev_offload_op(dev.handle, _mul_mat(ctx, weight, batch)))


def upload_bytes_per_s(dev: Device, nbytes: int = 256 * 2**20, repeats: int = 3) -> float:
    """Measured host -> device copy speed, from the device's pinned host memory where it has one."""
    src_buft = dev.host_buffer_type or cpu_device().buffer_type
    src = _buft_alloc_buffer(src_buft, nbytes)
    if not src:
        raise UserError(f"could not allocate {nbytes} bytes of host memory to measure uploads to {dev.name}")
    try:
        with _metadata_context(1) as ctx:
            tensor = _new_tensor_2d(ctx, _GGML_TYPE_F32, nbytes // 4, 1)
            dst = _alloc_ctx_tensors(ctx, dev.buffer_type)
            if not dst:
                raise UserError(f"could not allocate {nbytes} bytes on {dev.name} to measure uploads")
            try:
                return nbytes / _best_time(repeats, lambda: _tensor_set(tensor, _buffer_base(src), 0, nbytes))
            finally:
                _buffer_free(dst)
    finally:
        _buffer_free(src)


def cpu_matvec_bytes_per_s(ggml_type: int, n_embd: int, n_threads: int, nbytes: int = 64 * 2**20, repeats: int = 5) -> float:
    """Measured speed of the CPU backend multiplying a weight matrix of `ggml_type` (an expert
    tensor's type) by one activation vector, in weight bytes per second: what decode does with
    host experts in cpu mode."""
    row = _row_size(ggml_type, n_embd)
    rows = max(1, nbytes // row)
    cpu = cpu_device()
    backend = _dev_init(cpu.handle, None)
    try:
        _cpu_set_n_threads(backend, n_threads)
        with _metadata_context(3) as ctx:
            weight = _new_tensor_2d(ctx, ggml_type, n_embd, rows)
            vector = _new_tensor_2d(ctx, _GGML_TYPE_F32, n_embd, 1)
            graph = _new_graph(ctx)
            _build_forward_expand(graph, _mul_mat(ctx, weight, vector))
            buf = _alloc_ctx_tensors(ctx, cpu.buffer_type)
            try:
                _buffer_clear(buf, 0)  # zero blocks are valid in every format
                return rows * row / _best_time(repeats, lambda: _graph_compute(backend, graph))
            finally:
                _buffer_free(buf)
    finally:
        _backend_free(backend)


def measure_link(accelerator: Accelerator, expert_type: int, n_embd: int, n_threads: int) -> LinkFigures:
    """The speeds `plan.choose_mode` compares, measured on this machine."""
    return LinkFigures(
        upload_bytes_per_s=upload_bytes_per_s(device_by_name(accelerator.name)),
        cpu_expert_bytes_per_s=cpu_matvec_bytes_per_s(expert_type, n_embd, n_threads),
    )


def _best_time(repeats: int, fn) -> float:
    fn()  # warm up
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return max(best, 1e-9)


# --- llama.cpp structs that llama-cpp-python declares as void* ----------------------------------
class BuftOverride(ctypes.Structure):
    """struct llama_model_tensor_buft_override { const char * pattern; ggml_backend_buffer_type_t buft; }"""

    _fields_ = [("pattern", c_char_p), ("buft", c_void_p)]


def override_array(pairs: list[tuple[str, int]]) -> ctypes.Array:
    """A NULL-pattern-terminated override array; keep the returned object alive while loading."""
    arr = (BuftOverride * (len(pairs) + 1))()
    for i, (pattern, buft) in enumerate(pairs):
        arr[i].pattern, arr[i].buft = pattern.encode(), buft
    return arr


def device_array(handles: list[int]) -> ctypes.Array:
    """A NULL-terminated ggml_backend_dev_t array; keep it alive while loading."""
    return (c_void_p * (len(handles) + 1))(*handles, None)


def address(obj: ctypes.Array) -> int:
    return ctypes.addressof(obj)


# --- logs ----------------------------------------------------------------------------------------
_LEVELS = {0: logging.CRITICAL, 1: logging.INFO, 2: logging.WARNING, 3: logging.ERROR, 4: logging.DEBUG}


_captures: list[list[str]] = []  # open capture_llama_log blocks, innermost last


@llama_cpp.llama_log_callback
def _route_log(level: int, text: bytes, _user_data) -> None:
    chunk = text.decode("utf-8", errors="replace")
    for chunks in _captures:
        chunks.append(chunk)
    if llama_logger.isEnabledFor(logging.DEBUG):
        line = chunk.rstrip("\n")
        if line:
            llama_logger.log(_LEVELS.get(level, logging.DEBUG), line)


@contextmanager
def capture_llama_log() -> Iterator[list[str]]:
    """Collect llama.cpp's log lines while the block runs, whatever the log level; the list is
    filled when the block ends."""
    chunks: list[str] = []
    lines: list[str] = []
    _captures.append(chunks)
    try:
        yield lines
    finally:
        _captures[:] = [c for c in _captures if c is not chunks]  # by identity: nested blocks
        lines.extend("".join(chunks).splitlines())


def route_llama_logs() -> None:
    """Send llama.cpp/ggml log lines to our logger (shown only with --verbose)."""
    llama_cpp.llama_log_set(_route_log, None)


def set_offload_min_batch(n: int) -> None:
    """GGML_OP_OFFLOAD_MIN_BATCH is read once when the CUDA backend registers: set it first."""
    current = os.environ.get("GGML_OP_OFFLOAD_MIN_BATCH")
    if _backends_loaded and current != str(n) and any(offloads_ops(d) for d in devices() if d.type != "cpu"):
        raise UserError(
            f"the GPU backend is already loaded with offload threshold {current or 'default'}, not {n}: "
            "choose the host-expert mode before the first device query (a new process can)"
        )
    os.environ["GGML_OP_OFFLOAD_MIN_BATCH"] = str(n)


# --- native eval callbacks (csrc/): the routing tap and the expert cache's hot path ---------------
# llama.cpp calls the eval callback for every graph node; a Python callback costs ~0.3 us a call,
# more than a whole decode step of a small model is worth. Both answer in C and keep their figures
# in memory that numpy views read in place. They are compiled on first use, into one library in a
# cache folder, so the expert cache can record into a tap from its own callback.
NATIVE_SOURCES = tuple(Path(__file__).with_name("csrc") / name for name in ("moe_tap.c", "expert_cache.c", "split_compute.c"))
NATIVE_HEADERS = tuple(Path(__file__).with_name("csrc") / name for name in ("topk.h", "split_compute.h"))
GGML_INCLUDE_DIR = Path(llama_cpp.__file__).parent.parent / "include"  # installed with llama-cpp-python
EvalCallback = llama_cpp.ggml_backend_sched_eval_callback


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rotary-gguf"


def _build_native(sources: tuple[Path, ...], purpose: str) -> Path:
    """The library compiled from `sources` for these headers and this ggml; built once, then
    reused. `purpose` names it in errors ("the native eval callbacks")."""
    headers = [GGML_INCLUDE_DIR / h for h in ("ggml.h", "ggml-backend.h", "ggml-cpu.h")]
    if not all(h.exists() for h in headers):
        raise UserError(f"the ggml headers are missing from {GGML_INCLUDE_DIR}; re-run the setup to reinstall llama-cpp-python")
    key = hashlib.sha256(b"".join(p.read_bytes() for p in (*sources, *NATIVE_HEADERS, *headers)) + str(LIB_DIR).encode())
    target = _cache_dir() / f"rotary-native-{key.hexdigest()[:16]}.so"
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


_tensor_get = _bind("ggml_backend_tensor_get", None, c_void_p, c_void_p, c_size_t, c_size_t)
_nbytes = _bind("ggml_nbytes", c_size_t, c_void_p)


def tensor_bytes(tensor: int) -> bytes:
    """All bytes a tensor spans (a view's rows and the gaps between them), from any backend."""
    size = _nbytes(tensor)
    buf = ctypes.create_string_buffer(size)
    _tensor_get(tensor, buf, 0, size)
    return buf.raw



# --- the expert cache (experts/cache.py): slot buffers on the accelerator, uploads, tensor rebinding
_buffer_is_host = _bind("ggml_backend_buffer_is_host", ctypes.c_bool, c_void_p)


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

route_llama_logs()
