"""The engine layer's ctypes side, the only place that declares C types: ggml-backend devices and
buffer types, ggml-rpc, speeds measured with ggml, the llama.cpp structs llama-cpp-python leaves
untyped, log routing, and the native eval callbacks (routing tap, expert cache) compiled from csrc/.
Callers use `native.NAME`; each concept lives in its own module here."""

from __future__ import annotations

from ..errors import UserError

from .backends import (DEVICE_TYPES, UNSAFE_EXTRA_BUFFER_TYPES, Device, add_rpc_device, buffer_type_name, cpu_backend_features,
                       cpu_device, cpu_extra_buffer_types, device_by_name, device_props, devices, find_accelerator,
                       find_accelerators, offloads_ops, pci_bus_id,
                       parse_endpoint, probe_rpc, rpc_available, serve_rpc, unsafe_cpu_buffer_types)
from .callbacks import GGML_INCLUDE_DIR, NATIVE_HEADERS, NATIVE_SOURCES, EvalCallback, GgmlTensor, MoeTap, tensor_bytes
from .expert_cache import (EXPERT_CACHE_MODES, SPLIT_ROLES, NativeExpertCache, alloc_buffer, buffer_base, buffer_is_host,
                           clear_buffer, free_buffer, set_tensor_bytes, tensor_set)
from .ggml import LIB_DIR
from .llama import (BuftOverride, address, capture_llama_log, device_array, override_array, route_llama_logs,
                    set_offload_min_batch, split_array)
from .measure import cpu_matvec_bytes_per_s, measure_link, upload_bytes_per_s
from .nextn import embeddings_nextn, embeddings_nextn_ith, nextn_available, set_embeddings_nextn

__all__ = [name for name in dir() if not name.startswith("_")]

route_llama_logs()
