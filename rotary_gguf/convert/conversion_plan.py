"""The conversion plan (pure): every output tensor as byte ranges of the input, fused gate+up
experts, reordered expert tensors and the new header's metadata."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

from .. import __version__
from .. import arch as names
from ..errors import UserError
from ..inventory import GGUF_MAGIC, Inventory, TensorInfo
from ..profile_io import Profile, moe_layers
from .expert_order import copies_per_token, order_experts, pair_probabilities


_UINT32, _INT32, _STRING, _ARRAY = 4, 5, 8, 9  # GGUF value types


# --- the plan ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OutTensor:
    """One tensor of the output: its header entry and where its bytes come from in the input."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]  # ggml ne order
    pieces: tuple[tuple[int, int], ...]  # (absolute input offset, bytes), concatenated in order

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.pieces)


@dataclass
class ConversionPlan:
    """Everything the output will hold, decided before a byte is written."""

    source: Inventory
    tensors: list[OutTensor]
    metadata: list[bytes]  # raw GGUF key/value pairs, in order
    orders: dict[int, list[int]]  # per MoE block: position -> original expert id
    fused_layers: list[int]
    reordered_layers: list[int]
    copies_before: float | None = None  # estimated copies per token and expert tensor, mean over blocks
    copies_after: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def alignment(self) -> int:
        return self.source.alignment

    def header(self) -> bytes:
        """Magic, counts, metadata, tensor index, and padding up to the aligned data section."""
        out = bytearray(GGUF_MAGIC)
        out += struct.pack("<IQQ", self.source.version, len(self.tensors), len(self.metadata))
        for kv in self.metadata:
            out += kv
        for t, offset in zip(self.tensors, self.data_offsets()):
            out += _gguf_string(t.name)
            out += struct.pack(f"<I{len(t.shape)}QIQ", len(t.shape), *t.shape, t.ggml_type, offset)
        out += bytes(pad_to(len(out), self.alignment))
        return bytes(out)

    def data_offsets(self) -> list[int]:
        """Offset of each tensor in the data section (each padded to the alignment, as GGUF wants)."""
        offsets, at = [], 0
        for t in self.tensors:
            offsets.append(at)
            at += t.nbytes + pad_to(t.nbytes, self.alignment)
        return offsets

    def file_bytes(self, header_bytes: int) -> int:
        return header_bytes + sum(t.nbytes + pad_to(t.nbytes, self.alignment) for t in self.tensors)


def plan_conversion(inv: Inventory, profile: Profile | None = None) -> ConversionPlan:
    """Decide the output's tensors, expert orders and metadata; UserError for inputs we cannot take."""
    if not inv.is_moe:
        raise UserError(f"{inv.path.name} is not a Mixture-of-Experts model (arch {inv.arch}): nothing to convert")
    spec = names.SUPPORTED.get(inv.arch)
    if spec is None:
        raise UserError(f"convert does not support arch {inv.arch!r} yet (supported: {', '.join(names.SUPPORTED)})")
    n_expert = inv.n_expert
    layers = moe_layers(inv)
    current = {i: _stored_order(inv, i) for i in layers}
    orders = dict(current)
    copies: list[tuple[float, float]] = []
    if profile is not None:
        for i, entry in sorted(profile.layers.items()):
            pair_p = pair_probabilities(profile, i)
            orders[i] = order_experts(pair_p, entry.counts)
            copies.append(
                (copies_per_token(current[i], pair_p, inv.n_expert_used), copies_per_token(orders[i], pair_p, inv.n_expert_used))
            )
    # output position -> position in the input file
    sources = {i: [current[i].index(e) for e in orders[i]] for i in layers}

    fusable, notes = _fusable_layers(inv, spec, layers)
    tensors: list[OutTensor] = []
    for t in inv.tensors:
        kind, layer = t.expert_kind, t.layer
        if layer in fusable and kind == "up":
            continue  # written inside the fused tensor
        if layer in fusable and kind == "gate":
            up = inv.by_name[names.expert_tensor_name(layer, "up")]
            tensors.append(_fused(t, up, sources[layer], n_expert))
        elif layer in sources and spec.permuted_with_experts(t.name):
            tensors.append(_permuted(t, sources[layer], n_expert))
        else:
            tensors.append(OutTensor(t.name, t.ggml_type, t.shape, ((t.offset, t.nbytes),)))

    identity = list(range(n_expert))
    written_orders = {i: o for i, o in orders.items() if o != identity}
    plan = ConversionPlan(
        source=inv,
        tensors=tensors,
        metadata=_metadata(inv, written_orders),
        orders=orders,
        fused_layers=sorted(fusable),
        reordered_layers=[i for i in layers if sources[i] != identity],
        notes=notes,
    )
    if copies:
        plan.copies_before, plan.copies_after = (float(np.mean(c)) for c in zip(*copies))
    return plan


