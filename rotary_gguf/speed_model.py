"""The speed model: predicted prompt and decode tokens per second of a placement, from the speeds
calibrated on this machine (`calibration`), the model's tensor bytes and types, and the hit rates
of a split-compute cache. Pure arithmetic, like the memory model in `plan`.

A decoded token reads every weight it uses once: the non-expert weights and the experts it selects
in every block. Each part costs its bytes over the speed of the device that holds it, for the
tensor's type. Host expert blocks add two graph splits each (the hidden state and routing go to the
CPU and the result back): measured as a whole on a real model (`calibration`), wake-ups, round
trips and the graph transfers of ggml-rpc included. Prompt processing runs the same weights
at batch size, so it uses the speeds measured at a batch; a GPU that runs host experts itself for
large batches (CUDA's offload_op) pays for uploading them once per batch instead. Over several
accelerators each part runs at the speed of the device that holds it, and every crossing from one
accelerator to another costs a graph launch on each side and a copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from . import arch as names
from .decode_cost import field_hit_rate


ANY_TYPE = "*"  # a rate for every weight type (published figures know no per-type speeds)

# llama.cpp's attention runs over the KV cache's cells up to the last one used, in steps of 256
# (at least 256), the cells not in use masked; `plan` predicts a short conversation's 256 cells
KV_WINDOW = 256


def kv_cells_read(tokens: int, flash_attn: bool = True) -> int:
    """The KV cache cells attention reads per token once `tokens` cells are in use: flash attention
    skips the masked ones (ggml's CPU kernel cell by cell, CUDA's by tiles), the plain matrix
    multiplies read the whole window."""
    return tokens if flash_attn else max(KV_WINDOW, -(-tokens // KV_WINDOW) * KV_WINDOW)


def kv_row_bytes(kv_type: str, n: int) -> int:
    """Bytes of `n` values in a KV cache of `kv_type` ("f16", "q8_0", "q4_0")."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[kv_type.upper()]]
    return n // block * size


