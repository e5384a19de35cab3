"""Calibration: the speeds of this machine that decide prompt and decode speed, measured with ggml
in seconds and kept per machine and device in the user's cache folder (`speed_model` predicts
from them).

Per device (the CPU at the thread count used, and the accelerator): matrix-vector and batched
matrix-multiply throughput and the experts' own op at decode and in a prompt, for each weight type
a model has; a Gated DeltaNet block's state update at decode and in a prompt; the fixed cost of one
graph (launch and sync) and of one small copy, and host -> device upload speed from page-locked
and ordinary memory; beside an accelerator, what each op of a real decode graph and a block with host experts
add, measured by decoding the built-in demo model both ways. The CPU's decode speed is also
measured at 1, half and all threads (`plan --calibrate` shows them). A later model with a type not
measured yet adds only that type's figures.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from . import __version__
from .errors import UserError
from .speed_model import REFERENCE_GPU, DeviceSpeeds, Layout, PlanSpeeds, Weights, token_seconds
from .user_cache import cache_dir

CALIBRATION_FORMAT = 12
PROMPT_BATCH = 128  # tokens per batched multiply measured (prompt speed); large enough to be compute-bound
# A prompt's experts: the op (MUL_MAT_ID), far from the dense multiply's speed on CPUs, timed for 64
# tokens at each of these shares (tokens selecting each expert the op uses: 64 share eight experts,
# 1 spreads the tokens over 512). Its speed per byte depends on the share, and not in proportion to
# the reads of the distinct experts (ggml-rpc at Q4_K: 50 GB/s at 64 tokens per expert, 35 at 16,
# 17 at 8); `speed_model` takes each batch's shares from the routing.
PROMPT_EXPERT_BATCH = 64
PROMPT_EXPERT_SHARES = (1, 4, 8, 16, 64)
# A prompt's recurrent-state update: the fused op over this many tokens carries the state itself.
PROMPT_RECURRENT_TOKENS = 64
# Weight bytes per decode measurement: far more than a CPU's last-level cache holds (32-96 MiB), so
# the figure is the memory's speed, as a model of gigabytes sees it, not the cache's.
DECODE_WEIGHT_BYTES = 256 * 2**20
PROMPT_WEIGHT_BYTES = 2 * 2**20


@dataclass(frozen=True)
class Calibration:
    """This machine's measured speeds, for one accelerator (or none) and CPU thread count."""

    cpu: DeviceSpeeds
    accelerator: DeviceSpeeds | None
    threads: int
    cpu_decode_by_threads: dict[str, dict[int, float]]  # type -> threads -> bytes per second
    seconds: float  # how long measuring took, all runs together
    path: Path | None = None

    def to_json(self) -> dict:
        return {
            "format": CALIBRATION_FORMAT,
            "rotary_gguf": __version__,
            "threads": self.threads,
            "cpu": self.cpu.to_json(),
            "accelerator": self.accelerator.to_json() if self.accelerator else None,
            "cpu_decode_by_threads": {t: {str(n): v for n, v in by.items()} for t, by in self.cpu_decode_by_threads.items()},
            "seconds": round(self.seconds, 3),
        }

    @classmethod
    def from_json(cls, d: dict, path: Path | None = None) -> "Calibration":
        acc = d.get("accelerator")
        return cls(
            cpu=DeviceSpeeds.from_json(d["cpu"]),
            accelerator=DeviceSpeeds.from_json(acc) if acc else None,
            threads=int(d["threads"]),
            cpu_decode_by_threads={t: {int(n): float(v) for n, v in by.items()} for t, by in d["cpu_decode_by_threads"].items()},
            seconds=float(d.get("seconds", 0.0)),
            path=path,
        )

    def covers(self, type_names: Iterable[str]) -> bool:
        devices = [self.cpu] + ([self.accelerator] if self.accelerator else [])
        if self.accelerator is not None and self.accelerator.host_block_seconds is None:
            return False
        return all(t in dev.decode and t in dev.prompt and t in dev.experts and t in dev.prompt_experts
                   for dev in devices for t in type_names)


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


