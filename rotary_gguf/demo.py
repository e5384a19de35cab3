"""The built-in demo model that commands use when no MODEL is given."""

from __future__ import annotations

from pathlib import Path

from .errors import UserError


def resolve_model(model: Path | None) -> Path:
    if model is not None:
        return model
    raise UserError("no built-in demo model yet: pass a GGUF file")
