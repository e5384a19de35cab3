"""Repack a MoE GGUF for expert streaming: fused gate+up experts, a profile-guided expert order, and
exactly the function of the input.

llama.cpp streams the used experts of a host-resident block to the GPU one run of adjacent expert
ids at a time (ggml-backend.cpp, "group consecutive experts and copy them together"), one copy per
run and per expert tensor. So the converter

- fuses ffn_gate_exps + ffn_up_exps into ffn_gate_up_exps (per expert: its gate rows, then its up
  rows), where the arch's loader reads the fused tensor: one copy instead of two;
- with a routing profile, reorders each block's experts so that experts selected together sit next
  to each other (see `order_experts`), and permutes every per-expert tensor (router rows, expert
  scales) the same way, so the model computes the same function.

Every change moves whole rows, which is exact for every block format: nothing is dequantized, and
all other tensors are copied byte for byte. The plan (`plan_conversion`) is pure: each output tensor
is a list of byte ranges of the input. Writing follows fixed, checked steps (`GGUFFileWriter`):
temp file next to OUT -> header -> tensor data -> fsync -> rename.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import shutil
import signal
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from . import __version__
from . import arch as names
from .errors import UserError
from .inventory import GGUF_MAGIC, Inventory, TensorInfo, read_inventory
from .log import logger
from .profile_io import Profile, load_profile, moe_layers
from .units import human_bytes

if TYPE_CHECKING:
    from .verify import VerifyResult

TEMP_MARK = ".rotary-tmp-"  # temp files are ".<OUT name>.rotary-tmp-<pid>" in OUT's folder
COPY_CHUNK = 16 * 2**20  # bytes per copy call: keeps progress and Ctrl-C responsive
# Every this many bytes written, start their writeback (posix_fadvise DONTNEED): the disk writes
# while we copy, the final fsync has little left, and a 21 GB output does not fill the page cache.
WRITEBACK_STEP = 16 * 2**20
DISK_MARGIN = 16 * 2**20  # free space wanted beyond the output's size (file-system metadata)
_UINT32, _INT32, _STRING, _ARRAY = 4, 5, 8, 9  # GGUF value types
# copy_file_range errors that mean "not here" (other file systems, old kernels, seccomp filters)
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM}
# open(O_TMPFILE) errors that mean "no unnamed files here" (file system, kernel, no /proc to link)
_NO_TMPFILE = {errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT, errno.ENOSYS}


# --- expert order --------------------------------------------------------------------------------
def order_experts(pair_weight: np.ndarray, heat: np.ndarray) -> list[int]:
    """An order of the experts (position -> original id) that keeps experts selected together
    adjacent.

    A token's experts are copied as runs of adjacent ids, so its copies are n_used minus the number
    of adjacent pairs it selected both of. Maximising the summed `pair_weight` (how often a and b
    are selected by the same token) over adjacent pairs therefore minimises the expected copies per
    token: a maximum-weight Hamiltonian path, for which greedy edge joining followed by 2-opt is
    the standard heuristic. With co-activation counts it follows the pairs that really fire
    together, which per-expert counts cannot show. With counts only (pair weight p_a * p_b) it
    puts the hottest experts next to each other, the hottest in their middle, which covers more
    likely pairs than a falling hottest-first sort.

    Among equal weights, experts with nearby original ids are joined first, so a block without
    information keeps the original order, and the result depends on the profile alone, not on the
    order of the file it is applied to. The hotter half of the path comes first.
    """
    n = len(pair_weight)
    if n < 2:
        return list(range(n))
    path = _greedy_path(pair_weight)
    path = _two_opt(path, pair_weight)
    positions = np.arange(n)
    if float(heat[path] @ positions) > float(heat[path] @ positions[::-1]):
        path = path[::-1]
    return [int(p) for p in path]


def _greedy_path(w: np.ndarray) -> np.ndarray:
    """Join the heaviest pairs first, never making a cycle or a node of degree 3."""
    n = len(w)
    i, j = np.triu_indices(n, 1)
    ranked = np.lexsort((i, j - i, -w[i, j]))  # heaviest; then closest in original ids
    root = list(range(n))

    def find(a: int) -> int:
        while root[a] != a:
            root[a] = root[root[a]]
            a = root[a]
        return a

    degree = [0] * n
    links: list[list[int]] = [[] for _ in range(n)]
    joined = 0
    for k in ranked:
        a, b = int(i[k]), int(j[k])
        if degree[a] < 2 and degree[b] < 2 and find(a) != find(b):
            root[find(a)] = find(b)
            degree[a] += 1
            degree[b] += 1
            links[a].append(b)
            links[b].append(a)
            joined += 1
            if joined == n - 1:
                break
    start = min(k for k in range(n) if degree[k] == 1)
    path, prev = [start], -1
    while len(path) < n:
        nxt = next(x for x in links[path[-1]] if x != prev)
        prev = path[-1]
        path.append(nxt)
    return np.array(path)


def _two_opt(path: np.ndarray, w: np.ndarray, max_passes: int = 100) -> np.ndarray:
    """Reverse path segments while that raises the summed weight of adjacent pairs."""
    n = len(path)
    eps = 1e-12 * max(float(w.max()), 1.0)
    for _ in range(max_passes):
        improved = False
        for i in range(n - 1):
            # reversing path[i..j] turns the pairs (a, b), (c, d) into (a, c), (b, d), where
            # a, b = path[i-1], path[i] and c, d = path[j], path[j+1], for every j at once
            b, c = path[i], path[i + 1 :]
            d = np.append(path[i + 2 :], -1)
            has_d = d >= 0
            gain = np.where(has_d, w[b, np.maximum(d, 0)] - w[c, np.maximum(d, 0)], 0.0)
            if i > 0:
                a = path[i - 1]
                gain = gain + w[a, c] - w[a, b]
            best = int(np.argmax(gain))
            if gain[best] > eps:
                j = i + 1 + best
                path[i : j + 1] = path[i : j + 1][::-1].copy()
                improved = True
        if not improved:
            break
    return path


def pair_probabilities(profile: Profile, layer: int) -> np.ndarray:
    """P(a and b selected by the same token): measured when the profile has co-activation counts,
    else estimated from the counts as if experts were picked independently."""
    entry = profile.layers[layer]
    tokens = max(profile.tokens, 1)
    if entry.coactivation is not None:
        w = entry.coactivation.astype(np.float64) / tokens
    else:
        p = entry.counts.astype(np.float64) / tokens
        w = np.outer(p, p)
    np.fill_diagonal(w, 0.0)
    return w


def copies_per_token(order: list[int], pair_p: np.ndarray, n_used: int) -> float:
    """Expected copies per token and expert tensor for experts stored in `order` (original ids)."""
    o = np.asarray(order)
    return n_used - float(pair_p[o[:-1], o[1:]].sum())


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
        out += bytes(_pad(len(out), self.alignment))
        return bytes(out)

    def data_offsets(self) -> list[int]:
        """Offset of each tensor in the data section (each padded to the alignment, as GGUF wants)."""
        offsets, at = [], 0
        for t in self.tensors:
            offsets.append(at)
            at += t.nbytes + _pad(t.nbytes, self.alignment)
        return offsets

    def file_bytes(self, header_bytes: int) -> int:
        return header_bytes + sum(t.nbytes + _pad(t.nbytes, self.alignment) for t in self.tensors)


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


def _pad(n: int, alignment: int) -> int:
    return -n % alignment


# --- writing -------------------------------------------------------------------------------------
class _Step(enum.Enum):
    NEW = "new"
    OPEN = "open"
    HEADER = "header written"
    DATA = "data written"
    SYNCED = "synced"
    DONE = "renamed"
    DISCARDED = "discarded"


class GGUFFileWriter:
    """Writes OUT in fixed steps that check each other: open -> header -> tensor data (in header
    order) -> fsync -> link into place. The file has no name until it is complete (O_TMPFILE,
    linked to OUT at the end), so even SIGKILL leaves nothing behind; where the file system cannot
    make unnamed files it is a temp file next to OUT, which `discard` removes at any step and
    `remove_stale_temps` removes after a hard kill."""

    def __init__(self, out: Path, header: bytes, offsets: list[int], total_bytes: int, alignment: int):
        self.out = out
        self.temp = temp_path(out)
        self._header, self._offsets, self._total, self._alignment = header, offsets, total_bytes, alignment
        self._step = _Step.NEW
        self._fd: int | None = None
        self._named = False  # whether the file being written has a name (the temp name) yet
        self._written = 0  # bytes of the file written so far
        self._written_back = 0  # bytes whose writeback was started
        self._tensors = 0
        self._kernel_copy = hasattr(os, "copy_file_range")

    def _expect(self, step: _Step) -> None:
        if self._step is not step:
            raise RuntimeError(f"GGUF writer: expected step {step.value!r}, at {self._step.value!r}")

    @property
    def done(self) -> bool:
        return self._step is _Step.DONE

    def open(self) -> None:
        self._expect(_Step.NEW)
        try:
            if not (hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")):
                raise OSError(errno.ENOSYS, "no unnamed files here")
            self._fd = os.open(self.out.parent, os.O_TMPFILE | os.O_WRONLY, 0o666)
        except OSError as e:  # not on this system or file system: a named temp file
            if e.errno not in _NO_TMPFILE:
                raise
            self.temp.unlink(missing_ok=True)  # left by an earlier process that had our pid
            self._fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            self._named = True
        self._step = _Step.OPEN

    def write_header(self) -> None:
        self._expect(_Step.OPEN)
        self._write(self._header)
        self._step = _Step.HEADER if self._offsets else _Step.DATA

    def write_tensor(self, tensor: OutTensor, src_fd: int, advance: Callable[[int], None]) -> None:
        """Copy the next tensor's byte ranges from the input, then its padding."""
        self._expect(_Step.HEADER)
        expected = len(self._header) + self._offsets[self._tensors]
        if self._written != expected:
            raise RuntimeError(f"GGUF writer: {tensor.name} would start at {self._written}, the header says {expected}")
        for offset, n in tensor.pieces:
            self._copy(src_fd, offset, n, advance)
        self._write(bytes(_pad(tensor.nbytes, self._alignment)))
        self._tensors += 1
        if self._tensors == len(self._offsets):
            self._step = _Step.DATA

    def sync(self) -> None:
        """Check the size and flush to disk."""
        self._expect(_Step.DATA)
        size = os.fstat(self._fd).st_size
        if size != self._total or self._written != self._total:
            raise RuntimeError(f"GGUF writer: wrote {size} bytes, planned {self._total}")
        os.fsync(self._fd)
        self._step = _Step.SYNCED

    def named(self) -> Path:
        """A path of the synced file, for checks that open it by name: the temp name (given to an
        unnamed file now; until the rename, a hard kill leaves it for `remove_stale_temps`)."""
        self._expect(_Step.SYNCED)
        if not self._named:
            self._link(self.temp)
        return self.temp

    def commit(self) -> None:
        """Put the file in place as OUT (replacing an old OUT atomically) and make it durable."""
        self._expect(_Step.SYNCED)
        if not self._named:
            try:
                self._link(self.out)  # a new OUT: the complete file gets its name in one step
            except FileExistsError:
                self._link(self.temp)  # an old OUT: renamed over below
        if self._named:
            os.replace(self.temp, self.out)
        self._step = _Step.DONE
        self._close()
        _fsync_dir(self.out.parent)

    def discard(self) -> None:
        """Drop the file (any step before it is in place); never raises."""
        self._close()
        if self._step is not _Step.DONE:
            if self._named:
                with contextlib.suppress(OSError):
                    self.temp.unlink(missing_ok=True)
            self._step = _Step.DISCARDED

    def _link(self, path: Path) -> None:
        """Give the unnamed file the name `path` (linkat through /proc, which needs no privilege)."""
        if path == self.temp:
            path.unlink(missing_ok=True)  # left by an earlier process that had our pid
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:  # with a folder fd os.link calls linkat(AT_SYMLINK_FOLLOW), which /proc's fd links need
            os.link(f"/proc/self/fd/{self._fd}", path.name, dst_dir_fd=folder, follow_symlinks=True)
        finally:
            os.close(folder)
        self._named = path == self.temp

    def _close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
            self._written += n

    def _copy(self, src_fd: int, offset: int, count: int, advance: Callable[[int], None]) -> None:
        """Append input bytes [offset, offset+count) to the temp file."""
        while count:
            n = self._copy_chunk(src_fd, offset, min(count, COPY_CHUNK))
            if n == 0:
                raise UserError("the input file ended early (was it changed or truncated during the conversion?)")
            offset, count = offset + n, count - n
            advance(n)
            if self._written - self._written_back >= WRITEBACK_STEP:
                self._start_writeback()

    def _start_writeback(self) -> None:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, self._written_back, self._written - self._written_back, os.POSIX_FADV_DONTNEED)
        self._written_back = self._written

    def _copy_chunk(self, src_fd: int, offset: int, count: int) -> int:
        """One copy call: in the kernel (copy_file_range) where the file systems allow it, else
        through a buffer."""
        if self._kernel_copy:
            try:
                n = os.copy_file_range(src_fd, self._fd, count, offset)
                self._written += n
                return n
            except OSError as e:
                if e.errno not in _NO_KERNEL_COPY:
                    raise
                self._kernel_copy = False  # e.g. across file systems: use the buffer from now on
        data = os.pread(src_fd, count, offset)
        self._write(data)
        return len(data)


