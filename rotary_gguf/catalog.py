"""models.toml: the models rotary-gguf knows, and which entry a file matches."""

from __future__ import annotations

import tomllib
from pathlib import Path

from .inventory import Inventory

CATALOG_PATH = Path(__file__).with_name("models.toml")
_SHAPE_KEYS = ("arch", "n_layer", "n_expert", "n_expert_used", "n_embd", "n_ff_exp")


def load_catalog(path: Path = CATALOG_PATH) -> list[dict]:
    with open(path, "rb") as f:
        return tomllib.load(f)["model"]


def match(inv: Inventory, catalog: list[dict] | None = None) -> list[str]:
    """Names of the catalog entries whose architecture and shape equal the file's."""
    figures = {k: getattr(inv, k) for k in _SHAPE_KEYS}
    # Files with a NextN/MTP head carry one extra block.
    return [
        m["name"]
        for m in (catalog if catalog is not None else load_catalog())
        if all(m[k] == figures[k] for k in _SHAPE_KEYS if k != "n_layer")
        and figures["n_layer"] in (m["n_layer"], m["n_layer"] + 1)
    ]
