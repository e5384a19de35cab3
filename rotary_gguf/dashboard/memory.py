"""How memory is measured for the dashboard and bench: each accelerator's (NVML, ggml, or the bytes
placed on an RPC device) and the host's."""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import pynvml

from .. import native


@dataclass(frozen=True)
class AcceleratorMemory:
    name: str
    used: int
    total: int
    source: str  # how `used` was measured: "NVML", "ggml", or "placed" (the bytes we put there)


def device_budgets(plan) -> dict[str, int]:
    """The plan's budget for each accelerator, by device name: each share's over several, else
    the one budget; empty without a plan."""
    if plan is None:
        return {}
    return {s.accelerator.name: s.budget for s in plan.shares} or {plan.accelerator.name: plan.budget}


class MemoryProbe:
    """Accelerator and host memory of one engine's process, one figure per accelerator of its
    placement. NVML for CUDA devices; ggml's device memory for other GPUs; on an RPC device (which
    reports the server's RAM) the bytes llama.cpp and the expert cache placed there, out of the
    plan's budget for it (without a plan, out of what the device reports)."""

    def __init__(self, engine, plan=None):
        self._engine = engine
        self._process = psutil.Process()
        self.devices: tuple[str, ...] = tuple(engine.placement.devices)
        self._nvml = {name: _nvml_handle(name) for name in self.devices if name.startswith("CUDA")}
        rpc = [name for name in self.devices if name.startswith("RPC")]
        budgets = device_budgets(plan)
        reported = engine.accelerator_memory() if any(name not in budgets for name in rpc) else {}
        # RPC devices: what their placed bytes are out of
        self._budgets = {name: budgets.get(name, reported.get(name, (0, 0))[1]) for name in rpc}

    def accelerators(self) -> list[AcceleratorMemory]:
        """One figure per accelerator, in the placement's order; empty when all runs on the CPU."""
        placed = self._engine.placed_bytes() if self._budgets else {}
        reported = None
        out = []
        for name in self.devices:
            if name in self._budgets:
                out.append(AcceleratorMemory(name, placed[name], self._budgets[name], "placed"))
            elif self._nvml.get(name) is not None:
                info = pynvml.nvmlDeviceGetMemoryInfo(self._nvml[name])
                out.append(AcceleratorMemory(name, int(info.used), int(info.total), "NVML"))
            else:
                reported = reported if reported is not None else self._engine.accelerator_memory()
                used, total = reported.get(name, (0, 0))
                out.append(AcceleratorMemory(name, used, total, "ggml"))
        return out

    def host(self) -> tuple[int, int, int]:
        """(process RSS, system RAM used, system RAM total) in bytes."""
        ram = psutil.virtual_memory()
        return self._process.memory_info().rss, ram.total - ram.available, ram.total


def _nvml_handle(name: str):
    """NVML's handle of CUDA device `name`, found by its PCI bus id: NVML counts GPUs in bus order
    and ignores CUDA_VISIBLE_DEVICES, so CUDA1 need not be NVML's GPU 1. By index where ggml gives
    no bus id."""
    try:
        pynvml.nvmlInit()
        bus = native.pci_bus_id(name)
        if bus is not None:
            return pynvml.nvmlDeviceGetHandleByPciBusId(bus.split("-v")[0])  # a virtual device: its GPU's
        return pynvml.nvmlDeviceGetHandleByIndex(int(name[4:] or 0))
    except pynvml.NVMLError:  # no driver library or no such GPU: ggml's figures then
        return None
