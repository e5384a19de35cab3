"""Speeds measured on this machine with ggml itself: host -> device uploads, CPU expert matmuls."""

from __future__ import annotations

import math
import time

from ..errors import UserError
from ..plan import Accelerator, LinkFigures
from .backends import Device, cpu_device, device_by_name
from .ggml import (_GGML_TYPE_F32, _alloc_ctx_tensors, _backend_free, _buffer_base, _buffer_clear, _buffer_free,
                   _buft_alloc_buffer, _build_forward_expand, _cpu_set_n_threads, _dev_init, _graph_compute,
                   _metadata_context, _mul_mat, _new_graph, _new_tensor_2d, _row_size, _tensor_set)


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
