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
from typing import NoReturn

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from . import arch as names
from .errors import UserError
from .inventory_checks import CorruptGGUF, check_inventory

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
GGML_TENSOR_ALIGNMENT = 32  # ggml asserts that tensor data in a buffer starts on this boundary
MAX_ALIGNMENT = 2**20
GGML_MAX_DIMS = 4
TOKENS_KEY = "tokenizer.ggml.tokens"
GGML_MAX_NAME = 64  # bytes, the terminating zero included
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, a 1-byte key, the type, a 1-byte value
_MIN_TENSOR_BYTES = 8 + 1 + 4 + 4 + 8  # name length, a 1-byte name, n_dims, type, offset

# GGUF value types: id -> struct format (scalars) ; 8 = string, 9 = array.
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_UINT32, _STRING, _ARRAY = 4, 8, 9
# Arrays longer than this are not materialised (tokenizer vocab, merges): only their length is kept.
_MAX_KEPT_ARRAY = 4096
_U64 = struct.Struct("<Q")


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
    def n_head(self) -> int:
        return self.hparam("attention.head_count")

    @property
    def n_head_kv(self) -> int:
        return self.hparam("attention.head_count_kv", self.n_head)

    @property
    def head_dim_k(self) -> int:
        """Values per attention head in K (the embedding over the heads where the file omits it)."""
        return self.hparam("attention.key_length", self.n_embd // max(self.n_head, 1))

    @property
    def head_dim_v(self) -> int:
        return self.hparam("attention.value_length", self.head_dim_k)

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
        """For a reordered file: position -> original expert id of `layer` (a permutation, checked
        on reading), else None."""
        value = self.metadata.get(names.ROTARY_PERMUTATION_KEY.format(layer=layer))
        return [int(v) for v in value] if isinstance(value, list) else None


def read_inventory(path: str | os.PathLike) -> Inventory:
    """Parse and validate the header and tensor index of a GGUF file; UserError naming the field
    on anything broken. This is the one gate every command and the engine go through: nothing
    reaches llama.cpp (or our own figures) that did not pass it."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a GGUF file")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise UserError(f"{path}: empty file, not a GGUF model")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                inv = _parse(path, mm, size)
    except CorruptGGUF as e:
        raise UserError(f"{path}: corrupt GGUF: {e}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        check_inventory(inv)
    except CorruptGGUF as e:
        raise UserError(f"{path}: corrupt GGUF: {e}") from None
    return inv


class HeaderIncomplete(Exception):
    """`read_header` was given fewer bytes than the header takes: read more of the file."""


def read_header(data: bytes, file_bytes: int, source: str) -> Inventory:
    """`read_inventory` for the first bytes of a GGUF file of `file_bytes` bytes that is not here
    (a download not made yet): the same checks, with the tensor data checked against `file_bytes`.
    HeaderIncomplete when `data` ends before the header and tensor index do."""
    if len(data) < 4:
        raise HeaderIncomplete
    try:
        inv = _parse(Path(source), data, file_bytes, available=len(data))
        check_inventory(inv)
    except CorruptGGUF as e:
        raise UserError(f"{source}: corrupt GGUF: {e}") from None
    return inv


class _Cursor:
    """Sequential reader over the memory map; every length is checked against the bytes left, so
    no count in the file can make it allocate or loop beyond the file's size."""

    def __init__(self, buf: mmap.mmap | bytes, size: int, available: int | None = None):
        self.buf, self.size, self.pos = buf, size, 0
        # bytes of the file in `buf`: all of it, or its start when only the header was fetched
        self.available = size if available is None else available
        self.where = "header"  # the field being read, for error messages

    def need(self, n: int) -> None:
        if self.pos + n > self.available:
            raise HeaderIncomplete

    def fail(self, problem: str) -> NoReturn:
        raise CorruptGGUF(f"{self.where}: {problem}")

    @property
    def left(self) -> int:
        return self.size - self.pos

    def take(self, fmt: str):
        n = struct.calcsize(fmt)
        if n > self.left:
            self.fail("truncated (ends past the end of the file)")
        self.need(n)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self) -> str:
        n = self.take("<Q")
        if n > self.left:
            self.fail(f"a string of {n} bytes runs past the end of the file")
        self.need(n)
        try:
            s = self.buf[self.pos : self.pos + n].decode("utf-8")
        except UnicodeDecodeError:
            self.fail("a string is not valid UTF-8")
        self.pos += n
        return s

    def value(self, vtype: int, unique: bool = False):
        """One value of GGUF type `vtype`; with `unique`, an array of strings must not repeat one
        (llama.cpp aborts on a vocabulary with a token text twice; empty ones it renames)."""
        if vtype in _SCALAR:
            return self.take(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            self.fail(f"unknown GGUF value type {vtype}")
        item_type, count = self.take("<I"), self.take("<Q")
        if item_type == _ARRAY:
            self.fail("an array of arrays (llama.cpp does not read nested arrays)")
        if item_type not in _SCALAR and item_type != _STRING:
            self.fail(f"an array of unknown GGUF value type {item_type}")
        item_bytes = struct.calcsize(_SCALAR[item_type]) if item_type in _SCALAR else 8  # a string: its length at least
        if count > self.left // item_bytes:
            self.fail(f"an array of {count} items runs past the end of the file")
        if item_type in _SCALAR:
            self.need(item_bytes * count)
            if count > _MAX_KEPT_ARRAY:
                self.pos += item_bytes * count
                return ArrayInfo(item_type, count)
            values = list(struct.unpack_from(f"<{count}{_SCALAR[item_type][1]}", self.buf, self.pos))
            self.pos += item_bytes * count
            return values
        if count > _MAX_KEPT_ARRAY:
            self.skip_strings(count, unique)
            return ArrayInfo(item_type, count)
        if unique:
            self.skip_strings(count, unique, rewind=True)
        return [self.string() for _ in range(count)]

    def skip_strings(self, count: int, unique: bool, rewind: bool = False) -> None:
        """Step over `count` strings (a tight loop: vocabularies hold 250k); with `unique`, fail on
        a repeated one, counting an empty string as llama.cpp does ("[EMPTY_<i>]")."""
        buf, pos, size, available, unpack = self.buf, self.pos, self.size, self.available, _U64.unpack_from
        seen: set[bytes] = set()
        for i in range(count):
            if pos + 8 > size:
                self.fail(f"item {i} is truncated (ends past the end of the file)")
            if pos + 8 > available:
                raise HeaderIncomplete
            (n,) = unpack(buf, pos)
            pos += 8
            if n > size - pos:
                self.fail(f"item {i}: a string of {n} bytes runs past the end of the file")
            if pos + n > available:
                raise HeaderIncomplete
            if unique:
                text = buf[pos : pos + n] or f"[EMPTY_{i}]".encode()
                if text in seen:
                    self.fail(f"item {i} ({text[:40].decode(errors='replace')!r}) appears twice")
                seen.add(text)
            pos += n
        if not rewind:
            self.pos = pos


def _parse(path: Path, mm: mmap.mmap | bytes, size: int, available: int | None = None) -> Inventory:
    cur = _Cursor(mm, size, available)
    if mm[:4] != GGUF_MAGIC:
        raise UserError(f"{path}: not a GGUF file (bad magic bytes)")
    cur.pos = 4
    version = cur.take("<I")
    if version not in (2, 3):
        raise UserError(f"{path}: unsupported GGUF version {version}")
    n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
    # the smallest key/value pair and tensor index entry: an 8-byte length, one byte, the fixed fields
    if n_kv > cur.left // _MIN_KV_BYTES or n_tensors > cur.left // _MIN_TENSOR_BYTES:
        cur.fail(f"{n_kv} keys and {n_tensors} tensors cannot fit in {size} bytes")

    metadata: dict[str, object] = {}
    kv_raw: dict[str, bytes] = {}
    value_types: dict[str, int] = {}
    for i in range(n_kv):
        start = cur.pos
        cur.where = f"key/value pair {i}"
        key = cur.string()
        if not key:
            cur.fail("empty key")
        if key in metadata:
            cur.fail(f"key {key} appears twice")
        cur.where = f"key {key}"
        value_types[key] = cur.take("<I")
        metadata[key] = cur.value(value_types[key], unique=key == TOKENS_KEY)
        kv_raw[key] = bytes(mm[start : cur.pos])

    infos = []
    seen: set[str] = set()
    for i in range(n_tensors):
        cur.where = f"tensor index entry {i}"
        name = cur.string()
        cur.where = f"tensor {name!r}"
        if not name or len(name.encode()) >= GGML_MAX_NAME:
            cur.fail(f"name must be 1 to {GGML_MAX_NAME - 1} bytes")
        if name in seen:
            cur.fail("name appears twice in the tensor index")
        seen.add(name)
        n_dims = cur.take("<I")
        if n_dims > GGML_MAX_DIMS:
            cur.fail(f"{n_dims} dimensions (ggml has at most {GGML_MAX_DIMS})")
        shape = tuple(cur.take("<Q") for _ in range(n_dims))
        ggml_type, rel_offset = cur.take("<I"), cur.take("<Q")
        infos.append((name, shape, ggml_type, rel_offset, _tensor_bytes(cur, ggml_type, shape)))

    cur.where = "general.alignment"
    alignment = _alignment(cur, metadata, value_types)
    data_offset = -(-cur.pos // alignment) * alignment
    tensors = [TensorInfo(name, ggml_type, shape, data_offset + rel, nbytes) for name, shape, ggml_type, rel, nbytes in infos]
    _check_data_layout(cur, tensors, data_offset, alignment)
    return Inventory(path, size, version, metadata, tensors, data_offset, alignment, kv_raw)


def _alignment(cur: _Cursor, metadata: dict, value_types: dict) -> int:
    """general.alignment: a uint32 power of two (llama.cpp's rule) of at least ggml's tensor
    alignment (tensor data on a smaller boundary makes llama.cpp abort) and at most MAX_ALIGNMENT."""
    if "general.alignment" not in metadata:
        return DEFAULT_ALIGNMENT
    value = metadata["general.alignment"]
    if value_types["general.alignment"] != _UINT32:
        cur.fail("must be a uint32")
    if value & (value - 1) or not GGML_TENSOR_ALIGNMENT <= value <= MAX_ALIGNMENT:
        cur.fail(f"{value} is not a power of two from {GGML_TENSOR_ALIGNMENT} to {MAX_ALIGNMENT}")
    return value


def _tensor_bytes(cur: _Cursor, ggml_type: int, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor index entry's data, after the checks llama.cpp's loader makes."""
    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        cur.fail(f"unknown ggml type {ggml_type}")
    elements = 1
    for d in shape:
        if d >= 2**63:
            cur.fail(f"dimension {d} is negative as a signed 64-bit number")
        elements *= d
        if elements >= 2**63:
            cur.fail(f"shape {shape} has more than 2^63 elements")
    if shape and shape[0] % block:
        cur.fail(f"rows of {shape[0]} are not a multiple of the {block}-element blocks of its type")
    return elements // block * type_size


def _check_data_layout(cur: _Cursor, tensors: list[TensorInfo], data_offset: int, alignment: int) -> None:
    """Tensor data as llama.cpp's loader wants it: in index order, each tensor aligned and right
    after the padded end of the one before (so none overlap), the last one ending inside the file
    and followed by nothing but its padding."""
    expected, previous = data_offset, None
    for t in tensors:
        cur.where = f"tensor {t.name!r}"
        if t.offset % alignment:
            cur.fail(f"data offset {t.offset} is not a multiple of the alignment {alignment}")
        if t.offset < expected:
            cur.fail(f"data at offset {t.offset} overlaps that of tensor {previous!r}, which ends at {expected}")
        if t.offset > expected:
            cur.fail(f"data starts at {t.offset}, not right after the previous tensor's at {expected}")
        if t.nbytes > cur.size - t.offset:
            cur.fail(f"data ({t.nbytes} bytes at offset {t.offset}) ends past the end of the file ({cur.size} bytes): truncated?")
        expected, previous = t.offset + t.nbytes + -t.nbytes % alignment, t.name
    if tensors and cur.size > expected:
        cur.where = "tensor data"
        cur.fail(f"{cur.size - expected} bytes after the last tensor's data (a tensor missing from the index?)")
