"""The one module that declares ctypes: ggml-backend devices and buffer types, ggml-rpc, the
llama.cpp structs that llama-cpp-python leaves untyped, and log routing.

llama-cpp-python 0.3.36 binds libllama but not ggml-backend; we bind the few functions we need
from the shared libraries it ships in `llama_cpp/lib/`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import llama_cpp

from .errors import UserError
from .log import llama_logger

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
    def is_accelerator(self) -> bool:
        return self.type in ("gpu", "igpu") or self.name.startswith("RPC")

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


def devices() -> list[Device]:
    """Every device registered with ggml, CPU included, in registration order."""
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


@llama_cpp.llama_log_callback
def _route_log(level: int, text: bytes, _user_data) -> None:
    if llama_logger.isEnabledFor(logging.DEBUG):
        line = text.decode("utf-8", errors="replace").rstrip("\n")
        if line:
            llama_logger.log(_LEVELS.get(level, logging.DEBUG), line)


def route_llama_logs() -> None:
    """Send llama.cpp/ggml log lines to our logger (shown only with --verbose)."""
    llama_cpp.llama_log_set(_route_log, None)


def set_offload_min_batch(n: int) -> None:
    """GGML_OP_OFFLOAD_MIN_BATCH is read once when the CUDA backend registers: set it first."""
    os.environ["GGML_OP_OFFLOAD_MIN_BATCH"] = str(n)


route_llama_logs()
