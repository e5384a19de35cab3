"""Routing telemetry: which experts each token selects in each MoE block, in the model's original
expert ids, and the routing profile `convert --profile` reads (schema in profile_io).

The selections are read by a native eval callback (native.MoeTap) at the `ffn_moe_topk-<block>`
nodes, during prompt processing and decode. Counts are kept in the file's expert positions and
mapped back here, through `rotary.expert_order.blk.N`, for files our converter reordered.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from . import native
from .engine import Engine, SamplingParams
from .errors import UserError
from .inventory import Inventory, read_inventory
from .profile_io import required_layers

DEFAULT_WINDOW = 256  # tokens per block in the recent counts
PROFILE_BATCH = 64  # profiling outputs every token: logits of n_batch x n_vocab floats
PROFILE_SAMPLING = SamplingParams(temperature=0.7, top_p=0.9, seed=0)  # varied text, yet repeatable

# The mixed set `profile` runs when given no prompts: prose, code, math and dialogue.
BUILTIN_PROMPTS = (
    "The lighthouse keeper had not spoken to anyone in three weeks when the supply boat finally rounded "
    "the point. She watched it from the gallery, counting the strokes of the oars, and wondered",
    "Rivers shape the land they cross. Over thousands of years a meandering river cuts into its outer banks, "
    "builds sandbars on the inner ones, and slowly shifts its course across the valley floor. Geologists",
    "def merge_intervals(intervals):\n    \"\"\"Merge overlapping [start, end] intervals and return them sorted.\"\"\"\n"
    "    if not intervals:\n        return []\n    intervals = sorted(intervals)\n    merged = [intervals[0]]\n",
    "#include <stdio.h>\n#include <string.h>\n\n/* Reverse a string in place. */\nvoid reverse(char *s) {\n"
    "    size_t n = strlen(s);\n",
    "Problem: A train leaves at 9:40 and travels 168 km at an average speed of 72 km/h. When does it arrive?\n"
    "Solution: The travel time is 168 / 72 hours, which is",
    "Prove that the sum of the first n odd numbers is n^2.\nProof by induction. For n = 1 the sum is 1 = 1^2. "
    "Assume that 1 + 3 + ... + (2k - 1) = k^2. Then",
    "Customer: Hi, my order arrived yesterday but the charger is missing from the box.\n"
    "Agent: I'm sorry to hear that! Could you tell me your order number?\nCustomer: Sure, it's 40213.\nAgent:",
    "Interviewer: What got you interested in astronomy in the first place?\n"
    "Scientist: Honestly, it was a cheap pair of binoculars and a very dark sky at my grandparents' farm.\n"
    "Interviewer: And what do you work on now?\nScientist:",
)


class RoutingTelemetry:
    """Expert selection counts of one model: since the last reset and over the last `window`
    tokens of each block. Pass it to `Engine.load(..., telemetry=...)`; read it from any thread."""

    def __init__(self, inv: Inventory, *, window: int = DEFAULT_WINDOW, pairs: bool = False):
        if not inv.is_moe:
            raise UserError(f"{inv.path.name} is not a Mixture-of-Experts model: it has no expert routing to observe")
        self.inventory = inv
        self.n_expert, self.n_expert_used, self.window = inv.n_expert, inv.n_expert_used, window
        self.layers = required_layers(inv)  # the MoE blocks a forward pass routes through
        self._tap = native.MoeTap(inv.n_layer, inv.n_expert, inv.n_expert_used, window=window, pairs=pairs)
        self.callback, self.user_data = self._tap.callback, self._tap.user_data  # for Engine.load
        self._order = np.array([expert_order(inv, i) for i in range(inv.n_layer)], dtype=np.int64)
        self._enabled = True

    @classmethod
    def for_model(cls, path: str | os.PathLike, **kwargs) -> "RoutingTelemetry":
        return cls(read_inventory(path), **kwargs)

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        """Off: llama.cpp runs its graph unsplit and nothing is counted (the counts stay)."""
        self._tap.set_enabled(value)
        self._enabled = value

    def reset(self) -> None:
        """Zero every count; call between generations."""
        self._tap.reset()

    @property
    def tokens(self) -> int:
        """Tokens routed through the first MoE block since the last reset."""
        return int(self._tap.tokens[self.layers[0]])

    def layer_tokens(self) -> np.ndarray:
        """[n_layer] tokens routed through each block (0 for blocks without experts)."""
        return self._tap.tokens.copy()

    def counts(self) -> np.ndarray:
        """[n_layer, n_expert] selections since the last reset, by original expert id."""
        return self._original(self._tap.counts)

    def recent(self) -> np.ndarray:
        """[n_layer, n_expert] selections of each block's last `window` tokens, by original id."""
        return self._original(self._tap.recent)

    def pairs(self) -> np.ndarray | None:
        """[n_layer, n_expert, n_expert] tokens that selected both experts (original ids), when
        the telemetry was made with pairs=True."""
        if self._tap.pairs is None:
            return None
        out = np.zeros_like(self._tap.pairs)
        for layer, order in enumerate(self._order):
            out[layer][np.ix_(order, order)] = self._tap.pairs[layer]
        return out

    def busiest_share(self, top: int) -> float:
        """The share of all selections that went to each MoE block's `top` most selected experts."""
        counts = self._tap.counts[self.layers]
        return float(np.sort(counts, axis=1)[:, -top:].sum() / max(int(counts.sum()), 1))

    def original_ids(self, layer: int, positions) -> list[int]:
        """The original expert ids of `layer`'s experts at `positions` in the file."""
        return self._order[layer][np.asarray(positions, dtype=np.int64)].tolist()

    def _original(self, by_position: np.ndarray) -> np.ndarray:
        out = np.zeros_like(by_position)
        np.put_along_axis(out, self._order, by_position, axis=1)
        return out

    def profile(self, **extra) -> dict:
        """The routing profile of everything routed since the last reset (profile_io's schema).
        Every block must have seen every token: load with `Engine.output_every_token` set."""
        tokens = self._tap.tokens[self.layers]
        if (tokens != tokens[0]).any():
            raise RuntimeError(f"blocks routed different numbers of tokens ({sorted(set(tokens.tolist()))}); "
                               "the engine must output every token while profiling")
        counts, pairs = self.counts(), self.pairs()
        inv = self.inventory
        layers = []
        for i in self.layers:
            entry = {"index": i, "counts": counts[i].tolist()}
            if pairs is not None:
                entry["coactivation"] = pairs[i].tolist()
            layers.append(entry)
        return {
            "model": {
                "arch": inv.arch,
                "n_expert": inv.n_expert,
                "n_expert_used": inv.n_expert_used,
                "file": inv.path.name,
                "bytes": inv.file_bytes,
                "layout": inv.layout,
            },
            "tokens": int(tokens[0]),
            **extra,
            "layers": layers,
        }