@dataclass(frozen=True)
class DeviceSpeeds:
    """One device's calibrated speeds. Rates are weight bytes per second (at batch 1 for decode;
    weight bytes times tokens per second at `batch` for prompts), per ggml type name."""

    name: str
    description: str
    decode: dict[str, float]
    prompt: dict[str, float]
    batch: int  # the batch `prompt` was measured at
    graph_seconds: float  # the fixed cost of one graph: launch and sync
    op_seconds: float = 0.0  # what each op of a graph adds (thread barrier, kernel launch)
    copy_seconds: float = 0.0  # the fixed cost of one small host <-> device copy
    upload_pinned: float | None = None  # host -> device bytes per second, from page-locked memory
    upload_pageable: float | None = None  # from ordinary host memory
    # an expert cache's uploads, one expert's projection per copy, from the host memory it uses
    # (pinned where the device has it): bytes per second by copy size
    expert_uploads: dict[int, float] = field(default_factory=dict)
    experts: dict[str, float] = field(default_factory=dict)  # decode's expert op (MUL_MAT_ID), per type
    # a prompt's expert FFN (gate, up, down, the weighting and sum of a token's outputs), per `ffn_key`
    # (types and widths) and tokens of the batch sharing each selected expert: bytes of every token's
    # selected experts per second, each expert's read from memory included
    prompt_experts: dict[str, dict[int, float]] = field(default_factory=dict)
    host_block_seconds: float | None = None  # what a block with host experts adds beside this accelerator
    recurrent: float | None = None  # recurrent-state bytes per second of a Gated DeltaNet block's update
    prompt_recurrent: float | None = None  # the same per token of a prompt's batch, the state carried along

    def recurrent_rate(self, phase: str = "decode") -> float:
        """State bytes per second (and token) of the linear-attention update in `phase`: as
        measured, else at the speed f32 weights are read."""
        measured = self.recurrent if phase == "decode" else self.prompt_recurrent or self.recurrent
        return measured or self.rate("decode", "F32")

    def expert_rate(self, type_name: str) -> float:
        """Bytes per second of decode's expert op, else the plain matrix-vector rate."""
        return self.experts.get(type_name) or self.rate("decode", type_name)

    def prompt_expert_seconds(self, ffn: str, nbytes: int, pairs: np.ndarray) -> float | None:
        """Seconds of a prompt's expert FFN `ffn` (an `ffn_key`) over experts of `nbytes`, where
        `pairs[k]` tokens use an expert that k + 1 tokens of the batch share: at the FFN's speed
        measured at that share (its seconds per byte interpolated on a log scale between the shares
        measured, the nearest beyond them). None where it was not measured for `ffn`."""
        curve = self.prompt_experts.get(ffn)
        if not curve:
            return None
        shares = sorted(curve)
        per_byte = np.interp(np.log(np.arange(1, len(pairs) + 1)), np.log(shares), [1.0 / curve[k] for k in shares])
        return float(nbytes * np.dot(pairs, per_byte))

    @property
    def bulk_upload_rate(self) -> float:
        """Bytes per second of one large upload: from pinned memory where measured, else ordinary."""
        return self.upload_pinned or self.upload_pageable or 1e9

    def expert_upload_rate(self, copy_bytes: float) -> float:
        """Bytes per second of uploads in copies of `copy_bytes`: interpolated on a log scale
        between the copy sizes measured (the nearest beyond them), else the bulk upload speed."""
        if not self.expert_uploads:
            return self.bulk_upload_rate
        sizes = sorted(self.expert_uploads)
        seconds_per_byte = np.interp(np.log(copy_bytes), np.log(sizes), [1.0 / self.expert_uploads[k] for k in sizes])
        return float(1.0 / seconds_per_byte)

    def read_seconds(self, nbytes: float, phase: str, type_name: str, batch: int = 1) -> float:
        """Seconds per token to use `nbytes` of weights of `type_name`: at decode, their read; in a
        prompt of `batch` tokens, one read shared by the batch unless its compute takes longer."""
        if phase == "decode" or batch <= 1:
            return nbytes / self.rate("decode", type_name)
        return max(nbytes / (batch * self.rate("decode", type_name)), nbytes / self.rate("prompt", type_name))

    def rate(self, phase: str, type_name: str) -> float:
        """Bytes per second for `type_name` in `phase` ("decode" or "prompt"); a type that was not
        measured takes the slowest measured one (a pessimistic guess, never a division by zero)."""
        rates = self.decode if phase == "decode" else self.prompt
        if type_name in rates:
            return rates[type_name]
        if ANY_TYPE in rates:
            return rates[ANY_TYPE]
        return min(rates.values()) if rates else 1e9

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, d: dict) -> "DeviceSpeeds":
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        if "prompt_experts" in fields:  # JSON keys are strings: the shares back to ints
            fields["prompt_experts"] = {t: {int(k): v for k, v in c.items()} for t, c in fields["prompt_experts"].items()}
        if "expert_uploads" in fields:  # and the copy sizes
            fields["expert_uploads"] = {int(k): v for k, v in fields["expert_uploads"].items()}
        return cls(**fields)


def ffn_key(gate: str, up: str, down: str, n_embd: int, n_ff: int) -> str:
    """The name of an expert FFN by its weight types (gate, up, down) and widths, e.g. "Q4_K
    2048x512", or "Q4_K/Q4_K/Q6_K 1024x512" where they differ (Q4_K_M quantizes some blocks' down
    projections to Q6_K). A prompt's FFN is calibrated per key: its speed per byte depends on both."""
    types = gate if gate == up == down else f"{gate}/{up}/{down}"
    return f"{types} {n_embd}x{n_ff}"


def ffn_parts(key: str) -> tuple[tuple[str, str, str], int, int]:
    """The (gate, up, down) weight types, n_embd and n_ff of an `ffn_key`."""
    types, shape = key.split(" ")
    n_embd, n_ff = (int(n) for n in shape.split("x"))
    gate, up, down = types.split("/") if "/" in types else (types,) * 3
    return (gate, up, down), n_embd, n_ff


