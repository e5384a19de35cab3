"""What a MODEL argument names: the built-in demo model when none is given, a GGUF file, or a model
by name (see hub.py). `model_source` is the one place names are resolved."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    from .hub import HubModel
    from .inventory import Inventory

# A small qwen3moe trained on CPython's documentation by tools/train_demo_model.py (see README).
DEMO_MODEL = Path(__file__).with_name("data") / "demo-moe.gguf"


def _is_path(text: str) -> bool:
    """Text that can only mean a file: it ends in .gguf, or starts like a path."""
    return (text.lower().endswith(".gguf") and not text.startswith("hf:")) or text.startswith(("/", "./", "../", "~"))


def model_source(model: str | Path | HubModel | None) -> Path | HubModel:
    """The demo model for None; a path that exists (or can only be a path) as it is; else a model
    name: its downloaded file when it has been pulled, else the HubModel to fetch."""
    if model is None:
        return DEMO_MODEL
    if not isinstance(model, str):
        return model
    path = Path(model).expanduser()
    if path.exists() or _is_path(model):
        return path
    from .hub import cached_file, parse_name

    named = parse_name(model)
    return cached_file(named) or named


def resolve_model(model: str | Path | HubModel | None) -> Path:
    """The local GGUF file a MODEL argument names; a model name not yet pulled is one line saying so."""
    source = model_source(model)
    if isinstance(source, Path):
        return source
    raise UserError(f"{source.name} is not downloaded yet: run `rotary-gguf pull {source.name}` first "
                    "(`plan` and `inspect` work before the download)")


def model_inventory(source: Path | HubModel) -> Inventory:
    """The inventory of a `model_source`: from the file, or from the header alone on the Hub."""
    if isinstance(source, Path):
        from .inventory import read_inventory

        return read_inventory(source)
    from .hub import remote_inventory

    return remote_inventory(source)
