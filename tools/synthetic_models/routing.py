"""How a test model's routing is skewed towards a few hot experts, and simulated routing profiles."""

from __future__ import annotations

import math
import zlib
from typing import List

import numpy as np

from .shapes import DEFAULT_EXPERTS, DEFAULT_LAYERS, DEFAULT_USED

# residual-stream channel that carries a constant, used to skew routing
BIAS_CHANNEL = 0
BIAS_VALUE = 4.0
# router logit boost per unit of --router-skew and per unit of the
# (normalised) bias channel
ROUTER_SKEW_GAIN = 0.5


def hot_experts(
    layers: int = DEFAULT_LAYERS,
    experts: int = DEFAULT_EXPERTS,
    used: int = DEFAULT_USED,
    seed: int = 0,
) -> List[List[int]]:
    """The experts that ``--router-skew`` favours, per layer (sorted ids).

    ``min(2*used, experts//2)`` experts per layer, chosen from the seed; the
    choice does not depend on the skew value."""
    n_hot = max(1, min(2 * used, experts // 2))
    out = []
    for il in range(layers):
        rng = np.random.default_rng([int(seed), zlib.crc32(f"blk.{il}.router_hot".encode())])
        out.append(sorted(int(x) for x in rng.permutation(experts)[:n_hot]))
    return out


def simulated_profile(inv, seed: int = 0, tokens: int = 400) -> dict:
    """A routing profile (the schema `profile` writes) of `tokens` simulated tokens routed with a
    skewed preference per block, with pair counts. `inv` is a rotary_gguf Inventory."""
    rng = np.random.default_rng(seed)
    n, used = inv.n_expert, inv.n_expert_used
    layers = []
    for i in range(inv.n_layer):
        p = rng.dirichlet(np.full(n, 0.3))
        counts, pairs = np.zeros(n, dtype=int), np.zeros((n, n), dtype=int)
        for _ in range(tokens):
            chosen = rng.choice(n, size=used, replace=False, p=p)
            counts[chosen] += 1
            pairs[np.ix_(chosen, chosen)] += 1
        np.fill_diagonal(pairs, 0)
        layers.append({"index": i, "counts": counts.tolist(), "coactivation": pairs.tolist()})
    model = {"arch": inv.arch, "n_expert": n, "n_expert_used": used, "file": inv.path.name, "bytes": inv.file_bytes}
    return {"model": model, "tokens": tokens, "layers": layers}


def router_skew_value(value) -> float:
    """`--router-skew`, checked: a finite value >= 0."""
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError("router_skew must be a finite value >= 0")
    return value