def temp_path(out: Path) -> Path:
    return out.with_name(f".{out.name}{TEMP_MARK}{os.getpid()}")


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove temp files that conversions into `folder` left behind when they were killed (their
    process is gone). Best effort: a folder we cannot list or a file we cannot remove is left."""
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for p in entries:
        name, _, pid = p.name.rpartition(TEMP_MARK)
        if name.startswith(".") and pid.isdigit() and not _process_alive(int(pid)):
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # an earlier process had our pid; we are not writing yet
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # platforms without directory handles
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the rename itself is done
    finally:
        os.close(fd)


class Interrupted(UserError):
    """A signal ended the conversion before the output was in place."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.exit_code = 128 + signum


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """While writing, SIGINT, SIGTERM and SIGHUP raise Interrupted, so the output is dropped on the
    way out and the command ends with one line."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Interrupted(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """Hold back SIGINT/SIGTERM/SIGHUP (cleanup must not be cut short by a second Ctrl-C)."""
    held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# --- the command ---------------------------------------------------------------------------------
@dataclass
class ConvertResult:
    plan: ConversionPlan
    output: Path
    bytes_written: int
    seconds: float  # writing, fsync included (not the verification)
    stale_removed: list[Path]
    verification: VerifyResult | None = None  # when verified


def convert(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    profile: str | os.PathLike | None = None,
    force: bool = False,
    verify: bool = False,
    show_progress: bool = True,
) -> ConvertResult:
    """Repack `source` into `output`. With `verify`, the new file is checked against the input
    with llama.cpp before it is renamed into place."""
    source, output = Path(source), Path(output)
    stale = remove_stale_temps(output.parent)
    for p in stale:
        logger.info("removed %s, left by an interrupted conversion", p.name)
    inv = read_inventory(source)
    plan = plan_conversion(inv, load_profile(profile, inv) if profile is not None else None)
    _check_output(source, output, force)
    header = plan.header()
    total = plan.file_bytes(len(header))

    writer = GGUFFileWriter(output, header, plan.data_offsets(), total, plan.alignment)
    t0 = time.perf_counter()
    verification = None
    with open(source, "rb", buffering=0) as src, _signals_raise():
        try:
            writer.open()
            _check_free_space(output, total)
            writer.write_header()
            with _progress(show_progress) as progress:
                task = progress.add_task(f"writing {output.name}", total=sum(t.nbytes for t in plan.tensors))
                for t in plan.tensors:
                    writer.write_tensor(t, src.fileno(), lambda n: progress.advance(task, n))
            writer.sync()
            seconds = time.perf_counter() - t0
            if verify:
                from .verify import OutputsDiffer, verify_models

                verification = verify_models(source, writer.named())
                if not verification.passed:
                    raise OutputsDiffer(f"{output.name} was not written: {verification.summary()}")
            with _signals_blocked():  # in place and durable, or not there at all
                writer.commit()
        except OSError as e:
            with _signals_blocked():
                writer.discard()
            raise UserError(f"could not write {output}: {_os_error(e)}") from None
        except Interrupted as e:
            with _signals_blocked():
                writer.discard()
            e.args = (f"{e.args[0]}: {output} " + ("was complete before it" if writer.done else "was not written"),)
            raise
        except BaseException:
            with _signals_blocked():
                writer.discard()
            raise
    return ConvertResult(plan, output, total, seconds, stale, verification)


def _check_free_space(output: Path, total: int) -> None:
    free = shutil.disk_usage(output.parent).free
    if free < total + DISK_MARGIN:
        raise UserError(f"not enough free space in {output.parent}: the output needs {human_bytes(total)}, {human_bytes(free)} free")


def _os_error(e: OSError) -> str:
    """An OS error in words, with what to do for the usual ones."""
    hints = {
        errno.EROFS: "the destination is on a read-only file system",
        errno.EACCES: "no permission to write there",
        errno.EPERM: "no permission to write there",
        errno.ENOSPC: "no space left on the device",
        errno.EDQUOT: "disk quota exceeded",
    }
    return hints.get(e.errno) or e.strerror or str(e)


def _check_output(source: Path, output: Path, force: bool) -> None:
    if output.is_dir():
        raise UserError(f"{output} is a folder; give the path of the new .gguf file")
    if not output.parent.is_dir():
        raise UserError(f"{output.parent}: no such folder")
    if output.exists():
        if os.path.samefile(source, output):
            raise UserError(f"{output} is the input file; write the converted model to a new file")
        if not force:
            raise UserError(f"{output} exists; pass --force to overwrite it")


def _progress(show: bool):
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from .log import stderr

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        disable=not (show and stderr.is_terminal),
    )