def expert_order(inv: Inventory, layer: int) -> list[int]:
    """Position -> original expert id of `layer`: the converter's permutation, else the identity."""
    return inv.expert_order(layer) or list(range(inv.n_expert))  # the reader checked it is a permutation


def write_profile(profile: dict, path: str | os.PathLike) -> Path:
    """Write `profile` as JSON to `path` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise UserError(f"{path}: the folder {folder} does not exist")
    if path.is_dir():
        raise UserError(f"{path}: is a folder; give a file name for the profile")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(profile, f, separators=(",", ":"))
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write the profile to {path}: {e.strerror or e}") from None
    finally:
        if tmp is not None and Path(tmp).exists():
            Path(tmp).unlink()
    return path


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a file: a JSON list of strings (.json), else one prompt per non-empty line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such prompts file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the prompts ({e})") from None
    if path.suffix.lower() == ".json":
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise UserError(f"{path}: expected a JSON list of strings")
    else:
        prompts = text.splitlines()
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise UserError(f"{path}: no prompts in the file")
    return prompts


def record_profile(engine: Engine, telemetry: RoutingTelemetry, prompts: list[str], tokens: int,
                   on_prompt=None) -> dict:
    """Run each prompt in a fresh context and generate up to `tokens` tokens after it; the routing
    profile of every token processed. `on_prompt(index, stats)` is told as each one finishes."""
    engine.output_every_token = True  # the last block of some archs routes only output tokens
    telemetry.reset()
    generated = 0
    for index, text in enumerate(prompts):
        prompt = engine.tokenize(text)
        engine.check_prompt(prompt)
        engine.reset()
        stats = None
        for event in engine.generate(prompt, max_tokens=tokens, sampling=PROFILE_SAMPLING):
            stats = event.stats
        generated += stats.completion_tokens
        if on_prompt is not None:
            on_prompt(index, stats)
    return telemetry.profile(prompts=len(prompts), generated_tokens=generated)
