"""The user's cache folder for rotary-gguf: compiled native code, calibrations, GGUF headers read from the Hub."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/rotary-gguf, else ~/.cache/rotary-gguf."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rotary-gguf"