def calibrate(types: dict[str, int], n_embd: int, threads: int, accelerator_name: str | None = None, *,
              refresh: bool = False, on_step: Callable[[str], None] | None = None,
              expert_shape: tuple[int, int] = (512, 8)) -> Calibration:
    """This machine's calibration for weight `types` (name -> ggml type) at rows of `n_embd`, and
    for experts of `expert_shape` (FFN width, experts a token uses), from the cache folder where it
    has them, else measured now (and kept). `refresh` measures everything again."""
    from . import native
    from .doctor import host_cpu
    from .native import measure

    acc_dev = native.device_by_name(accelerator_name) if accelerator_name else None
    path = calibration_path(host_cpu()[0], acc_dev, threads)
    known = None if refresh else load(path)
    if known is not None and known.covers(types):
        return known
    step = on_step or (lambda _what: None)
    started = time.perf_counter()

    def device_speeds(dev, previous: DeviceSpeeds | None, n_threads: int | None) -> DeviceSpeeds:
        decode, prompt = dict(previous.decode) if previous else {}, dict(previous.prompt) if previous else {}
        experts = dict(previous.experts) if previous else {}
        prompt_experts = dict(previous.prompt_experts) if previous else {}
        for name, ggml_type in types.items():
            if name not in decode:
                step(f"{dev.name}: {name} matrix-vector")
                decode[name] = measure.matvec_bytes_per_s(dev, ggml_type, n_embd, n_threads, DECODE_WEIGHT_BYTES)
            if name not in experts:
                step(f"{dev.name}: {name} experts")
                experts[name] = measure.expert_bytes_per_s(dev, ggml_type, n_embd, *expert_shape, n_threads, DECODE_WEIGHT_BYTES)
            if name not in prompt:
                step(f"{dev.name}: {name} at batch {PROMPT_BATCH}")
                prompt[name] = PROMPT_BATCH * measure.matvec_bytes_per_s(dev, ggml_type, n_embd, n_threads,
                                                                         PROMPT_WEIGHT_BYTES, batch=PROMPT_BATCH)
            if name not in prompt_experts:
                step(f"{dev.name}: {name} experts at batch {PROMPT_EXPERT_BATCH}")
                prompt_experts[name] = {share: measure.expert_bytes_per_s(
                    dev, ggml_type, n_embd, *expert_shape, n_threads, DECODE_WEIGHT_BYTES, batch=PROMPT_EXPERT_BATCH,
                    tokens_per_expert=share) for share in PROMPT_EXPERT_SHARES}
        if previous is not None:
            return replace(previous, decode=decode, prompt=prompt, experts=experts, prompt_experts=prompt_experts)
        step(f"{dev.name}: graph and copy latency")
        extra = {}
        if dev.type != "cpu":
            step(f"{dev.name}: uploads")
            extra["upload_pageable"] = measure.upload_bytes_per_s(dev, 64 * 2**20, pinned=False)
            if dev.host_buffer_type:
                extra["upload_pinned"] = measure.upload_bytes_per_s(dev, 64 * 2**20)
        step(f"{dev.name}: recurrent state update")
        extra["recurrent"] = measure.recurrent_bytes_per_s(dev, n_threads)
        extra["prompt_recurrent"] = measure.recurrent_bytes_per_s(dev, n_threads, tokens=PROMPT_RECURRENT_TOKENS)
        return DeviceSpeeds(dev.name, dev.description, decode, prompt, PROMPT_BATCH, measure.graph_seconds(dev, n_threads),
                            measure.op_seconds(dev, n_threads), measure.copy_seconds(dev), experts=experts,
                            prompt_experts=prompt_experts, **extra)

    if acc_dev is not None:  # the demo model measures host expert blocks: its types too
        types = {**demo_weight_types(), **types}
    cpu = device_speeds(native.cpu_device(), known.cpu if known else None, threads)
    acc = device_speeds(acc_dev, known.accelerator if known else None, None) if acc_dev else None
    if acc is not None and acc.host_block_seconds is None:
        step(f"{acc.name}: host expert blocks and a real decode's ops (the built-in demo model)")
        op, host_block = demo_decode_costs(cpu, acc, threads)
        acc = replace(acc, op_seconds=max(acc.op_seconds, op), host_block_seconds=host_block)
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
    result = Calibration(cpu, acc, threads, by_threads, seconds, path)
    _save(result, path)
    return result


DEMO_TOKENS = 32  # tokens per timed generation of the demo model; the median of DEMO_RUNS is kept
DEMO_RUNS = 5


def demo_weight_types() -> dict[str, int]:
    from .demo import DEMO_MODEL
    from .inventory import read_inventory

    return {t.type_name: t.ggml_type for t in read_inventory(DEMO_MODEL).tensors}