def _stored_order(inv: Inventory, layer: int) -> list[int]:
    """position -> original id of a block as the file stores it (identity unless we reordered it;
    the reader has checked that a stored order is a permutation)."""
    return inv.expert_order(layer) or list(range(inv.n_expert))


def _fusable_layers(inv: Inventory, spec: names.ArchSpec, layers: list[int]) -> tuple[set[int], list[str]]:
    """Blocks whose separate gate and up experts become one fused tensor, and why others do not."""
    fusable: set[int] = set()
    notes: list[str] = []
    for i in layers:
        gate = inv.by_name.get(names.expert_tensor_name(i, "gate"))
        up = inv.by_name.get(names.expert_tensor_name(i, "up"))
        if gate is None and up is None:
            continue  # already fused
        if gate is None or up is None:
            raise UserError(f"{inv.path.name}: block {i} has only one of ffn_gate_exps and ffn_up_exps")
        if not spec.loads_fused_gate_up:
            notes.append(f"llama.cpp's {spec.name} loader reads only separate gate and up experts: kept separate")
            break
        side = (names.EXPERT_SIDE_TENSOR.match(t.name) for t in inv.tensors if t.layer == i)
        if any(m and m["kind"] in ("gate", "up") for m in side):
            notes.append(f"block {i}: gate/up have per-expert scales, which llama.cpp does not apply to a fused tensor; kept separate")
        elif gate.ggml_type != up.ggml_type or gate.shape != up.shape:
            notes.append(f"block {i}: gate is {gate.type_name} {gate.shape}, up is {up.type_name} {up.shape}; kept separate")
        else:
            fusable.add(i)
    return fusable, notes


def _expert_bytes(t: TensorInfo, n_expert: int) -> int:
    """Bytes of one expert's slice of a tensor whose outer dimension is the expert."""
    if not t.shape or t.shape[-1] != n_expert or t.nbytes % n_expert:
        raise UserError(f"{t.name} has shape {t.shape}; expected the last (outer) dimension to be the {n_expert} experts")
    return t.nbytes // n_expert


def _permuted(t: TensorInfo, sources: list[int], n_expert: int) -> OutTensor:
    size = _expert_bytes(t, n_expert)
    return OutTensor(t.name, t.ggml_type, t.shape, _coalesce((t.offset + s * size, size) for s in sources))


def _fused(gate: TensorInfo, up: TensorInfo, sources: list[int], n_expert: int) -> OutTensor:
    """ffn_gate_up_exps {n_embd, 2*n_ff, n_expert}: per expert, its gate rows then its up rows."""
    size = _expert_bytes(gate, n_expert)
    pieces = ((src.offset + s * size, size) for s in sources for src in (gate, up))
    n_embd, n_ff = gate.shape[0], gate.shape[1]
    name = names.expert_tensor_name(gate.layer, "gate_up")
    return OutTensor(name, gate.ggml_type, (n_embd, 2 * n_ff, n_expert), _coalesce(pieces))


def _coalesce(pieces) -> tuple[tuple[int, int], ...]:
    """Merge byte ranges that follow each other in the input (fewer, larger copies)."""
    out: list[list[int]] = []
    for offset, n in pieces:
        if out and out[-1][0] + out[-1][1] == offset:
            out[-1][1] += n
        else:
            out.append([offset, n])
    return tuple((a, n) for a, n in out)


def _metadata(inv: Inventory, orders: dict[int, list[int]]) -> list[bytes]:
    """The input's key/value pairs verbatim, our own keys replaced by this conversion's."""
    ours = (names.ROTARY_LAYOUT_KEY, names.ROTARY_CONVERTER_KEY)
    order_prefix = names.ROTARY_PERMUTATION_KEY.split("{", 1)[0]
    kept = [raw for key, raw in inv.kv_raw.items() if key not in ours and not key.startswith(order_prefix)]
    kept.append(_gguf_string(names.ROTARY_LAYOUT_KEY) + struct.pack("<II", _UINT32, names.LAYOUT_VERSION))
    kept.append(_gguf_string(names.ROTARY_CONVERTER_KEY) + struct.pack("<I", _STRING) + _gguf_string(__version__))
    for layer, order in sorted(orders.items()):
        key = _gguf_string(names.ROTARY_PERMUTATION_KEY.format(layer=layer))
        kept.append(key + struct.pack(f"<IIQ{len(order)}i", _ARRAY, _INT32, len(order), *order))
    return kept


def _gguf_string(s: str) -> bytes:
    data = s.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def pad_to(n: int, alignment: int) -> int:
    return -n % alignment