@dataclass(frozen=True)
class Weights:
    """A model's weight bytes as the speed model needs them: per (type name) for the non-expert
    weights a token reads, and per block the bytes of one expert, by type."""

    other: dict[str, int]
    expert: dict[int, dict[str, int]]  # block -> type -> bytes of one expert's tensors
    n_expert: int
    n_expert_used: int
    n_vocab: int = 0
    graph_nodes: int = 0  # ops in a decode graph (estimated from the blocks' kinds: `estimated_nodes`)
    recurrent_state: int = 0  # recurrent-state bytes every linear-attention block updates per token, all together
    # K and V bytes a token's attention reads from the KV cache, all full-attention blocks together, by type
    kv_cache: dict[str, int] = field(default_factory=dict)
    expert_ffn: dict[int, str] = field(default_factory=dict)  # block -> `ffn_key` of its experts

    @classmethod
    def from_tensors(cls, tensors, n_expert: int, n_expert_used: int, attention: list[str], n_vocab: int,
                     ffn_shape: tuple[int, int] | None = None) -> "Weights":
        """From (name, type name, bytes) of every tensor and the kind of every block that runs
        ("full" or "linear"); token embeddings are a lookup, not read whole, and blocks beyond
        `attention` (a NextN head) do not run. With the experts' (n_embd, n_ff): each block's
        `ffn_key`."""
        n_layer = len(attention)
        other: dict[str, int] = {}
        expert: dict[int, dict[str, int]] = {}
        projections: dict[int, dict[str, str]] = {}  # block -> projection -> type
        for name, type_name, nbytes in tensors:
            layer = names.block_index(name)
            if layer is not None and layer >= n_layer:
                continue
            if kind := names.expert_kind(name):
                per = expert.setdefault(layer, {})
                per[type_name] = per.get(type_name, 0) + nbytes // n_expert
                projections.setdefault(layer, {}).update(dict.fromkeys(kind.split("_"), type_name))
            elif name != "token_embd.weight":
                other[type_name] = other.get(type_name, 0) + nbytes
        ffn = {i: ffn_key(p["gate"], p["up"], p["down"], *ffn_shape) for i, p in projections.items()
               if ffn_shape and {"gate", "up", "down"} <= set(p)}
        return cls(other, expert, n_expert, n_expert_used, n_vocab, estimated_nodes(attention), expert_ffn=ffn)

    @classmethod
    def from_inventory(cls, inv, kv_type: str = "f16", kv_cells: int = KV_WINDOW) -> "Weights":
        """From a model's header (`inventory.Inventory`), its attention reading `kv_cells` cells of
        a KV cache of `kv_type`."""
        n_run = inv.n_layer - inv.hparam("nextn_predict_layers")
        embd = inv.by_name.get("token_embd.weight")
        attention = inv.attention_layout()[:n_run]
        weights = cls.from_tensors([(t.name, t.type_name, t.nbytes) for t in inv.tensors], inv.n_expert,
                                   inv.n_expert_used, attention, embd.shape[1] if embd else 0,
                                   (inv.n_embd, inv.n_ff_exp) if inv.n_ff_exp else None)
        state = 4 * inv.hparam("ssm.state_size") * inv.hparam("ssm.inner_size")  # f32, per linear block
        row = inv.n_head_kv * (inv.head_dim_k + inv.head_dim_v)
        kv = attention.count("full") * kv_cells * kv_row_bytes(kv_type, row)
        return replace(weights, recurrent_state=attention.count("linear") * state, kv_cache={kv_type.upper(): kv} if kv else {})

    def used_seconds(self, layer: int, device: DeviceSpeeds, phase: str, share: float = 1.0, batch: int = 1,
                     routing: tuple[float, ...] | None = None) -> float:
        """Seconds per token `device` spends on `share` of the experts a token selects in `layer`. In
        a prompt of `batch` tokens the FFN's speed depends on how many tokens share each expert
        the batch selects, taken from `routing` (the block's hit-rate curve: the share of its selections its
        S busiest experts take, S = 0..n_expert; the field figures without one), each token drawing
        its experts independently. Where it was not measured in a prompt: every token's experts
        at the batched rate, and each expert the batch selects read once for its tokens."""
        per_expert = self.expert.get(layer, {})
        if phase == "decode" or batch <= 1:
            return share * sum(self.n_expert_used * n / device.expert_rate(t) for t, n in per_expert.items())
        curve = routing or field_routing(self.n_expert)
        pairs = batch_pairs(curve, self.n_expert_used, batch)
        key = self.expert_ffn.get(layer)
        measured = device.prompt_expert_seconds(key, sum(per_expert.values()), pairs) if key else None
        if measured is not None:
            return share * measured / batch
        seconds = 0.0
        for t, n in per_expert.items():
            compute = n / device.rate("prompt", t)
            read = max(n / device.expert_rate(t) - compute, 0.0)
            seconds += batch * self.n_expert_used * compute + batch_distinct(curve, self.n_expert_used, batch) * read
        return share * seconds / batch