def demo_decode_costs(cpu: DeviceSpeeds, acc: DeviceSpeeds, threads: int) -> tuple[float, float]:
    """What a real llama.cpp decode costs on the accelerator `acc` beyond the parts measured one
    by one, from the built-in demo model decoded with every expert on `acc` and with every expert
    in host memory:
    - per op of its graph: the resident decode's time less what the speed model explains without
      op costs (weight reads, the graph's launch, its inputs and logits), over its ops: what
      ggml-rpc's work per node or a GPU's launches add in a whole decode graph, which an isolated
      chain of additions does not show;
    - per block whose experts stay in host memory, beyond its experts' own reads: the difference
      of the two decodes, less what the experts' reads at the calibrated speeds explain, per
      block: the scheduler's two graph splits, the copies of a block's input and routing to the
      CPU and of the result back, with every wake-up and round trip between them (on ggml-rpc,
      every split graph is sent again, as no two in a row are the same)."""
    from . import arch as names
    from .demo import DEMO_MODEL
    from .inventory import read_inventory
    from .plan import HOST_BUFFER_TYPE, Placement

    weights = Weights.from_inventory(read_inventory(DEMO_MODEL))
    blocks = sorted(weights.expert)
    resident = Placement(devices=(acc.name,), n_gpu_layers=-1)
    on_host = Placement(devices=(acc.name,), overrides=((names.expert_pattern(None), HOST_BUFFER_TYPE),), n_gpu_layers=-1)
    resident_seconds, on_host_seconds = _demo_decode_seconds([resident, on_host], threads)
    gap = on_host_seconds - resident_seconds
    experts = sum(weights.used_seconds(i, cpu, "decode") - weights.used_seconds(i, acc, "decode") for i in blocks)
    explained = sum(token_seconds(weights, Layout(), cpu, replace(acc, op_seconds=0.0), "decode").values())
    op = max(resident_seconds - explained, 0.0) / max(weights.graph_nodes, 1)
    return op, max(gap - experts, 0.0) / len(blocks)


def _demo_decode_seconds(placements: list, threads: int) -> list[float]:
    """Median seconds per decoded token of the built-in demo model loaded each of the `placements`
    ways, all loaded at once and their runs taken in turn, so that a machine growing busier or
    quieter meanwhile moves every median alike (their differences are what calibration keeps)."""
    from contextlib import ExitStack

    from .demo import DEMO_MODEL
    from .engine import Engine

    with ExitStack() as stack:
        engines = [stack.enter_context(Engine.load(DEMO_MODEL, placement, n_ctx=4 * DEMO_TOKENS, n_threads=threads))
                   for placement in placements]
        prompt = engines[0].tokenize("The list type", add_special=True)
        seconds: list[list[float]] = [[] for _ in engines]
        for run in range(DEMO_RUNS + 1):  # the first: a warm-up
            for engine, timed in zip(engines, seconds):
                stats = None
                for event in engine.generate(prompt, max_tokens=DEMO_TOKENS):
                    stats = event.stats
                if run:
                    timed.append(1.0 / stats.decode_tps)
    return [statistics.median(timed) for timed in seconds]


def plan_speeds(inv, accelerator_name: str | None, threads: int, *, refresh: bool = False,
                on_step: Callable[[str], None] | None = None) -> tuple[PlanSpeeds, Calibration]:
    """What the planner predicts `inv`'s speed from: this machine's calibration for the model's
    weight types (measured the first time, or again with `refresh`), with published figures of a
    laptop GPU (`REFERENCE_GPU`) for an accelerator that is not on this machine."""
    types = {t.type_name: t.ggml_type for t in inv.tensors}
    cal = calibrate(types, inv.n_embd, threads, accelerator_name, refresh=refresh, on_step=on_step,
                    expert_shape=(inv.n_ff_exp or 512, inv.n_expert_used or 8))
    where = f"CPU at {threads} thread{'s' if threads > 1 else ''}"
    if cal.accelerator is not None:
        source = f"calibrated: {where}, {cal.accelerator.name}"
    else:
        source = f"calibrated: {where}; {REFERENCE_GPU.name} for the GPU"
    return PlanSpeeds(Weights.from_inventory(inv), cal.cpu, cal.accelerator or REFERENCE_GPU, source), cal


def device_plan_speeds(inv, accelerator_names: list[str], threads: int, *, refresh: bool = False,
                       on_step: Callable[[str], None] | None = None) -> tuple[PlanSpeeds, list[Calibration]]:
    """`plan_speeds` for a plan over several accelerators: each one calibrated (each its own file),
    their speeds by name in `PlanSpeeds.devices`, the first as the accelerator."""
    found = [plan_speeds(inv, name, threads, refresh=refresh, on_step=on_step) for name in accelerator_names]
    devices = {name: speeds.accelerator for name, (speeds, _) in zip(accelerator_names, found)}
    where = f"CPU at {threads} thread{'s' if threads > 1 else ''}"
    first = found[0][0]
    return (replace(first, devices=devices, source=f"calibrated: {where}, {', '.join(accelerator_names)}"),
            [calibration for _, calibration in found])
