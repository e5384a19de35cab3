"""Read a GGUF file's metadata and tensor index without touching its tensor data.

This is the first stage of the data flow: everything later (convert, plan, engine) works from an
`Inventory`. The reader is our own, over a read-only memory map, because it must be instant on a
21 GB file, skip 250k-entry tokenizer arrays without building Python objects for them, keep the raw
bytes of every key/value pair (the converter copies them verbatim), and turn every kind of broken
file into one clear `UserError`.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from . import arch as names
from .errors import UserError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF value types: id -> struct format (scalars) ; 8 = string, 9 = array.
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# Arrays longer than this are not materialised (tokenizer vocab, merges): only their length is kept.
_MAX_KEPT_ARRAY = 4096


@dataclass(frozen=True)
class ArrayInfo:
    """A large metadata array that was skipped: its element type and length."""

    item_type: int
    count: int


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor index. `shape` is in ggml `ne` order (innermost first)."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    offset: int  # absolute offset of the data in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        try:
            return GGMLQuantizationType(self.ggml_type).name
        except ValueError:
            return f"type{self.ggml_type}"

    @property
    def layer(self) -> int | None:
        return names.block_index(self.name)

    @property
    def expert_kind(self) -> str | None:
        return names.expert_kind(self.name)


@dataclass
class Inventory:
    """What a GGUF file holds: metadata, tensor index, and the derived figures the tool uses."""

    path: Path
    file_bytes: int
    version: int
    metadata: dict[str, object]
    tensors: list[TensorInfo]
    data_offset: int
    alignment: int
    # Raw bytes of each key/value pair as it stands in the file, in file order.
    kv_raw: dict[str, bytes] = field(repr=False)

    # --- hyperparameters -------------------------------------------------------------------
    @property
    def arch(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    def hparam(self, name: str, default: int = 0) -> int:
        value = self.metadata.get(names.hparam(self.arch, name), default)
        if isinstance(value, list):  # some archs store per-layer arrays; report the maximum
            value = max(value) if value else default
        return int(value)

    @property
    def n_layer(self) -> int:
        return self.hparam("block_count")

    @property
    def n_expert(self) -> int:
        return self.hparam("expert_count")

    @property
    def n_expert_used(self) -> int:
        return self.hparam("expert_used_count")

    @property
    def n_embd(self) -> int:
        return self.hparam("embedding_length")

    @property
    def n_ff_exp(self) -> int:
        return self.hparam("expert_feed_forward_length")

    @property
    def n_ff_shexp(self) -> int:
        return self.hparam("expert_shared_feed_forward_length")

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0 and bool(self.expert_tensors)

    # --- tensors ---------------------------------------------------------------------------
    @cached_property
    def by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}

    @cached_property
    def expert_tensors(self) -> list[TensorInfo]:
        return [t for t in self.tensors if t.expert_kind is not None]

    @property
    def has_shared_expert(self) -> bool:
        return any(t.name.endswith(".ffn_down_shexp.weight") for t in self.tensors)

    @property
    def fused_gate_up(self) -> bool:
        return any(t.expert_kind == "gate_up" for t in self.expert_tensors)

    def layer_expert_bytes(self) -> dict[int, int]:
        """Bytes of routed-expert weights per block."""
        out: dict[int, int] = {}
        for t in self.expert_tensors:
            out[t.layer] = out.get(t.layer, 0) + t.nbytes
        return out

    def layer_other_bytes(self) -> dict[int, int]:
        """Bytes of everything else per block (attention, norms, router, shared expert)."""
        out: dict[int, int] = {}
        for t in self.tensors:
            if t.layer is not None and t.expert_kind is None:
                out[t.layer] = out.get(t.layer, 0) + t.nbytes
        return out

    @property
    def expert_bytes(self) -> int:
        return sum(t.nbytes for t in self.expert_tensors)

    @property
    def other_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors) - self.expert_bytes

    def attention_layout(self) -> list[str]:
        """Per block: 'full' (softmax attention with a KV cache) or 'linear' (recurrent state)."""
        full = {t.layer for t in self.tensors if t.name.endswith(".attn_k.weight")}
        return ["full" if i in full else "linear" for i in range(self.n_layer)]

    def tensor_types(self) -> dict[str, int]:
        """Count of tensors per ggml type name."""
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.type_name] = out.get(t.type_name, 0) + 1
        return dict(sorted(out.items()))

    # --- our converter's marks ---------------------------------------------------------------
    @property
    def layout(self) -> str:
        """'original' for a file our converter did not write, else 'rotary-vN'."""
        version = self.metadata.get(names.ROTARY_LAYOUT_KEY)
        return "original" if version is None else f"rotary-v{version}"

    def expert_order(self, layer: int) -> list[int] | None:
        """For a reordered file: position -> original expert id of `layer`, else None."""
        value = self.metadata.get(names.ROTARY_PERMUTATION_KEY.format(layer=layer))
        return [int(v) for v in value] if isinstance(value, list) else None


def read_inventory(path: str | os.PathLike) -> Inventory:
    """Parse the header and tensor index of a GGUF file; raise UserError on anything broken."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a GGUF file")
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"{path}: empty file, not a GGUF model")
    with open(path, "rb") as f:
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            try:
                return _parse(path, mm, size)
            except (struct.error, IndexError, UnicodeDecodeError, OverflowError, ValueError):
                raise UserError(f"{path}: truncated or corrupt GGUF header") from None