@lru_cache(maxsize=64)
def field_routing(n_expert: int) -> tuple[float, ...]:
    """A block's hit-rate curve by the field figures (`decode_cost.FIELD_HIT_RATES`)."""
    return tuple(field_hit_rate(s, n_expert) for s in range(n_expert + 1))


def _select_chances(curve: tuple[float, ...], n_used: int) -> np.ndarray:
    """Each expert's chance that a token selects it, from a block's hit-rate curve."""
    return np.clip(np.diff(np.asarray(curve, dtype=float)) * n_used, 1e-12, 1.0 - 1e-12)


@lru_cache(maxsize=256)
def batch_pairs(curve: tuple[float, ...], n_used: int, batch: int) -> np.ndarray:
    """Expected token-expert pairs of a batch of `batch` tokens, by how many tokens share the
    expert: element k is the pairs whose expert k + 1 tokens select (a binomial count per expert)."""
    p = _select_chances(curve, n_used)[:, None]
    k = np.arange(batch + 1)
    log_choose = np.array([math.lgamma(batch + 1) - math.lgamma(i + 1) - math.lgamma(batch - i + 1) for i in k])
    chances = np.exp(log_choose + k * np.log(p) + (batch - k) * np.log1p(-p))  # experts x tokens sharing
    return (k * chances.sum(axis=0))[1:]


def batch_distinct(curve: tuple[float, ...], n_used: int, batch: int) -> float:
    """Expected distinct experts a batch of `batch` tokens selects."""
    return float(np.sum(1.0 - (1.0 - _select_chances(curve, n_used)) ** batch))


# Ops per block in llama.cpp's decode graph, counted in its log ("graph: nodes = N") for our test
# models: 55 per qwen3moe block, about 95 per Gated DeltaNet block of qwen35moe; a few more for the
# input and output.
NODES_PER_BLOCK = {"full": 55, "linear": 95}
NODES_OUTSIDE_BLOCKS = 6
STATE_COPIES = 4  # reads and writes of the whole recurrent state besides its update (get_rows in, cpy out)
GRAPH_INPUTS = 6  # tensors set before every decode graph (token, position, mask, KV indices, ...)
SPLIT_SYNCS = 3  # graph syncs split compute adds per cached block (its eval callback reads three nodes)
EXPERT_PROJECTIONS = 3  # an expert's gate, up and down: the cache uploads each in its own copy


def estimated_nodes(attention: list[str]) -> int:
    return NODES_OUTSIDE_BLOCKS + sum(NODES_PER_BLOCK.get(kind, NODES_PER_BLOCK["full"]) for kind in attention)


@dataclass(frozen=True)
class Layout:
    """Where a candidate placement runs each expert block: resident on the accelerator, on the
    host (computed by the CPU), or on the host with a split-compute cache of `slots` per block
    hitting at `hit_rates[layer]`. No accelerator: everything on the CPU."""

    host: tuple[int, ...] = ()
    accelerator: bool = True
    slots: int = 0
    hit_rates: dict[int, float] = field(default_factory=dict)
    misses: str = "split"  # a cache miss: computed by the CPU meanwhile ("split") or uploaded first ("upload")
    admit_bytes: int | None = None  # split: the most bytes of missed experts admitted into slots between calls
    streams_prompt: bool = False  # the accelerator runs host experts itself at prompt batches (CUDA)
    # per block, the hit-rate curve of its routing (a profile's; the field figures for blocks without one):
    # how many tokens of a prompt's batch share each expert
    routing: dict[int, tuple[float, ...]] = field(default_factory=dict)
    # several accelerators: the device of each block's other tensors, of the output layer, and of
    # each resident block's experts (a block missing here has its experts on its own device)
    layer_devices: tuple[str, ...] = ()
    output_device: str = ""
    resident_on: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Prediction:
    prompt_tps: float
    decode_tps: float
    decode_parts: dict[str, float]  # seconds per decoded token, by part

    def to_json(self) -> dict:
        return {"prompt_tps": round(self.prompt_tps, 2), "decode_tps": round(self.decode_tps, 2),
                "decode_ms": {k: round(v * 1e3, 4) for k, v in self.decode_parts.items()}}


