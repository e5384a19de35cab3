"""Calibration: the speeds of this machine that decide prompt and decode speed, measured with ggml
in seconds and kept per machine and device in the user's cache folder (`speed_model` predicts
from them).

Per device (the CPU at the thread count used, and the accelerator): matrix-vector and batched
matrix-multiply throughput for each weight type a model has, the experts' own op at decode for
their types, and their whole FFN in a prompt for each combination of types and widths; a Gated
DeltaNet block's state update at decode and in a prompt; the fixed cost of one graph (launch and
sync) and of one small copy, and host -> device upload speed from page-locked
and ordinary memory; what each op of a real decode graph adds, and beside an accelerator what a
block with host experts adds, measured by decoding the built-in demo model on the CPU alone, and
on the accelerator with its experts there and in host memory. The CPU's decode speed is also
measured at 1, half and all threads (`plan --calibrate` shows them). A later model with a type not
measured yet adds only that type's figures. The figures planned with are each the median of this
machine's last CALIBRATIONS_KEPT calibrations, so that one that fell in a busy moment does not
steer the plan alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

from gguf import GGMLQuantizationType

from . import __version__
from .defaults import CALIBRATIONS_KEPT
from .errors import UserError
from .speed_model import (KV_WINDOW, REFERENCE_GPU, DeviceSpeeds, Layout, PlanSpeeds, Weights, ffn_key, ffn_parts,
                          token_seconds)
from .user_cache import cache_dir

CALIBRATION_FORMAT = 17
# An expert cache's uploads: one expert's projection per copy (Qwen3.6's: 0.6-0.9 MB), from the
# host memory the cache uploads from; timed at these copy sizes, this many bytes each time.
EXPERT_UPLOAD_SIZES = (256 * 2**10, 2**20, 4 * 2**20)
EXPERT_UPLOAD_BYTES = 32 * 2**20
PROMPT_BATCH = 128  # tokens per batched multiply measured (prompt speed); large enough to be compute-bound
# A prompt's experts: their whole FFN as a MoE block runs it (gate, up, SwiGLU, down, weighting, sum),
# far from the dense multiply's speed on CPUs, timed for 64 tokens at each of these shares (tokens
# selecting each expert: 64 share eight experts, 1 spreads the tokens over 512). Its speed per byte
# depends on the share, and not in proportion to the reads of the distinct experts (ggml-rpc at Q4_K,
# the gate's op alone: 50 GB/s at 64 tokens per expert, 35 at 16, 17 at 8); `speed_model` takes each
# batch's shares from the routing. With the down projection's short rows and the work per
# token-expert pair, bench-dims's prompt experts took 3.6 ms per token where the gate's op alone
# predicted 2.5.
PROMPT_EXPERT_BATCH = 64
PROMPT_EXPERT_SHARES = (1, 4, 8, 16, 64)
# A prompt's recurrent-state update: the fused op over this many tokens carries the state itself.
PROMPT_RECURRENT_TOKENS = 64
# Weight bytes per decode measurement: far more than a CPU's last-level cache holds (32-96 MiB), so
# the figure is the memory's speed, as a model of gigabytes sees it, not the cache's.
DECODE_WEIGHT_BYTES = 256 * 2**20
PROMPT_WEIGHT_BYTES = 2 * 2**20
PROMPT_FFN_BYTES = 96 * 2**20  # per projection of the expert FFN (at least the 512 experts a batch selects)


@dataclass(frozen=True)
class Calibration:
    """This machine's measured speeds, for one accelerator (or none) and CPU thread count."""

    cpu: DeviceSpeeds
    accelerator: DeviceSpeeds | None
    threads: int
    cpu_decode_by_threads: dict[str, dict[int, float]]  # type -> threads -> bytes per second
    seconds: float  # how long measuring took, all runs together
    path: Path | None = None
    # the measurements `cpu` and `accelerator` are the medians of, oldest first: (cpu, accelerator)
    measurements: tuple[tuple[DeviceSpeeds, DeviceSpeeds | None], ...] = ()

    def to_json(self) -> dict:
        return {
            "format": CALIBRATION_FORMAT,
            "rotary_gguf": __version__,
            "threads": self.threads,
            "cpu": self.cpu.to_json(),
            "accelerator": self.accelerator.to_json() if self.accelerator else None,
            "cpu_decode_by_threads": {t: {str(n): v for n, v in by.items()} for t, by in self.cpu_decode_by_threads.items()},
            "seconds": round(self.seconds, 3),
            "measurements": [{"cpu": cpu.to_json(), "accelerator": acc.to_json() if acc else None}
                             for cpu, acc in self.measurements],
        }

    @classmethod
    def from_json(cls, d: dict, path: Path | None = None) -> "Calibration":
        def speeds(m: dict) -> tuple[DeviceSpeeds, DeviceSpeeds | None]:
            return DeviceSpeeds.from_json(m["cpu"]), DeviceSpeeds.from_json(m["accelerator"]) if m.get("accelerator") else None

        cpu, acc = speeds(d)
        return cls(
            cpu=cpu,
            accelerator=acc,
            threads=int(d["threads"]),
            cpu_decode_by_threads={t: {int(n): float(v) for n, v in by.items()} for t, by in d["cpu_decode_by_threads"].items()},
            seconds=float(d.get("seconds", 0.0)),
            path=path,
            measurements=tuple(speeds(m) for m in d.get("measurements") or [d]),
        )

    def covers(self, type_names: Iterable[str], expert_ffns: Iterable[str] = ()) -> bool:
        """Whether every figure the speed model needs for weights of `type_names` and expert FFNs
        of `expert_ffns` (`ffn_key`s) is here."""
        devices = [self.cpu] + ([self.accelerator] if self.accelerator else [])
        if self.accelerator is not None and self.accelerator.host_block_seconds is None:
            return False
        return all(t in dev.decode and t in dev.prompt for dev in devices for t in type_names) and all(
            key in dev.prompt_experts and all(t in dev.experts for t in ffn_parts(key)[0])
            for dev in devices for key in expert_ffns)


