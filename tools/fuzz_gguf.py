#!/usr/bin/env python3
"""Feed corrupted GGUF files to rotary-gguf and count what happens.

Each file is a valid test model (tools/make_test_model.py) with one corruption: bit flips and
truncations anywhere in the header, and targeted ones (huge counts and lengths, wrong value types,
out-of-range hyperparameters, bad alignments, nested arrays, duplicated keys and tensor names,
overlapping, misaligned or out-of-file tensor data, bad shapes and types). A worker process runs
what the commands run on each file: the reader, `inspect`'s figures, `plan`'s placement and
`convert`'s plan and header; with --load, files the reader accepts are also loaded by llama.cpp.
A worker that dies on a signal is an abort, one that takes longer than --timeout a hang.

Every targeted corruption breaks a rule, so accepting one is a failure. A bit flip can also land in
a string or number nothing checks (a token's text, a float); such a file is well-formed, and is
counted as accepted, split by whether the figures the tool reports changed.

Usage::

    python tools/fuzz_gguf.py --files 2000 --seed 1
    python tools/fuzz_gguf.py --files 300 --load     # also load accepted files in llama.cpp
"""

from __future__ import annotations

import argparse
import json
import math
import os
import select
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS.parent))

# GGUF value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_FMT = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "?", U64: "Q", I64: "q", F64: "d"}

TARGETED = (
    "count", "string-length", "value-type", "hparam", "alignment", "nested-array", "duplicate-key",
    "empty-key", "duplicate-tensor", "tensor-offset", "tensor-shape", "tensor-type", "tensor-name",
    "magic-version", "blocks-vs-tensors", "expert-order",
)
RANDOM = ("bitflip", "truncate")


# --- building GGUF bytes -------------------------------------------------------------------------
def gguf_string(s: str | bytes) -> bytes:
    data = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(data)) + data


def string_value(s: str) -> bytes:
    return struct.pack("<I", STRING) + gguf_string(s)


def scalar(vtype: int, value) -> bytes:
    return struct.pack(f"<I{_FMT[vtype]}", vtype, value)


def array(item_type: int, values) -> bytes:
    if item_type == STRING:
        body = b"".join(gguf_string(v) for v in values)
    else:
        body = struct.pack(f"<{len(values)}{_FMT[item_type]}", *values)
    return struct.pack("<IIQ", ARRAY, item_type, len(values)) + body


def nested_array(depth: int) -> bytes:
    """An array of arrays `depth` deep, one u32 at the bottom."""
    inner = struct.pack("<IQI", U32, 1, 7)
    for _ in range(depth - 1):
        inner = struct.pack("<IQ", ARRAY, 1) + inner
    return struct.pack("<I", ARRAY) + inner


@dataclass
class Parts:
    """A GGUF file taken apart: key/values as (key, encoded type+value), the tensor index, the data."""

    version: int
    kvs: list[tuple[bytes, bytes]]
    tensors: list[dict]  # name (bytes), shape, type, offset (relative to the data section)
    data: bytes
    alignment: int = 32
    n_kv: int | None = None  # counts written in the header (default: the real ones)
    n_tensors: int | None = None
    magic: bytes = b"GGUF"

    def header(self) -> bytes:
        out = bytearray(self.magic)
        n_kv = len(self.kvs) if self.n_kv is None else self.n_kv
        n_tensors = len(self.tensors) if self.n_tensors is None else self.n_tensors
        out += struct.pack("<IQQ", self.version, n_tensors, n_kv)
        for key, value in self.kvs:
            out += gguf_string(key) + value
        for t in self.tensors:
            out += gguf_string(t["name"]) + struct.pack("<I", t.get("n_dims", len(t["shape"])))
            out += b"".join(struct.pack("<Q", d) for d in t["shape"])
            out += struct.pack("<IQ", t["type"], t["offset"])
        return bytes(out)

    def build(self) -> bytes:
        head = self.header()
        return head + bytes(-len(head) % self.alignment) + self.data

    def key_index(self, key: str) -> int:
        return next(i for i, (k, _) in enumerate(self.kvs) if k == key.encode())

    def set_value(self, key: str, value: bytes) -> "Parts":
        kvs = list(self.kvs)
        kvs[self.key_index(key)] = (key.encode(), value)
        return replace(self, kvs=kvs)


