"""The settings that determine a trained demo model (saved with its checkpoints and in its GGUF)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Settings:
    """Everything that determines the trained model (saved with checkpoints and in the GGUF)."""

    arch: str = "qwen3moe"
    vocab: int = 4096
    layers: int = 4
    embd: int = 256
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    experts: int = 32
    used: int = 4
    ff: int = 128
    seq_len: int = 512
    batch: int = 6
    steps: int = 1000
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.1
    aux_loss: float = 0.002
    dropout: float = 0.1
    rope_base: float = 10000.0
    rms_eps: float = 1e-6
    holdout: float = 0.05
    text_limit: int = 0
    seed: int = 0
    mtp_loss: float = 0.3  # qwen35moe: weight of the MTP head's loss
