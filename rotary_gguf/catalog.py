"""models.toml: the models rotary-gguf knows, where to get them, and which entry a file matches."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from .errors import UserError
from .inventory import Inventory

CATALOG_PATH = Path(__file__).with_name("models.toml")
# A models.toml of the user's own: its entries are added to the built-in ones (same name: theirs wins).
USER_CATALOG_ENV = "ROTARY_GGUF_MODELS"
_SHAPE_KEYS = ("arch", "n_layer", "n_expert", "n_expert_used", "n_embd", "n_ff_exp")


def _read(path: Path) -> list[dict]:
    try:
        with open(path, "rb") as f:
            models = tomllib.load(f).get("model", [])
    except OSError as e:
        raise UserError(f"{path}: cannot read the model catalog ({e.strerror or e})") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not a valid models.toml ({e})") from None
    if not isinstance(models, list) or not all(isinstance(m, dict) and isinstance(m.get("name"), str) for m in models):
        raise UserError(f"{path}: every [[model]] entry needs a name")
    return models


def load_catalog(path: Path = CATALOG_PATH) -> list[dict]:
    """The built-in entries, then those of the file named by $ROTARY_GGUF_MODELS (replacing a
    built-in entry of the same name)."""
    models = {m["name"].lower(): m for m in _read(path)}
    user = os.environ.get(USER_CATALOG_ENV)
    if user:
        models.update({m["name"].lower(): m for m in _read(Path(user).expanduser())})
    return list(models.values())


def match(inv: Inventory, catalog: list[dict] | None = None) -> list[str]:
    """Names of the catalog entries whose architecture and shape equal the file's."""
    figures = {k: getattr(inv, k) for k in _SHAPE_KEYS}
    # Files with a NextN/MTP head carry one extra block.
    return [
        m["name"]
        for m in (catalog if catalog is not None else load_catalog())
        if all(k in m for k in _SHAPE_KEYS)
        and all(m[k] == figures[k] for k in _SHAPE_KEYS if k != "n_layer")
        and figures["n_layer"] in (m["n_layer"], m["n_layer"] + 1)
    ]