def token_seconds(weights: Weights, layout: Layout, cpu: DeviceSpeeds, acc: DeviceSpeeds | None, phase: str,
                  batch: int = 1, devices: dict[str, DeviceSpeeds] | None = None) -> dict[str, float]:
    """Seconds one token spends, by part, in `phase` ("decode", or "prompt" at `batch` tokens per
    graph: fixed costs are shared by the batch). A layout over several accelerators takes each
    one's speeds from `devices` (by name)."""
    if layout.layer_devices and devices:
        return _spread_seconds(weights, layout, cpu, devices, phase, batch)
    main = acc if layout.accelerator and acc is not None else cpu

    def experts(i: int, dev: DeviceSpeeds, share: float = 1.0) -> float:
        return weights.used_seconds(i, dev, phase, share, batch, layout.routing.get(i))

    parts = {
        "weights": sum(main.read_seconds(n, phase, t, batch) for t, n in weights.other.items()),
        "kv cache": sum(main.read_seconds(n, phase, t, batch) for t, n in weights.kv_cache.items()),
        # a Gated DeltaNet block's state update, and llama.cpp's gather of the state from its cache and
        # store of the new one, reading and writing it whole once per graph (a prompt's batch: the fused
        # update carries the state from token to token)
        "recurrent": weights.recurrent_state * (1 / main.recurrent_rate(phase)
                                                + STATE_COPIES / (batch * main.rate("decode", "F32"))),
        "resident experts": sum(experts(i, main) for i in weights.expert if i not in layout.host),
        "host experts": 0.0,
        "graph": (main.graph_seconds + weights.graph_nodes * main.op_seconds + GRAPH_INPUTS * main.copy_seconds
                  + weights.n_vocab * 4 / _download_rate(main)) / batch,
        "splits": 0.0,
    }
    if main is cpu:
        parts["resident experts"] += sum(experts(i, cpu) for i in layout.host)
        return parts
    if phase == "prompt" and layout.streams_prompt:
        uploads = sum(sum(weights.expert.get(i, {}).values()) * weights.n_expert for i in layout.host)
        parts["host experts"] = sum(experts(i, main) for i in layout.host) + (
            uploads / (main.bulk_upload_rate * batch))
        return parts
    # split compute: a token's missed experts, uploaded into slots between calls (their bytes, seconds)
    admitted_bytes = admitted_seconds = 0.0
    for i in layout.host:
        hit = layout.hit_rates.get(i, 0.0) if layout.slots else 0.0
        expert_bytes = sum(weights.expert.get(i, {}).values())
        missed = (1.0 - hit) * weights.n_expert_used * expert_bytes
        upload = main.expert_upload_rate(expert_bytes / EXPERT_PROJECTIONS)
        if layout.slots and layout.misses == "upload":  # the missed experts cross the link, then all run on the accelerator
            parts["host experts"] += missed / (upload * batch) + experts(i, main)
            continue
        parts["host experts"] += max(experts(i, cpu, 1.0 - hit), experts(i, main, hit))
        if layout.slots:  # split compute syncs three more times per block: routing, weights, the weighted sum
            parts["splits"] += SPLIT_SYNCS * main.graph_seconds / batch
            admitted_bytes += missed
            admitted_seconds += missed / upload
    if admitted_bytes:  # a call admits up to the cache's budget of them
        capped = 1.0 if layout.admit_bytes is None else min(1.0, layout.admit_bytes / (admitted_bytes * batch))
        parts["host experts"] += admitted_seconds * capped
    parts["splits"] += len(layout.host) * host_block_seconds(main, cpu) / batch
    return parts


def host_block_seconds(acc: DeviceSpeeds, cpu: DeviceSpeeds) -> float:
    """What a block whose experts the CPU computes adds beside the accelerator: as measured, else
    a graph launch on each side and two small copies."""
    if acc.host_block_seconds is not None:
        return acc.host_block_seconds
    return acc.graph_seconds + cpu.graph_seconds + 2 * acc.copy_seconds


