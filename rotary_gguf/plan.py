"""The planner: where every tensor lives for a VRAM budget. Pure Python, no llama.cpp import.

Its output, a `Placement`, is what the engine hands to llama.cpp: the device list, the
tensor_buft_overrides (pattern -> buffer type name, first match wins), and load options.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Placement:
    """How llama.cpp should load a model."""

    devices: tuple[str, ...] = ()  # ggml device names for llama_model_params.devices; () = CPU only
    overrides: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # (regex, buffer type name)
    n_gpu_layers: int = 0  # -1: every layer "on the accelerator", so the overrides decide
    offload_min_batch: int | None = None  # GGML_OP_OFFLOAD_MIN_BATCH for host-resident ops
    use_mmap: bool = True
    repack: bool = True  # llama.cpp's CPU repacked buffer types (faster CPU matmuls)

    @classmethod
    def all_cpu(cls) -> "Placement":
        return cls()
