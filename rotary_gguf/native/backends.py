"""ggml-backend devices as llama.cpp sees them, the CPU backend as built (extra buffer types,
instruction sets), ggml-rpc servers, and the accelerator as the planner sees it."""

from __future__ import annotations

import ctypes
import socket
import struct
from dataclasses import dataclass
from functools import cache

from ..errors import UserError
from ..plan import CUDA_RUNTIME_RESERVE, Accelerator
from .ggml import (_GGML_TYPE_F32, c_char_p, c_size_t, c_void_p, _buft_name, _dev_backend_reg, _dev_buffer_type, _dev_count, _dev_description, _dev_get,
                   _DevProps, _dev_get_props, _dev_host_buffer_type, _dev_memory, _dev_name, _dev_offload_op, _dev_type, _metadata_context, _mul_mat,
                   _new_tensor_2d, _reg_proc_address, _register, _rpc_add_server, _rpc_start_server)

DEVICE_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}


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


backends_loaded = False  # ggml registers its backends (and CUDA reads its settings) on first use


def devices() -> list[Device]:
    """Every device registered with ggml, CPU included, in registration order."""
    global backends_loaded
    backends_loaded = True
    return [_device(_dev_get(i)) for i in range(_dev_count())]


def device_by_name(name: str) -> Device:
    for dev in devices():
        if dev.name == name:
            return dev
    known = ", ".join(d.name for d in devices())
    raise UserError(f"unknown device {name!r} (llama.cpp sees: {known})")


def device_props(name: str) -> _DevProps:
    """ggml's properties of device `name` (its PCI bus id, "0000:c1:00.0", as `device_id` where the
    backend knows it: CUDA does; the CPU and ggml-rpc give none). Strings point into the backend."""
    props = _DevProps()
    _dev_get_props(device_by_name(name).handle, ctypes.byref(props))
    return props


def pci_bus_id(name: str) -> str | None:
    """The PCI bus id ggml gives device `name` (a CUDA GPU's, with "-vN" for a virtual device), if any."""
    bus = device_props(name).device_id
    return bus.decode() if bus else None


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
    return tuple(_cpu_extra_buffer_handles())


@cache
def _cpu_extra_buffer_handles() -> dict[str, int]:
    address = _cpu_proc("ggml_backend_dev_get_extra_bufts")
    if address is None:
        return {}
    get = ctypes.CFUNCTYPE(ctypes.POINTER(c_void_p), c_void_p)(address)
    bufts = get(cpu_device().handle)
    handles: dict[str, int] = {}
    while bufts and bufts[len(handles)]:
        handles[buffer_type_name(bufts[len(handles)])] = bufts[len(handles)]
    return handles


def cpu_weight_buffer_type() -> int:
    """The buffer type llama.cpp gives the CPU's weights: its repacked layout ("CPU_REPACK", faster
    kernels for the types it supports) where the build has it and it is safe, else the plain one."""
    handles = _cpu_extra_buffer_handles()
    safe = [h for name, h in handles.items() if name not in unsafe_cpu_buffer_types()]
    return safe[0] if safe else cpu_device().buffer_type


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
        return accelerator_of(add_rpc_device(rpc))
    dev = next((d for d in devices() if d.is_local_gpu), None)
    return accelerator_of(dev) if dev is not None else None


def find_accelerators(rpc: list[str], names: list[str] | None = None) -> list[Accelerator]:
    """The devices a plan may use, in llama.cpp's order: those named in `names` (as `devices`
    lists them: CUDA0, RPC0, ...) after registering the ggml-rpc servers at `rpc`; by default
    every ggml-rpc device then every GPU of this machine (llama.cpp's own default order)."""
    for endpoint in rpc:
        add_rpc_device(endpoint)
    known = [d for d in devices() if d.is_rpc] + [d for d in devices() if d.is_local_gpu]
    if names is None:
        return [accelerator_of(d) for d in known]
    by_name = {d.name: d for d in known}
    for name in names:
        if name not in by_name:
            listed = ", ".join(by_name) or "none (no GPU here and no --rpc)"
            raise UserError(f"unknown device {name!r} in --devices (accelerators here: {listed})")
    return [accelerator_of(by_name[name]) for name in names]


def accelerator_of(dev: Device) -> Accelerator:
    """The planner's view of a device: its buffer types, free memory and whether it streams host ops."""
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


def offloads_ops(dev: Device) -> bool:
    """Whether the device's backend runs ops on host-resident weights (offload_op): CUDA does for
    large enough batches; ggml-rpc does not. Asked with a matmul over a very large batch."""
    with _metadata_context(3) as ctx:
        weight = _new_tensor_2d(ctx, _GGML_TYPE_F32, 256, 256)
        batch = _new_tensor_2d(ctx, _GGML_TYPE_F32, 256, 1 << 20)
        return bool(_dev_offload_op(dev.handle, _mul_mat(ctx, weight, batch)))
