"""Load-time settings: flash attention's llama.cpp values, graph reuse around an expert cache,
the buffer types weights went to, the default thread count, and refusing unsafe CPU buffer types."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager

import llama_cpp

from .. import native
from ..log import logger


_FLASH_ATTN_TYPES = {"auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                     "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED}


@contextmanager
def _graph_reuse_disabled(disabled: bool) -> Iterator[None]:
    """LLAMA_GRAPH_REUSE_DISABLE=1 while a context is created: the expert cache rebinds weights
    between decode calls, so a graph built before must never be reused after."""
    previous = os.environ.get("LLAMA_GRAPH_REUSE_DISABLE")
    if disabled:
        os.environ["LLAMA_GRAPH_REUSE_DISABLE"] = "1"
    try:
        yield
    finally:
        if disabled:
            if previous is None:
                os.environ.pop("LLAMA_GRAPH_REUSE_DISABLE", None)
            else:
                os.environ["LLAMA_GRAPH_REUSE_DISABLE"] = previous


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


@functools.cache
def _refuse_unsafe_buffer_types() -> bool:
    """True when this llama.cpp build has a CPU buffer type that crashes (ggml's AMX type): the
    model then loads without extra buffer types (plain CPU kernels). Said once, at --verbose."""
    unsafe = native.unsafe_cpu_buffer_types()
    if unsafe:
        logger.debug(
            "this llama.cpp build has ggml's %s buffer type, whose kernels crash in llama.cpp's decode; "
            "loading weights without extra CPU buffer types (rebuild with scripts/setup.sh to keep the "
            "repacked CPU kernels)", "/".join(unsafe))
    return bool(unsafe)