def calibration_path(cpu_name: str, accelerator, threads: int) -> Path:
    """The file of this machine, CPU thread count, llama.cpp build and accelerator (a device name
    and description, so a different GPU or RPC server gets its own)."""
    from . import native

    key = json.dumps([cpu_name, os.cpu_count(), threads, str(native.LIB_DIR),
                      [accelerator.name, accelerator.description, accelerator.total] if accelerator else None])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "calibration" / f"{digest}.json"


def load(path: Path) -> Calibration | None:
    """The calibration in `path`, or None when there is none, or it is unreadable or of an older
    format (it is then measured again)."""
    try:
        d = json.loads(path.read_text())
        if d.get("format") != CALIBRATION_FORMAT:
            return None
        return Calibration.from_json(d, path)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _save(calibration: Calibration, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(calibration.to_json(), indent=2))
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write the calibration to {path} ({e.strerror}); set XDG_CACHE_HOME to a writable folder") from None


# The machines this runs on drift: on a shared 2-core machine the CPU's expert op read 10 to 22 GB/s
# in 0.2 s windows of one minute, and averages over 8 s windows still moved by 9% either way. A
# generation of many tokens sees the mean time over such states; decode's figures are timed in
# passes some seconds apart and their mean time kept, where one timing kept the state it fell in.
DECODE_PASSES = 3


