"""The ggml C functions we bind from the shared libraries llama-cpp-python ships in `llama_cpp/lib/`
(it binds libllama but not ggml-backend), and a metadata-only ggml context."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import llama_cpp

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


class _DevCaps(ctypes.Structure):
    """struct ggml_backend_dev_caps (ggml-backend.h)."""

    _fields_ = [("async_", ctypes.c_bool), ("host_buffer", ctypes.c_bool), ("buffer_from_host_ptr", ctypes.c_bool),
                ("events", ctypes.c_bool), ("mmap_support", ctypes.c_bool)]


class _DevProps(ctypes.Structure):
    """struct ggml_backend_dev_props (ggml-backend.h): device_id is the PCI bus id where the backend knows it."""

    _fields_ = [("name", c_char_p), ("description", c_char_p), ("memory_free", c_size_t), ("memory_total", c_size_t),
                ("type", ctypes.c_int), ("device_id", c_char_p), ("caps", _DevCaps)]


_dev_get_props = _bind("ggml_backend_dev_get_props", None, c_void_p, ctypes.POINTER(_DevProps))
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


class _InitParams(ctypes.Structure):
    """struct ggml_init_params, passed by value to ggml_init."""

    _fields_ = [("mem_size", c_size_t), ("mem_buffer", c_void_p), ("no_alloc", ctypes.c_bool)]


_GGML_TYPE_F32 = 0
_GGML_TYPE_I32 = 26
_ggml_init = _bind("ggml_init", c_void_p, _InitParams)
_ggml_free = _bind("ggml_free", None, c_void_p)
_tensor_overhead = _bind("ggml_tensor_overhead", c_size_t)
_graph_overhead = _bind("ggml_graph_overhead", c_size_t)
_new_tensor_2d = _bind("ggml_new_tensor_2d", c_void_p, c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_mul_mat = _bind("ggml_mul_mat", c_void_p, c_void_p, c_void_p, c_void_p)
_add = _bind("ggml_add", c_void_p, c_void_p, c_void_p, c_void_p)
_mul = _bind("ggml_mul", c_void_p, c_void_p, c_void_p, c_void_p)
_swiglu_split = _bind("ggml_swiglu_split", c_void_p, c_void_p, c_void_p, c_void_p)
_view_2d = _bind("ggml_view_2d", c_void_p, c_void_p, c_void_p, ctypes.c_int64, ctypes.c_int64, c_size_t, c_size_t)
_mul_mat_id = _bind("ggml_mul_mat_id", c_void_p, c_void_p, c_void_p, c_void_p, c_void_p)
_new_tensor_3d = _bind("ggml_new_tensor_3d", c_void_p, c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64)
_new_graph = _bind("ggml_new_graph", c_void_p, c_void_p)
_build_forward_expand = _bind("ggml_build_forward_expand", None, c_void_p, c_void_p)
_row_size = _bind("ggml_row_size", c_size_t, ctypes.c_int, ctypes.c_int64)
_gated_delta_net = _bind("ggml_gated_delta_net", c_void_p, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p,
                         c_void_p, ctypes.c_int64)


_tensor_get = _bind("ggml_backend_tensor_get", None, c_void_p, c_void_p, c_size_t, c_size_t)
_nbytes = _bind("ggml_nbytes", c_size_t, c_void_p)
_first_tensor = _bind("ggml_get_first_tensor", c_void_p, c_void_p)
_buffer_is_host = _bind("ggml_backend_buffer_is_host", ctypes.c_bool, c_void_p)


@contextmanager
def _metadata_context(n_tensors: int) -> Iterator[int]:
    """A ggml context that holds tensor and graph metadata only; data lives in backend buffers."""
    ctx = _ggml_init(_InitParams(n_tensors * _tensor_overhead() + _graph_overhead(), None, True))
    try:
        yield ctx
    finally:
        _ggml_free(ctx)
