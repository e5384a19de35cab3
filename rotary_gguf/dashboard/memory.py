"""How memory is measured for the dashboard: the accelerator's (NVML, ggml, or the bytes placed on
an RPC device) and the host's."""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import pynvml


@dataclass(frozen=True)
class AcceleratorMemory:
    name: str
    used: int
    total: int
    source: str  # how `used` was measured: "NVML", "ggml", or "placed" (the bytes we put there)


class MemoryProbe:
    """Accelerator and host memory of one engine's process. NVML for CUDA devices; ggml's device
    memory for other GPUs; on an RPC device (which reports the server's RAM) the bytes llama.cpp
    and the expert cache placed there, out of the plan's budget."""

    def __init__(self, engine, plan=None):
        self._engine = engine
        self._process = psutil.Process()
        self._nvml = None
        self._placed: AcceleratorMemory | None = None
        name = next(iter(engine.placement.devices), None)
        self.device = name
        if name is None:
            return
        if name.startswith("CUDA"):
            self._nvml = _nvml_handle(int(name[4:] or 0))
        if name.startswith("RPC"):
            report = engine.load_report
            placed = sum(
                n
                for sizes in (report.weight_bytes, report.kv_bytes, report.recurrent_bytes, report.compute_bytes)
                for buffer, n in sizes.items()
                if buffer.startswith(name)
            )
            if engine.expert_cache is not None:
                placed += engine.expert_cache.slot_bytes
            total = plan.budget if plan is not None else engine.accelerator_memory().get(name, (0, 0))[1]
            self._placed = AcceleratorMemory(name, placed, total, "placed")

    def accelerator(self) -> AcceleratorMemory | None:
        if self.device is None:
            return None
        if self._placed is not None:
            return self._placed
        if self._nvml is not None:
            info = pynvml.nvmlDeviceGetMemoryInfo(self._nvml)
            return AcceleratorMemory(self.device, int(info.used), int(info.total), "NVML")
        used, total = self._engine.accelerator_memory().get(self.device, (0, 0))
        return AcceleratorMemory(self.device, used, total, "ggml")

    def host(self) -> tuple[int, int, int]:
        """(process RSS, system RAM used, system RAM total) in bytes."""
        ram = psutil.virtual_memory()
        return self._process.memory_info().rss, ram.total - ram.available, ram.total


def _nvml_handle(index: int):
    try:
        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetHandleByIndex(index)
    except pynvml.NVMLError:  # no driver library or no such GPU: ggml's figures then
        return None