def _spread_seconds(weights: Weights, layout: Layout, cpu: DeviceSpeeds, devices: dict[str, DeviceSpeeds], phase: str,
                    batch: int) -> dict[str, float]:
    """`token_seconds` over several accelerators: the other weights read by the devices holding
    their blocks (in proportion to the blocks each holds), each resident expert block by its own
    device, and every boundary between two accelerators in the order the graph runs (block by
    block, a block whose experts live elsewhere crossing twice, then the output layer) costing a
    graph launch on each side and a copy."""
    first = devices[layout.layer_devices[0]]
    single = replace(layout, layer_devices=(), output_device="", resident_on={})
    parts = token_seconds(weights, single, cpu, first, phase, batch)
    n_blocks = len(layout.layer_devices)
    for part, by_type in (("weights", weights.other), ("kv cache", weights.kv_cache)):
        parts[part] = sum(layout.layer_devices.count(name) / n_blocks
                          * sum(dev.read_seconds(n, phase, t, batch) for t, n in by_type.items())
                          for name, dev in devices.items())
    parts["resident experts"] = sum(
        weights.used_seconds(i, devices[layout.resident_on.get(i, layout.layer_devices[i])], phase, batch=batch,
                             routing=layout.routing.get(i))
        for i in weights.expert if i not in layout.host and i < n_blocks)
    order: list[str] = []
    for i, name in enumerate(layout.layer_devices):
        elsewhere = layout.resident_on.get(i, name)
        order += [name, elsewhere, name] if i not in layout.host else [name]
    order.append(layout.output_device or order[-1])
    crossings = [(a, b) for a, b in zip(order, order[1:]) if a != b]
    parts["splits"] += sum(devices[a].graph_seconds + devices[b].graph_seconds + devices[a].copy_seconds
                           for a, b in crossings) / batch
    return parts


@dataclass(frozen=True)
class PlanSpeeds:
    """What the planner predicts speed from: the model's weights, the CPU's and the accelerator's
    speeds, and where they come from (shown with the predictions)."""

    weights: Weights
    cpu: DeviceSpeeds
    accelerator: DeviceSpeeds
    source: str
    devices: dict[str, DeviceSpeeds] = field(default_factory=dict)  # several accelerators: each one's, by name

    def predict(self, layout: Layout, prompt_batch: int | None = None) -> Prediction:
        return predict(self.weights, layout, self.cpu, self.accelerator, self.devices, prompt_batch)


# A GPU that is not on this machine (plan --vram on a machine without one) is predicted as an
# 8 GB laptop card, an RTX 4060 Laptop: 256 GB/s of memory bandwidth read at 80% by decode's
# matrix-vector kernels; about 20 TFLOPS in batched quantized matrix multiplies (prompts: 2 flops
# per weight and token, ~0.56 bytes per Q4_K weight); PCIe 4.0 x8 at 11 GB/s from pinned memory;
# 2.8 us per graph op, the launch cost that makes tools/predict_split.py's model meet the published
# 42.3 t/s of an RTX 3060 with --n-cpu-moe; 20 us per graph and copy.
REFERENCE_GPU = DeviceSpeeds(
    name="RTX 4060 Laptop (published figures)",
    description="8 GB, 256 GB/s, PCIe 4.0 x8",
    decode={ANY_TYPE: 0.8 * 256e9},
    prompt={ANY_TYPE: 20e12 / 2 * 0.56},
    batch=512,
    graph_seconds=20e-6,
    op_seconds=2.8e-6,
    copy_seconds=20e-6,
    upload_pinned=11e9,
    upload_pageable=6e9,
)


def _download_rate(device: DeviceSpeeds) -> float:
    """Device -> host bytes per second for the logits (taken as the upload speed; the CPU: memory)."""
    return device.upload_pageable or device.upload_pinned or device.rate("decode", "F32")


def predict(weights: Weights, layout: Layout, cpu: DeviceSpeeds, acc: DeviceSpeeds | None,
            devices: dict[str, DeviceSpeeds] | None = None, prompt_batch: int | None = None) -> Prediction:
    """Predicted prompt and decode tokens per second of one placement (over several accelerators:
    each one's speeds in `devices`); prompts at `prompt_batch` tokens per graph (by default the
    batch the prompt speeds were measured at)."""
    decode = token_seconds(weights, layout, cpu, acc, "decode", devices=devices)
    batch = prompt_batch or (acc if layout.accelerator and acc is not None else cpu).batch
    prompt = token_seconds(weights, layout, cpu, acc, "prompt", batch, devices)
    return Prediction(1.0 / sum(prompt.values()), 1.0 / sum(decode.values()), decode)
