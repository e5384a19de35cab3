"""Byte sizes as users type them ("8GiB", "6.3GB", "512M") and as we print them."""

from __future__ import annotations

import re

from .errors import UserError

_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kb": 1000, "kib": 1024,
    "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1024**4, "tb": 1000**4, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str, flag: str = "size") -> int:
    """'8GiB' -> 8589934592. Bare letters K/M/G/T are binary; KB/MB/GB/TB are decimal. A number
    without a unit is refused (is `--vram 8` 8 GiB or 8 bytes?), but for 0."""
    m = _SIZE.match(text)
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise UserError(f"bad size {text!r}: use a number with a unit, e.g. 8GiB, 6.3GB, 512MiB")
    if not unit and float(m.group(1)) != 0:
        raise UserError(f"{flag} {text.strip()}: give a unit, e.g. {text.strip()}GiB or 7.5GB")
    return int(float(m.group(1)) * _UNITS[unit])


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
