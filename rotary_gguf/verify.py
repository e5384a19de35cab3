"""Check that two GGUF files compute the same function, in two independent ways.

1. Weights: every tensor of B holds A's bytes once fusion and expert order are undone (each expert's
   gate, up and down rows, router row and scales, looked up by original expert id; every other
   tensor byte for byte; the same metadata apart from our own rotary.* keys).
2. llama.cpp on the CPU: the same token sequences through both files, the logits after every token
   compared bit for bit, and the greedy continuations.

The files are loaded one after the other (a 21 GB model twice would not fit a 32 GB machine): A runs
greedily, B is fed A's tokens, so every step is compared even after a divergence.

Bit-identical logits are required unless the two files store the experts in different orders. Then
they cannot be: the router softmax is a SIMD reduction (ggml_vec_soft_max_f32 sums 8 or 16 lanes
in float), so permuting its inputs changes the rounding of the routing weights in the last bit, and
that difference propagates. For reordered files the weights check is the exact proof, and llama.cpp
must agree within LOGIT_RTOL of the logit range with equal greedy tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from . import arch as names
from .engine import Engine
from .errors import UserError
from .inventory import Inventory, TensorInfo, read_inventory
from .log import logger

PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "def fibonacci(n):\n    return",
    "1, 1, 2, 3, 5, 8, 13,",
)
NEW_TOKENS = 8
N_CTX = 512
# Allowed logit difference, relative to the largest |logit| of the reference, where two runs of the
# same weights round differently (reordered experts here; other kernel paths in `bench`). Measured
# on the 4-block test models: up to 3e-5; a router permuted apart from its experts gives O(1).
LOGIT_RTOL = 1e-3
READ_CHUNK = 16 * 2**20


class OutputsDiffer(UserError):
    """The two models do not compute the same function."""

    exit_code = 1


@dataclass
class Trace:
    """One sequence through one model: the logits after the prompt and after each fed token."""

    logits: list[np.ndarray]

    @property
    def greedy(self) -> list[int]:
        return [int(np.argmax(v)) for v in self.logits]


@dataclass
class VerifyResult:
    a: Path
    b: Path
    weights_difference: str | None  # the first weight that differs, or None
    orders_differ: bool  # the files store the experts in different orders
    prompts: list[list[int]]
    traces_a: list[Trace] = field(repr=False)
    traces_b: list[Trace] = field(repr=False)

    @property
    def compared(self) -> int:
        """Logit vectors compared."""
        return sum(len(t.logits) for t in self.traces_a)

    def _pairs(self):
        return ((x, y) for ta, tb in zip(self.traces_a, self.traces_b) for x, y in zip(ta.logits, tb.logits))

    @property
    def differing(self) -> int:
        """Logit vectors that are not bit-identical."""
        return sum(not _bit_identical(x, y) for x, y in self._pairs())

    @property
    def max_abs_diff(self) -> float:
        return max(max_logit_difference(x, y) for x, y in self._pairs())

    @property
    def tolerance(self) -> float:
        """Largest logit difference accepted: 0 unless the expert orders differ."""
        if not self.orders_differ:
            return 0.0
        return LOGIT_RTOL * max(float(np.abs(v).max()) for t in self.traces_a for v in t.logits)

    @property
    def first_divergence(self) -> tuple[int, int] | None:
        """(sequence, step) of the first greedy token that differs, or None."""
        for n, (ta, tb) in enumerate(zip(self.traces_a, self.traces_b)):
            for step, (x, y) in enumerate(zip(ta.greedy, tb.greedy)):
                if x != y:
                    return n, step
        return None

    @property
    def identical(self) -> bool:
        """Same weights, bit-identical logits, equal greedy tokens."""
        return self.weights_difference is None and self.differing == 0 and self.first_divergence is None

    @property
    def passed(self) -> bool:
        """Identical, or reordered with exact weights and logits within the tolerance."""
        return (
            self.weights_difference is None
            and self.first_divergence is None
            and (self.differing == 0 or self.max_abs_diff <= self.tolerance)
        )

    def summary(self) -> str:
        """One line: what was compared and how it came out."""
        what = f"{len(self.prompts)} sequences, {self.compared} logit vectors"
        weights = "weights match" + (" after undoing the expert order" if self.orders_differ else "")
        if self.identical:
            return f"identical: {weights}; {what} bit-identical, greedy tokens equal"
        if self.passed:
            return (
                f"equivalent: {weights}; {what}, max |logit difference| {self.max_abs_diff:.3g} "
                f"(tolerance {self.tolerance:.3g}: the router softmax rounds differently with reordered experts), "
                "greedy tokens equal"
            )
        parts = [self.weights_difference or weights]
        if self.differing:
            parts.append(f"{self.differing} of {what} differ, max |logit difference| {self.max_abs_diff:.3g}")
        diverged = self.first_divergence
        if diverged is not None:
            parts.append(f"greedy tokens differ from sequence {diverged[0]} step {diverged[1]}")
        return "outputs differ: " + "; ".join(parts)

    def to_json(self) -> dict:
        return {
            "a": str(self.a),
            "b": str(self.b),
            "passed": self.passed,
            "identical": self.identical,
            "weights_difference": self.weights_difference,
            "orders_differ": self.orders_differ,
            "sequences": len(self.prompts),
            "logit_vectors": self.compared,
            "differing_vectors": self.differing,
            "max_abs_diff": self.max_abs_diff,
            "tolerance": self.tolerance,
            "first_divergence": self.first_divergence,
            "greedy_a": [t.greedy for t in self.traces_a],
            "greedy_b": [t.greedy for t in self.traces_b],
        }


def verify_models(
    a: str | os.PathLike,
    b: str | os.PathLike,
    *,
    prompts: Sequence[str] = PROMPTS,
    new_tokens: int = NEW_TOKENS,
) -> VerifyResult:
    """Compare B's weights with A's, then run `prompts` plus `new_tokens` greedy tokens through A
    and the same tokens through B."""
    a, b = Path(a), Path(b)
    inv_a, inv_b = read_inventory(a), read_inventory(b)
    logger.info("comparing the weights of %s and %s", a.name, b.name)
    weights_difference = compare_weights(inv_a, inv_b)
    orders_differ = any(_order(inv_a, i) != _order(inv_b, i) for i in _moe_layers(inv_a) | _moe_layers(inv_b))
    logger.info("running %s", a.name)
    with Engine.load(a, n_ctx=N_CTX) as engine:
        sequences = [engine.tokenize(p) for p in prompts]
        n_vocab = engine.n_vocab
        traces_a = [logit_trace(engine, tokens, new_tokens) for tokens in sequences]
    logger.info("running %s", b.name)
    with Engine.load(b, n_ctx=N_CTX) as engine:
        if engine.n_vocab != n_vocab:
            raise OutputsDiffer(f"{a.name} and {b.name} have different vocabularies ({n_vocab} and {engine.n_vocab} tokens)")
        traces_b = [logit_trace(engine, tokens, new_tokens, feed=t.greedy) for tokens, t in zip(sequences, traces_a)]
    return VerifyResult(a, b, weights_difference, orders_differ, sequences, traces_a, traces_b)


def logit_trace(engine: Engine, prompt: list[int], new_tokens: int, feed: list[int] | None = None) -> Trace:
    """Logits after `prompt` and after each of `new_tokens` tokens: the model's own greedy choice,
    or the tokens of `feed`."""
    engine.reset()
    engine.eval(prompt)
    logits = [engine.logits()]
    for step in range(new_tokens):
        token = feed[step] if feed is not None else int(np.argmax(logits[-1]))
        engine.eval([token])
        logits.append(engine.logits())
    return Trace(logits)


def _bit_identical(x: np.ndarray, y: np.ndarray) -> bool:
    return x.shape == y.shape and np.array_equal(x.view(np.uint32), y.view(np.uint32))


def max_logit_difference(x: np.ndarray, y: np.ndarray) -> float:
    if _bit_identical(x, y):
        return 0.0
    d = np.abs(x.astype(np.float64) - y.astype(np.float64))
    return float(np.nanmax(np.where(np.isnan(d), np.inf, d)))


# --- weights -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Part:
    """One logical per-expert tensor (gate, up, down, router, a scale) inside a stored tensor."""

    tensor: TensorInfo
    half: int | None  # 0: gate rows, 1: up rows of a fused gate_up tensor; None: the whole slice

    def expert_bytes(self, n_expert: int) -> int:
        size = self.tensor.nbytes // n_expert
        return size // 2 if self.half is not None else size

    def offset(self, position: int, n_expert: int) -> int:
        size = self.tensor.nbytes // n_expert
        return self.tensor.offset + position * size + (self.half or 0) * (size // 2)

    def type_and_expert_shape(self) -> tuple[int, tuple[int, ...]]:
        shape = list(self.tensor.shape[:-1])
        if self.half is not None:
            shape[1] //= 2
        return self.tensor.ggml_type, tuple(shape)


def compare_weights(a: Inventory, b: Inventory) -> str | None:
    """The first way B's weights differ from A's once fusion and expert order are undone, or None."""
    if a.arch != b.arch or a.n_expert != b.n_expert:
        return f"different models: {a.arch} with {a.n_expert} experts vs {b.arch} with {b.n_expert}"
    ours = names.ROTARY_KEY_PREFIX
    kv_a = {k: v for k, v in a.kv_raw.items() if not k.startswith(ours)}
    kv_b = {k: v for k, v in b.kv_raw.items() if not k.startswith(ours)}
    if kv_a != kv_b:
        key = next(k for k in sorted(kv_a.keys() | kv_b.keys()) if kv_a.get(k) != kv_b.get(k))
        return f"metadata {key} differs"
    spec = names.SUPPORTED.get(a.arch)
    parts_a, plain_a = _split(a, spec)
    parts_b, plain_b = _split(b, spec)
    if parts_a.keys() != parts_b.keys() or plain_a.keys() != plain_b.keys():
        extra = sorted((parts_a.keys() | plain_a.keys()) ^ (parts_b.keys() | plain_b.keys()))
        return f"tensor {extra[0]} is in only one of the files"
    with open(a.path, "rb", buffering=0) as fa, open(b.path, "rb", buffering=0) as fb:
        for name, ta in plain_a.items():
            tb = plain_b[name]
            if (ta.ggml_type, ta.shape) != (tb.ggml_type, tb.shape):
                return f"{name}: {ta.type_name} {ta.shape} vs {tb.type_name} {tb.shape}"
            if not _same_bytes(fa, ta.offset, fb, tb.offset, ta.nbytes):
                return f"{name} differs"
        for name, pa in parts_a.items():
            pb = parts_b[name]
            if pa.type_and_expert_shape() != pb.type_and_expert_shape():
                return f"{name}: type or shape differs"
            layer = pa.tensor.layer
            pos_a, pos_b = _positions(a, layer), _positions(b, layer)
            size = pa.expert_bytes(a.n_expert)
            for expert in range(a.n_expert):
                at_a, at_b = pa.offset(pos_a[expert], a.n_expert), pb.offset(pos_b[expert], b.n_expert)
                if not _same_bytes(fa, at_a, fb, at_b, size):
                    return f"{name} of expert {expert} differs"
    return None


def _split(inv: Inventory, spec: names.ArchSpec | None) -> tuple[dict[str, _Part], dict[str, TensorInfo]]:
    """Per-expert parts by logical name (a fused tensor counts as its gate and up parts), and all
    other tensors by name."""
    parts: dict[str, _Part] = {}
    plain: dict[str, TensorInfo] = {}
    for t in inv.tensors:
        if spec is None or not spec.permuted_with_experts(t.name):
            plain[t.name] = t
        elif t.expert_kind == "gate_up":
            parts[names.expert_tensor_name(t.layer, "gate")] = _Part(t, 0)
            parts[names.expert_tensor_name(t.layer, "up")] = _Part(t, 1)
        else:
            parts[t.name] = _Part(t, None)
    return parts, plain


def _moe_layers(inv: Inventory) -> set[int]:
    return {t.layer for t in inv.expert_tensors}


def _order(inv: Inventory, layer: int) -> list[int]:
    """position -> original expert id."""
    return inv.expert_order(layer) or list(range(inv.n_expert))


def _positions(inv: Inventory, layer: int) -> list[int]:
    """original expert id -> position in the file."""
    where = [0] * inv.n_expert
    for position, expert in enumerate(_order(inv, layer)):
        where[expert] = position
    return where


def _same_bytes(fa, at_a: int, fb, at_b: int, n: int) -> bool:
    while n:
        step = min(n, READ_CHUNK)
        if os.pread(fa.fileno(), step, at_a) != os.pread(fb.fileno(), step, at_b):
            return False
        at_a, at_b, n = at_a + step, at_b + step, n - step
    return True