def take_apart(path: Path) -> tuple[Parts, object]:
    """The parts of a valid file, read with rotary-gguf's reader."""
    from rotary_gguf.inventory import read_inventory

    inv = read_inventory(path)
    raw = path.read_bytes()
    kvs = [(k.encode(), v[8 + len(k.encode()) :]) for k, v in inv.kv_raw.items()]
    tensors = [
        {"name": t.name.encode(), "shape": list(t.shape), "type": t.ggml_type, "offset": t.offset - inv.data_offset}
        for t in inv.tensors
    ]
    parts = Parts(inv.version, kvs, tensors, raw[inv.data_offset :], inv.alignment)
    assert parts.build() == raw, "the test model does not rebuild byte for byte"
    return parts, inv


# --- corruptions ----------------------------------------------------------------------------------
HUGE = (2**63 - 1, 2**64 - 1, 2**63, 2**32, 2**40 + 3)


def _hparam_keys(inv) -> list[str]:
    from rotary_gguf.inventory_checks import HPARAM_RANGES

    keys = [f"{inv.arch}.{name}" for name in HPARAM_RANGES]
    return [k for k in keys if k in inv.metadata]


def corrupt(kind: str, parts: Parts, inv, rng: np.random.Generator) -> bytes:
    """One corrupted file of `kind` made from `parts`."""
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    t_index = int(rng.integers(len(parts.tensors)))
    tensors = [dict(t, shape=list(t["shape"])) for t in parts.tensors]
    t = tensors[t_index]
    if kind == "bitflip":
        raw = bytearray(parts.build())
        for _ in range(int(rng.integers(1, 4))):
            at = int(rng.integers(len(parts.header())))
            raw[at] ^= 1 << int(rng.integers(8))
        return bytes(raw)
    if kind == "truncate":
        raw = parts.build()
        last_end = len(raw) - len(parts.data) + max(x["offset"] for x in parts.tensors) + 1
        return raw[: int(rng.integers(0, min(last_end, len(raw) - 1)))]
    if kind == "count":
        which = pick(("n_kv", "n_tensors"))
        current = len(parts.kvs) if which == "n_kv" else len(parts.tensors)
        return replace(parts, **{which: pick((*HUGE, current + 1, current + 1000))}).build()
    if kind == "string-length":
        raw = bytearray(parts.build())
        # the length of a key (or of the first tensor name), overwritten
        if rng.random() < 0.5:
            i = int(rng.integers(len(parts.kvs)))
            at = 24 + sum(8 + len(k) + len(v) for k, v in parts.kvs[:i])
        else:
            at = 24 + sum(8 + len(k) + len(v) for k, v in parts.kvs)
        raw[at : at + 8] = struct.pack("<Q", pick((*HUGE, len(raw), len(raw) - at)))
        return bytes(raw)
    if kind == "value-type":
        key, value = pick(parts.kvs)
        bad = pick((13, 14, 99, 2**31, 2**32 - 1))
        if value[:4] == struct.pack("<I", ARRAY) and rng.random() < 0.5:
            value = value[:4] + struct.pack("<I", bad) + value[8:]  # the array's item type
        else:
            value = struct.pack("<I", bad) + value[4:]
        return parts.set_value(key.decode(), value).build()
    if kind == "hparam":
        key = pick(_hparam_keys(inv))
        n_layer = inv.n_layer
        value = pick((
            string_value("40"), scalar(F32, math.nan), scalar(F32, math.inf), scalar(F64, 1e30),
            scalar(U64, 2**64 - 1), scalar(I64, 2**63 - 1), scalar(I32, -100000), scalar(I32, -1),
            scalar(U32, 2**31), scalar(BOOL, True), array(U32, [8] * 5000), array(STRING, ["a", "b"]),
            array(U32, [1] * (n_layer + 1)), array(F32, [1.0] * n_layer), scalar(U32, 0) if "count" in key else scalar(U32, 2**30),
        ))
        return parts.set_value(key, value).build()
    if kind == "alignment":
        value = pick((
            scalar(U32, 0), scalar(U32, 1), scalar(U32, 3), scalar(U32, 16), scalar(U32, 48), scalar(U32, 2**31),
            scalar(I32, -32), scalar(U64, 32), string_value("32"), scalar(F32, 32.0), array(U32, [32]),
        ))
        kvs = [kv for kv in parts.kvs if kv[0] != b"general.alignment"] + [(b"general.alignment", value)]
        return replace(parts, kvs=kvs).build()
    if kind == "nested-array":
        depth = pick((2, 3, 100, 1000, 5000))
        key = pick((b"general.nested", (inv.arch + ".block_count").encode()))
        kvs = [kv for kv in parts.kvs if kv[0] != key] + [(key, nested_array(depth))]
        return replace(parts, kvs=kvs).build()
    if kind == "duplicate-key":
        return replace(parts, kvs=parts.kvs + [pick(parts.kvs)]).build()
    if kind == "empty-key":
        return replace(parts, kvs=parts.kvs + [(b"", scalar(U32, 1))]).build()
    if kind == "duplicate-tensor":
        other = pick([x for i, x in enumerate(tensors) if i != t_index])
        t["name"] = other["name"]
        return replace(parts, tensors=tensors).build()
    if kind == "tensor-offset":
        others = [x["offset"] for i, x in enumerate(tensors) if i != t_index]
        t["offset"] = pick((*HUGE, t["offset"] + 1, t["offset"] + 31, pick(others), len(parts.data), t["offset"] + parts.alignment))
        return replace(parts, tensors=tensors).build()
    if kind == "tensor-shape":
        choice = int(rng.integers(4))
        if choice == 0:
            t["n_dims"] = pick((5, 8, 2**32 - 1))
        else:
            d = int(rng.integers(len(t["shape"])))
            t["shape"][d] = pick((0, 2 * t["shape"][d], t["shape"][d] + 1, 2**63 - 1, 2**64 - 1, 2**31 + 1))
            if t["shape"][d] == parts.tensors[t_index]["shape"][d]:
                t["shape"][d] += 1
        return replace(parts, tensors=tensors).build()
    if kind == "tensor-type":
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        def size(ggml_type):
            block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
            return nbytes / block

        valid = [int(q) for q in GGML_QUANT_SIZES if size(int(q)) != size(t["type"])]
        t["type"] = pick((4, 5, 99, 2**31, 2**32 - 1, pick(valid), pick(valid)))
        return replace(parts, tensors=tensors).build()
    if kind == "tensor-name":
        t["name"] = pick((b"", b"\xff\xfe" + t["name"], b"blk.0." + b"x" * 80))
        return replace(parts, tensors=tensors).build()
    if kind == "magic-version":
        if rng.random() < 0.3:
            return replace(parts, magic=pick((b"GGUf", b"FUGG", b"\0\0\0\0"))).build()
        return replace(parts, version=pick((0, 1, 4, 2**31, 2**32 - 1))).build()
    if kind == "blocks-vs-tensors":
        key = pick([k for k in (f"{inv.arch}.block_count", f"{inv.arch}.expert_count") if k in inv.metadata])
        current = inv.metadata[key]
        return parts.set_value(key, scalar(U32, pick((current - 1, current + 1, 1)))).build()
    if kind == "expert-order":
        n = inv.n_expert or 4
        order = list(range(n))
        bad = pick((order[:-1], order[:-1] + [0], order + [n], [-1] + order[1:], list(range(1, n + 1))))
        key = pick(("rotary.expert_order.blk.0", f"rotary.expert_order.blk.{max(inv.n_layer, 1) + 5}", "rotary.expert_order.blk.x"))
        if key.endswith("blk.0"):
            value = array(I32, bad)
        else:
            value = array(I32, order)
        return replace(parts, kvs=parts.kvs + [(key.encode(), value)]).build()
    raise ValueError(kind)


