"""What llama-cpp-python leaves untyped (tensor buffer-type overrides, device lists), llama.cpp's
log routing, and settings its backends read once."""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import llama_cpp

from ..errors import UserError
from ..log import llama_logger
from . import backends
from .backends import devices, offloads_ops

c_void_p, c_char_p = ctypes.c_void_p, ctypes.c_char_p


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


def split_array(counts: tuple[int, ...]) -> ctypes.Array:
    """llama_model_params.tensor_split: one float per device, llama_max_devices() long; keep it alive while loading."""
    if len(counts) > llama_cpp.llama_max_devices():
        raise UserError(f"llama.cpp takes at most {llama_cpp.llama_max_devices()} devices, not {len(counts)}")
    return (ctypes.c_float * llama_cpp.llama_max_devices())(*counts)


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
    if backends.backends_loaded and current != str(n) and any(offloads_ops(d) for d in devices() if d.type != "cpu"):
        raise UserError(
            f"the GPU backend is already loaded with offload threshold {current or 'default'}, not {n}: "
            "choose the host-expert mode before the first device query (a new process can)"
        )
    os.environ["GGML_OP_OFFLOAD_MIN_BATCH"] = str(n)
