"""Read and check a routing profile: per block, how often each expert was selected.

Schema (extra keys are allowed and ignored):

    {"model": {"arch", "n_expert", "n_expert_used", "file", "bytes"},
     "tokens": T,
     "layers": [{"index": i, "counts": [one int per expert, in ORIGINAL expert ids],
                 "coactivation": optional n_expert x n_expert symmetric pair counts}]}

Counts are always in the original model's expert ids, also when the profile was recorded on a
file we already reordered, so profiles from any of our files can be applied to any other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import arch as names
from .errors import UserError
from .inventory import Inventory


@dataclass(frozen=True)
class LayerProfile:
    """Selections of one block, indexed by original expert id."""

    counts: np.ndarray  # int64 [n_expert]
    coactivation: np.ndarray | None  # int64 [n_expert, n_expert]: tokens that selected both, or None


@dataclass(frozen=True)
class Profile:
    path: Path
    tokens: int
    layers: dict[int, LayerProfile]


def moe_layers(inv: Inventory) -> list[int]:
    """Blocks that have routed experts."""
    return sorted({t.layer for t in inv.expert_tensors})


def required_layers(inv: Inventory) -> list[int]:
    """MoE blocks a profile must cover: all but multi-token-prediction heads, which a normal run
    never routes through."""
    trunk = inv.n_layer - inv.hparam(names.NEXTN_LAYERS_HPARAM)
    return [i for i in moe_layers(inv) if i < trunk]


def load_profile(path: str | Path, inv: Inventory) -> Profile:
    """Parse `path` and check that it fits the model `inv`; UserError with one clear line if not."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such profile file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the profile ({e})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    where = f"profile {path}"
    if not isinstance(doc, dict):
        raise UserError(f"{where}: expected a JSON object")
    model = _field(doc, "model", dict, where)
    arch = _field(model, "arch", str, f"{where} model")
    if arch != inv.arch:
        raise UserError(f"{where} was recorded for arch {arch!r}, but {inv.path.name} is {inv.arch!r}")
    for key, expected in (("n_expert", inv.n_expert), ("n_expert_used", inv.n_expert_used)):
        value = _field(model, key, int, f"{where} model")
        if value != expected:
            raise UserError(f"{where} has {key} {value}, but {inv.path.name} has {expected}")
    tokens = _field(doc, "tokens", int, where)
    if tokens < 0:
        raise UserError(f"{where}: tokens is negative ({tokens})")

    known = set(moe_layers(inv))
    layers: dict[int, LayerProfile] = {}
    for n, entry in enumerate(_field(doc, "layers", list, where)):
        at = f"{where} layers[{n}]"
        if not isinstance(entry, dict):
            raise UserError(f"{at}: expected an object with index and counts")
        index = _field(entry, "index", int, at)
        if index not in known:
            raise UserError(f"{at}: block {index} has no routed experts in {inv.path.name}")
        if index in layers:
            raise UserError(f"{at}: block {index} appears twice")
        counts = _counts(_field(entry, "counts", list, at), (inv.n_expert,), f"{at} counts")
        coactivation = None
        if entry.get("coactivation") is not None:
            coactivation = _counts(entry["coactivation"], (inv.n_expert, inv.n_expert), f"{at} coactivation")
            if not np.array_equal(coactivation, coactivation.T):
                raise UserError(f"{at} coactivation: the matrix is not symmetric")
        layers[index] = LayerProfile(counts, coactivation)
    missing = [i for i in required_layers(inv) if i not in layers]
    if missing:
        raise UserError(f"{where} has no counts for block(s) {_ranges(missing)} of {inv.path.name}")
    return Profile(path, tokens, layers)


def _field(obj: dict, key: str, kind: type, where: str):
    if key not in obj:
        raise UserError(f"{where}: missing {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(f"{where}: {key!r} must be {'an' if kind is int else 'a'} {kind.__name__}, not {type(value).__name__}")
    return value


def _counts(value, shape: tuple[int, ...], where: str) -> np.ndarray:
    """A non-negative int64 array of exactly `shape` from nested JSON lists."""
    try:
        arr = np.array(value, dtype=object)
    except ValueError:
        arr = None
    if arr is None or arr.shape != shape:
        want = " x ".join(map(str, shape))
        raise UserError(f"{where}: expected {want} counts (one per expert)")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in arr.flat):
        raise UserError(f"{where}: counts must be whole numbers")
    try:
        out = arr.astype(np.int64)
    except OverflowError:
        raise UserError(f"{where}: a count is too large") from None
    if (out < 0).any():
        raise UserError(f"{where}: negative count {int(out.min())}")
    return out


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    spans = [[values[0], values[0]]]
    for v in values[1:]:
        if v == spans[-1][1] + 1:
            spans[-1][1] = v
        else:
            spans.append([v, v])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