# --- checking one file (in a worker process) ------------------------------------------------------
def figures(path: Path) -> str:
    """Everything the commands derive from a file, as JSON: raises UserError for a rejected file."""
    from rotary_gguf.catalog import match
    from rotary_gguf.cli import inspect_summary
    from rotary_gguf.convert import plan_conversion
    from rotary_gguf.inventory import read_inventory
    from rotary_gguf.plan import Accelerator, ModelFigures, make_plan
    from rotary_gguf.errors import UserError

    inv = read_inventory(path)
    summary = inspect_summary(inv, match(inv))
    summary.pop("file")
    summary["tensors"] = [(t.name, t.ggml_type, t.shape, t.offset - inv.data_offset) for t in inv.tensors]
    if inv.is_moe:
        model = ModelFigures.from_inventory(inv)
        plan = make_plan(model, Accelerator.planned_cuda(), 8 * 2**30, mode="cpu", expert_cache="auto")
        summary["plan"] = plan.to_json()
        summary["plan"]["model"] = None
        try:
            conversion = plan_conversion(inv)
            summary["convert_header"] = len(conversion.header())
        except UserError as e:
            summary["convert_header"] = str(e).split(": ", 1)[-1]
    return json.dumps(summary, sort_keys=True, default=str)


def load(path: Path) -> None:
    """Load the model with llama.cpp through the engine (CPU, small context) and decode a token."""
    from rotary_gguf.engine import Engine

    with Engine.load(path, n_ctx=64, n_batch=16, n_threads=1) as engine:
        list(engine.generate(engine.tokenize("hi"), max_tokens=1))


