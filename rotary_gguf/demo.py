"""The built-in demo model that commands use when no MODEL is given."""

from __future__ import annotations

from pathlib import Path

# A small qwen3moe trained on CPython's documentation by tools/train_demo_model.py (see README).
DEMO_MODEL = Path(__file__).with_name("data") / "demo-moe.gguf"


def resolve_model(model: Path | None) -> Path:
    return model if model is not None else DEMO_MODEL