class _Cursor:
    """Sequential reader over the memory map that fails cleanly past the end."""

    def __init__(self, buf: mmap.mmap, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def take(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > self.size:
            raise ValueError("string past end of file")
        s = self.buf[self.pos : self.pos + n].decode("utf-8")
        self.pos += n
        return s

    def skip_string(self) -> None:
        n = self.take("<Q")
        self.pos += n
        if self.pos > self.size:
            raise ValueError("string past end of file")

    def value(self, vtype: int):
        if vtype in _SCALAR:
            return self.take(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, count = self.take("<I"), self.take("<Q")
            if count > _MAX_KEPT_ARRAY:
                self.skip_array(item_type, count)
                return ArrayInfo(item_type, count)
            return [self.value(item_type) for _ in range(count)]
        raise ValueError(f"unknown GGUF value type {vtype}")

    def skip_array(self, item_type: int, count: int) -> None:
        if item_type in _SCALAR:
            self.pos += struct.calcsize(_SCALAR[item_type]) * count
        elif item_type == _STRING:
            for _ in range(count):
                self.skip_string()
        else:
            for _ in range(count):
                self.value(item_type)
        if self.pos > self.size:
            raise ValueError("array past end of file")


def _parse(path: Path, mm: mmap.mmap, size: int) -> Inventory:
    cur = _Cursor(mm, size)
    if size < 24 or mm[:4] != GGUF_MAGIC:
        raise UserError(f"{path}: not a GGUF file (bad magic bytes)")
    cur.pos = 4
    version = cur.take("<I")
    if version not in (2, 3):
        raise UserError(f"{path}: unsupported GGUF version {version}")
    n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
    if n_tensors > size or n_kv > size:
        raise UserError(f"{path}: truncated or corrupt GGUF header ({n_kv} keys, {n_tensors} tensors in {size} bytes)")

    metadata: dict[str, object] = {}
    kv_raw: dict[str, bytes] = {}
    for _ in range(n_kv):
        start = cur.pos
        key = cur.string()
        metadata[key] = cur.value(cur.take("<I"))
        kv_raw[key] = bytes(mm[start : cur.pos])

    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.take("<I")
        if n_dims > 8:
            raise ValueError("too many dimensions")
        shape = tuple(cur.take("<Q") for _ in range(n_dims))
        ggml_type, rel_offset = cur.take("<I"), cur.take("<Q")
        infos.append((name, shape, ggml_type, rel_offset))

    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    data_offset = -(-cur.pos // alignment) * alignment
    tensors = []
    for name, shape, ggml_type, rel_offset in infos:
        t = TensorInfo(name, ggml_type, shape, data_offset + rel_offset, tensor_nbytes(ggml_type, shape))
        if t.offset + t.nbytes > size:
            raise UserError(f"{path}: truncated GGUF file (tensor {name} ends past the end of the file)")
        tensors.append(t)
    return Inventory(path, size, version, metadata, tensors, data_offset, alignment, kv_raw)


def tensor_nbytes(ggml_type: int, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of `ggml_type` with ggml `ne` shape."""
    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise ValueError(f"unknown ggml type {ggml_type}") from None
    n = 1
    for d in shape:
        n *= d
    return n // block * type_size