def worker() -> None:
    """Read 'check|load PATH' lines, answer one JSON line each: outcome and figures."""
    from rotary_gguf.errors import UserError
    from rotary_gguf import log

    log.setup(False)
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever llama.cpp prints goes to stderr, not into the answers
    for line in sys.stdin:
        what, path = line.rstrip("\n").split(" ", 1)
        try:
            result = {"outcome": "accepted", "figures": figures(Path(path))}
            if what == "load":
                try:
                    load(Path(path))
                    result["load"] = "loaded"
                except UserError as e:
                    result["load"] = str(e)  # llama.cpp refused it cleanly
        except UserError as e:
            result = {"outcome": "rejected", "message": str(e)}
        except BaseException as e:  # noqa: BLE001 - the point is to count them
            import traceback

            result = {"outcome": "traceback", "message": "".join(traceback.format_exception_only(e)).strip()[:300]}
        print(json.dumps(result), file=answers, flush=True)


class Worker:
    """A worker process; restarted after a hang or an abort."""

    def __init__(self):
        self.proc = None

    def ask(self, what: str, path: Path, timeout: float) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, "--worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, text=True, bufsize=1,
            )
        self.proc.stdin.write(f"{what} {path}\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.close()
            return {"outcome": "hang"}
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            self.proc = None
            return {"outcome": "abort", "message": f"worker ended with {code}"}
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


# --- the campaign ---------------------------------------------------------------------------------
@dataclass
class Report:
    """Outcomes per corruption kind. 'rejected': one clear error from rotary-gguf's reader;
    'refused': the reader accepted it and llama.cpp's loader then refused it cleanly (--load only)."""

    rows: dict[str, Counter] = field(default_factory=dict)
    changed: Counter = field(default_factory=Counter)  # accepted files whose figures changed, per kind
    examples: dict[str, list[str]] = field(default_factory=dict)  # kind/outcome -> messages
    seconds: float = 0.0

    def add(self, kind: str, result: dict, base_figures: str) -> None:
        outcome = result["outcome"]
        if outcome == "accepted" and result.get("load", "loaded") != "loaded":
            outcome = "refused"
        self.rows.setdefault(kind, Counter())[outcome] += 1
        if outcome == "accepted" and result.get("figures") != base_figures:
            self.changed[kind] += 1
        if outcome != "rejected":
            self.examples.setdefault(f"{kind}/{outcome}", []).append(result.get("message", result.get("load", "")))

    def total(self, outcome: str) -> int:
        return sum(c[outcome] for c in self.rows.values())

    @property
    def tried(self) -> int:
        return sum(sum(c.values()) for c in self.rows.values())

    @property
    def corrupted_accepted(self) -> int:
        """Targeted corruptions (each breaks a rule) that nothing refused."""
        return sum(c["accepted"] for kind, c in self.rows.items() if kind in TARGETED)

    @property
    def failures(self) -> int:
        return self.total("traceback") + self.total("hang") + self.total("abort") + self.corrupted_accepted

    def table(self) -> str:
        columns = ("rejected", "refused", "accepted", "traceback", "hang", "abort")
        titles = ("rejected", "llama.cpp refused", "accepted", "tracebacks", "hangs", "aborts")
        rows = [(kind, self.rows[kind], self.changed[kind]) for kind in (*RANDOM, *TARGETED) if kind in self.rows]
        rows.append(("all", sum((c for _, c, _ in rows), Counter()), sum(self.changed.values())))
        lines = ["| corruption | tried | " + " | ".join(titles) + " |", "|---" + "|---:" * (len(titles) + 1) + "|"]
        for kind, c, changed in rows:
            cells = [str(c[col]) + (f" ({changed}*)" if col == "accepted" and changed else "") for col in columns]
            name = f"**{kind}**" if kind == "all" else kind
            lines.append(f"| {name} | {sum(c.values())} | " + " | ".join(cells) + " |")
        if self.changed:
            lines.append("")
            lines.append("\\* well-formed after a bit flip, but with a name or value that differs from the original")
        return "\n".join(lines)


def base_models(folder: Path) -> list[Path]:
    from synthetic_models import make_model

    variants = [dict(arch="qwen3moe"), dict(arch="qwen35moe"), dict(arch="qwen35moe", fused_gate_up=True)]
    return [make_model(folder / f"base-{i}.gguf", **kw) for i, kw in enumerate(variants)]


def run(files: int, seed: int, *, load_accepted: bool = False, timeout: float = 10.0, folder: Path | None = None,
        kinds: tuple[str, ...] = RANDOM + TARGETED, progress: bool = False, keep: Path | None = None) -> Report:
    """Make `files` corrupted files (seeded), check each in a worker, count the outcomes."""
    sys.path.insert(0, str(TOOLS))
    rng = np.random.default_rng(seed)
    report = Report()
    worker = Worker()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        tmp = Path(tmp)
        bases = [(p, *take_apart(p)) for p in base_models(tmp)]
        base_figures = [worker.ask("check", p, timeout * 3)["figures"] for p, _, _ in bases]
        try:
            for n in range(files):
                kind = kinds[n % len(kinds)]
                b = int(rng.integers(len(bases)))
                path, parts, inv = bases[b]
                bad = tmp / "fuzzed.gguf"
                bad.write_bytes(corrupt(kind, parts, inv, rng))
                result = worker.ask("check", bad, timeout)
                if result["outcome"] == "accepted" and load_accepted:
                    result = worker.ask("load", bad, timeout * 3)
                report.add(kind, result, base_figures[b])
                if keep is not None and result["outcome"] != "rejected":
                    keep.mkdir(parents=True, exist_ok=True)
                    bad.rename(keep / f"{n}-{kind}-{result['outcome']}.gguf")
                if progress and (n + 1) % 100 == 0:
                    print(f"{n + 1} files", file=sys.stderr, flush=True)
        finally:
            worker.close()
    report.seconds = time.perf_counter() - t0
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=1000, help="corrupted files to try (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per file before it counts as a hang")
    parser.add_argument("--load", action="store_true", help="also load every accepted file with llama.cpp")
    parser.add_argument("--examples", action="store_true", help="print the message of every non-rejection")
    parser.add_argument("--kinds", default=",".join(RANDOM + TARGETED), help="corruptions to make, comma-separated (default: all)")
    parser.add_argument("--keep", type=Path, help="save every file that was not rejected into this folder")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker()
        return
    kinds = tuple(k for k in args.kinds.split(",") if k)
    unknown = set(kinds) - set(RANDOM + TARGETED)
    if unknown:
        parser.error(f"unknown corruption kinds: {', '.join(sorted(unknown))}")
    report = run(args.files, args.seed, load_accepted=args.load, timeout=args.timeout, progress=True, keep=args.keep, kinds=kinds)
    print(report.table())
    print(f"{report.seconds:.1f} s, {1000 * report.seconds / max(args.files, 1):.1f} ms per file")
    if args.examples:
        for key, messages in sorted(report.examples.items()):
            for m in messages[:5]:
                print(f"{key}: {m}")
    sys.exit(1 if report.failures else 0)


if __name__ == "__main__":
    main()