def calibrate(types: dict[str, int], n_embd: int, threads: int, accelerator_name: str | None = None, *,
              expert_ffns: Iterable[str] | None = None, refresh: bool = False,
              on_step: Callable[[str], None] | None = None, expert_shape: tuple[int, int] = (512, 8)) -> Calibration:
    """This machine's calibration for weight `types` (name -> ggml type) at rows of `n_embd`, and
    for experts of `expert_shape` (FFN width, experts a token uses): decode's op for their types,
    a prompt's FFN for each of `expert_ffns` (`ffn_key`s; default: one of each type at n_embd and
    that width); from the cache folder where it has them, else measured now (and kept). `refresh`
    measures everything again, a new measurement beside the last ones kept."""
    from . import native
    from .doctor import host_cpu
    from .native import measure

    acc_dev = native.device_by_name(accelerator_name) if accelerator_name else None
    path = calibration_path(host_cpu()[0], acc_dev, threads)
    expert_ffns = ({ffn_key(t, t, t, n_embd, expert_shape[0]) for t in types} if expert_ffns is None
                   else set(expert_ffns))
    stored = load(path)
    known = None if refresh else stored
    if known is not None and known.covers(types, expert_ffns):
        return known
    # a calibration lacking a type completes its latest measurement; a new one (or `refresh`) is measured whole
    latest_cpu, latest_acc = known.measurements[-1] if known else (None, None)
    step = on_step or (lambda _what: None)
    started = time.perf_counter()
    # the demo model decoded on the CPU alone (a new measurement), and on the accelerator both ways (a new one)
    demo_placements = (["cpu"] if known is None else []) + (
        ["resident", "on_host"] if acc_dev is not None and (latest_acc is None or latest_acc.host_block_seconds is None)
        else [])
    if demo_placements:  # its speed is explained from its own types' figures
        demo_types, demo_ffns = demo_weight_types()
        types, expert_ffns = {**demo_types, **types}, expert_ffns | demo_ffns
    expert_types = {t for key in expert_ffns for t in ffn_parts(key)[0]}
    devices = [(native.cpu_device(), latest_cpu, threads)]
    if acc_dev is not None:
        devices.append((acc_dev, latest_acc, None))

    passes: dict[str, list[dict]] = {dev.name: [] for dev, _, _ in devices}
    demo_runs: dict[str, list[float]] = {name: [] for name in demo_placements}
    for n in range(1, DECODE_PASSES + 1):
        of = f" ({n} of {DECODE_PASSES})"
        for dev, previous, n_threads in devices:
            passes[dev.name].append(_decode_pass(dev, previous, types, expert_types, n_embd, expert_shape, n_threads,
                                                 lambda what, of=of: step(what + of)))
        if demo_placements:
            blocks = f", {acc_dev.name}'s host expert blocks" if "on_host" in demo_placements else ""
            step(f"the built-in demo model: a real decode's ops{blocks}{of}")
            for name, runs in _demo_decode_seconds(demo_placements, acc_dev.name if acc_dev else None, threads).items():
                demo_runs[name] += runs
    cpu, *accelerators = [_device_speeds(dev, previous, _mean_of_passes(passes[dev.name]), types, expert_ffns, n_embd,
                                         expert_shape, n_threads, step) for dev, previous, n_threads in devices]
    acc = accelerators[0] if accelerators else None
    if "cpu" in demo_runs:
        cpu = replace(cpu, op_seconds=max(cpu.op_seconds, demo_op_seconds(cpu, None, demo_runs["cpu"])))
    if "resident" in demo_runs:
        op = demo_op_seconds(cpu, acc, demo_runs["resident"])
        acc = replace(acc, op_seconds=max(acc.op_seconds, op),
                      host_block_seconds=demo_host_block_seconds(cpu, acc, demo_runs["resident"], demo_runs["on_host"]))
    by_threads = dict(known.cpu_decode_by_threads) if known else {}
    counts = sorted({1, max(1, threads // 2), threads})
    for name, ggml_type in types.items():
        if name not in by_threads:
            if counts != [threads]:
                step(f"CPU: {name} at {', '.join(map(str, counts))} threads")
            by_threads[name] = {n: cpu.decode[name] if n == threads else
                                measure.matvec_bytes_per_s(native.cpu_device(), ggml_type, n_embd, n, DECODE_WEIGHT_BYTES)
                                for n in counts}
    seconds = round((known.seconds if known else 0.0) + time.perf_counter() - started, 3)
    history = stored.measurements if stored else ()
    kept = ((history if known is None else history[:-1]) + ((cpu, acc),))[-CALIBRATIONS_KEPT:]
    result = Calibration(_median_speeds([c for c, _ in kept]),
                         _median_speeds([a for _, a in kept]) if acc is not None else None,
                         threads, by_threads, seconds, path, kept)
    _save(result, path)
    return result


def _median_speeds(measured: list[DeviceSpeeds]) -> DeviceSpeeds:
    """One device's speeds, each figure the median of `measured`'s (of those that have it); the
    newest's name, description and batch."""
    newest = measured[-1]
    return replace(newest, **{name: _median([getattr(m, name) for m in measured])
                              for name in newest.__dataclass_fields__ if name not in ("name", "description", "batch")})


def _median(values: list):
    """The median of the `values` that are not None (None if none is), key by key where they are
    dicts (a type measured in only some of the measurements: of those)."""
    present = [v for v in values if v is not None]
    if present and isinstance(present[0], dict):
        return {k: _median([v.get(k) for v in present]) for k in dict.fromkeys(k for v in present for k in v)}
    return statistics.median(present) if present else None


def _decode_pass(dev, previous: DeviceSpeeds | None, types: dict[str, int], expert_types: set[str], n_embd: int,
                 expert_shape: tuple[int, int], n_threads: int | None, step: Callable[[str], None]) -> dict:
    """One pass over `dev`'s decode figures that `previous` lacks: each type's matrix-vector rate,
    the expert op's for `expert_types`, and a new device's fixed costs (seconds)."""
    from .native import measure

    known_decode = previous.decode if previous else {}
    known_experts = previous.experts if previous else {}
    figures: dict = {"decode": {}, "experts": {}}
    for name, ggml_type in types.items():
        if name not in known_decode:
            step(f"{dev.name}: {name} matrix-vector")
            figures["decode"][name] = measure.matvec_bytes_per_s(dev, ggml_type, n_embd, n_threads, DECODE_WEIGHT_BYTES)
        if name in expert_types and name not in known_experts:
            step(f"{dev.name}: {name} experts")
            figures["experts"][name] = measure.expert_bytes_per_s(dev, ggml_type, n_embd, *expert_shape, n_threads,
                                                                  DECODE_WEIGHT_BYTES)
    if previous is None:
        step(f"{dev.name}: graph and copy latency")
        figures.update(graph_seconds=measure.graph_seconds(dev, n_threads), op_seconds=measure.op_seconds(dev, n_threads),
                       copy_seconds=measure.copy_seconds(dev))
    return figures


def _mean_of_passes(passes: list[dict]) -> dict:
    """The passes' figures in one: rates by their mean time (harmonic mean), seconds by their mean."""
    first = passes[0]
    merged = {kind: {name: statistics.harmonic_mean([p[kind][name] for p in passes]) for name in first[kind]}
              for kind in ("decode", "experts")}
    return merged | {key: statistics.fmean(p[key] for p in passes) for key in first if key not in merged}


def _device_speeds(dev, previous: DeviceSpeeds | None, decode: dict, types: dict[str, int], expert_ffns: set[str],
                   n_embd: int, expert_shape: tuple[int, int], n_threads: int | None,
                   step: Callable[[str], None]) -> DeviceSpeeds:
    """`dev`'s speeds: `previous` with the `decode` figures of the passes, and the prompt figures
    (measured once: a batch's op is long enough not to fall in one state of the machine) and,
    for a new device, its uploads and recurrent-state updates."""
    from .native import measure

    prompt = dict(previous.prompt) if previous else {}
    prompt_experts = dict(previous.prompt_experts) if previous else {}
    for name, ggml_type in types.items():
        if name not in prompt:
            step(f"{dev.name}: {name} at batch {PROMPT_BATCH}")
            prompt[name] = PROMPT_BATCH * measure.matvec_bytes_per_s(dev, ggml_type, n_embd, n_threads,
                                                                     PROMPT_WEIGHT_BYTES, batch=PROMPT_BATCH)
    for key in sorted(expert_ffns - set(prompt_experts)):
        step(f"{dev.name}: {key} expert FFN at batch {PROMPT_EXPERT_BATCH}")
        ffn_types, ffn_embd, n_ff = ffn_parts(key)
        prompt_experts[key] = {share: measure.prompt_ffn_bytes_per_s(
            dev, tuple(types[t] for t in ffn_types), ffn_embd, n_ff, expert_shape[1], n_threads, PROMPT_FFN_BYTES,
            batch=PROMPT_EXPERT_BATCH, tokens_per_expert=share) for share in PROMPT_EXPERT_SHARES}
    rates = {"decode": (previous.decode if previous else {}) | decode["decode"],
             "experts": (previous.experts if previous else {}) | decode["experts"], "prompt": prompt,
             "prompt_experts": prompt_experts}
    if previous is not None:
        return replace(previous, **rates)
    extra = {}
    if dev.type != "cpu":
        step(f"{dev.name}: uploads")
        extra["upload_pageable"] = measure.upload_bytes_per_s(dev, 64 * 2**20, pinned=False)
        if dev.host_buffer_type:
            extra["upload_pinned"] = measure.upload_bytes_per_s(dev, 64 * 2**20)
        extra["expert_uploads"] = {size: measure.upload_bytes_per_s(dev, EXPERT_UPLOAD_BYTES, copy_bytes=size)
                                   for size in EXPERT_UPLOAD_SIZES}
    step(f"{dev.name}: recurrent state update")
    extra["recurrent"] = measure.recurrent_bytes_per_s(dev, n_threads)
    extra["prompt_recurrent"] = measure.recurrent_bytes_per_s(dev, n_threads, tokens=PROMPT_RECURRENT_TOKENS)
    return DeviceSpeeds(dev.name, dev.description, batch=PROMPT_BATCH, graph_seconds=decode["graph_seconds"],
                        op_seconds=decode["op_seconds"], copy_seconds=decode["copy_seconds"], **rates, **extra)


DEMO_TOKENS = 32  # tokens per timed generation of the demo model
DEMO_RUNS = 4  # timed generations of each placement per pass of the calibration


def demo_weight_types() -> tuple[dict[str, int], set[str]]:
    """The built-in demo model's weight types and its KV cache's (name -> ggml type), and its
    expert FFNs' (`ffn_key`s)."""
    inv = _demo_inventory()
    f16 = GGMLQuantizationType.F16
    return ({t.type_name: t.ggml_type for t in inv.tensors} | {f16.name: f16.value},
            set(_demo_weights().expert_ffn.values()))


def demo_op_seconds(cpu: DeviceSpeeds, acc: DeviceSpeeds | None, runs: list[float]) -> float:
    """What each op of a real llama.cpp decode graph costs on `acc` (None: the CPU alone) beyond
    the parts measured one by one: the built-in demo model's seconds per token in `runs`,
    decoded wholly there, less what the speed model explains without op costs (weight reads, the
    graph's launch, its inputs and logits), over its ops. The non-matmul ops' own work, ggml-rpc's
    work per node and a GPU's launches show in a whole decode graph, not in an isolated chain of
    additions."""
    weights = _demo_weights()
    main = acc or cpu
    layout = Layout(accelerator=acc is not None)
    without_ops = replace(main, op_seconds=0.0)
    explained = sum(token_seconds(weights, layout, cpu if acc else without_ops, without_ops if acc else None,
                                  "decode").values())
    return max(statistics.median(runs) - explained, 0.0) / max(weights.graph_nodes, 1)


def demo_host_block_seconds(cpu: DeviceSpeeds, acc: DeviceSpeeds, resident_runs: list[float],
                            on_host_runs: list[float]) -> float:
    """What a block whose experts stay in host memory costs beside the accelerator `acc`, beyond
    its experts' own reads: the built-in demo model's seconds per token with every expert on
    `acc` and with every expert in host memory, runs taken in turn; the median of each pair's
    difference (so that the machine's drift moves both sides of it), less what the experts' reads
    at the calibrated speeds explain, per block. That is the scheduler's two graph splits, the
    copies of a block's input and routing to the CPU and of the result back, with every wake-up
    and round trip between them (on ggml-rpc, every split graph is sent again, as no two in a row
    are the same)."""
    weights = _demo_weights()
    blocks = sorted(weights.expert)
    gap = statistics.median(host - resident for resident, host in zip(resident_runs, on_host_runs))
    experts = sum(weights.used_seconds(i, cpu, "decode") - weights.used_seconds(i, acc, "decode") for i in blocks)
    return max(gap - experts, 0.0) / len(blocks)


def _demo_weights() -> Weights:
    """The demo model as its timed decodes run it: attention over about half their tokens (their
    prompt is a few tokens; flash attention reads the cells in use)."""
    return Weights.from_inventory(_demo_inventory(), kv_cells=DEMO_TOKENS // 2)


@lru_cache(maxsize=1)
def _demo_inventory():
    """The built-in demo model's header, read once per process (a calibration needs it up to three times)."""
    from .demo import DEMO_MODEL
    from .inventory import read_inventory

    return read_inventory(DEMO_MODEL)


def _demo_decode_seconds(placements: list[str], accelerator_name: str | None, threads: int) -> dict[str, list[float]]:
    """Seconds per decoded token of the built-in demo model in DEMO_RUNS runs of each of
    `placements` ("cpu": the CPU alone; "resident": every expert on the accelerator; "on_host":
    every expert in host memory beside it), all loaded at once and their runs taken in turn."""
    from contextlib import ExitStack

    from . import arch as names
    from .demo import DEMO_MODEL
    from .engine import Engine
    from .plan import HOST_BUFFER_TYPE, Placement

    ways = {"cpu": Placement()}
    if accelerator_name is not None:
        ways["resident"] = Placement(devices=(accelerator_name,), n_gpu_layers=-1)
        ways["on_host"] = Placement(devices=(accelerator_name,), overrides=((names.expert_pattern(None), HOST_BUFFER_TYPE),),
                                    n_gpu_layers=-1)
    with ExitStack() as stack:
        engines = {name: stack.enter_context(Engine.load(DEMO_MODEL, ways[name], n_ctx=4 * DEMO_TOKENS, n_threads=threads))
                   for name in placements}
        prompt = next(iter(engines.values())).tokenize("The list type", add_special=True)
        seconds: dict[str, list[float]] = {name: [] for name in placements}
        for run in range(DEMO_RUNS + 1):  # the first: a warm-up
            for name, engine in engines.items():
                stats = None
                for event in engine.generate(prompt, max_tokens=DEMO_TOKENS):
                    stats = event.stats
                if run:
                    seconds[name].append(1.0 / stats.decode_tps)
    return seconds


def plan_speeds(inv, accelerator_name: str | None, threads: int, *, kv_type: str = "f16", kv_cells: int = KV_WINDOW,
                refresh: bool = False, on_step: Callable[[str], None] | None = None) -> tuple[PlanSpeeds, Calibration]:
    """What the planner predicts `inv`'s speed from: this machine's calibration for the model's
    weight types and its KV cache's `kv_type` (measured the first time, or again with `refresh`),
    with published figures of a laptop GPU (`REFERENCE_GPU`) for an accelerator that is not on
    this machine; its attention reading `kv_cells` cells of the cache per token."""
    types = {t.type_name: t.ggml_type for t in inv.tensors} | {kv_type.upper(): GGMLQuantizationType[kv_type.upper()].value}
    weights = Weights.from_inventory(inv, kv_type, kv_cells)
    cal = calibrate(types, inv.n_embd, threads, accelerator_name, refresh=refresh, on_step=on_step,
                    expert_ffns=set(weights.expert_ffn.values()),
                    expert_shape=(inv.n_ff_exp or 512, inv.n_expert_used or 8))
    where = f"CPU at {threads} thread{'s' if threads > 1 else ''}"
    if cal.accelerator is not None:
        source = f"calibrated: {where}, {cal.accelerator.name}"
    else:
        source = f"calibrated: {where}; {REFERENCE_GPU.name} for the GPU"
    return PlanSpeeds(weights, cal.cpu, cal.accelerator or REFERENCE_GPU, source), cal


def device_plan_speeds(inv, accelerator_names: list[str], threads: int, *, kv_type: str = "f16",
                       kv_cells: int = KV_WINDOW, refresh: bool = False,
                       on_step: Callable[[str], None] | None = None) -> tuple[PlanSpeeds, list[Calibration]]:
    """`plan_speeds` for a plan over several accelerators: each one calibrated (each its own file),
    their speeds by name in `PlanSpeeds.devices`, the first as the accelerator."""
    found = [plan_speeds(inv, name, threads, kv_type=kv_type, kv_cells=kv_cells, refresh=refresh, on_step=on_step)
             for name in accelerator_names]
    devices = {name: speeds.accelerator for name, (speeds, _) in zip(accelerator_names, found)}
    where = f"CPU at {threads} thread{'s' if threads > 1 else ''}"
    first = found[0][0]
    return (replace(first, devices=devices, source=f"calibrated: {where}, {', '.join(accelerator_names)}"),
            [calibration for _, calibration in found])
