#!/usr/bin/env python3
"""What routing telemetry and the dashboard cost: decode speed side by side, in one run.

Variants, each its own context on the same model, measured in interleaved rounds (median):
  off        no eval callback
  python     a plain Python eval callback (ctypes), asked about every graph node
  native     the native tap (csrc/moe_tap.c), counting every token
  native-idle  the native tap installed but disabled (answers no to every node: no graph splits)
  dashboard  the native tap plus the dashboard redrawing in a rich Live at 80x24 (dash-160x48: larger)

Decode speed is shown as the engine reports it (wall time) and as CPU time of this process per
decoded token (one thread: robust against other load on the machine). Also prints the callback
calls per token, the cost per call of the Python callback, and the CPU time one dashboard refresh
(a reading and a drawing, at 80x24 and 160x48) takes.

Usage: bench_telemetry.py [--model PATH] [--tokens N] [--rounds R] [--threads T] [--layers L ...]
                          [--device CUDA0]
(without --model a synthetic test model with --layers blocks is generated). On a GPU, --device
puts the whole model there: an eval callback also splits the GPU graph at each MoE block.
"""

from __future__ import annotations

import argparse
import ctypes
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synthetic_models import make_model  # noqa: E402

from rotary_gguf import native  # noqa: E402
from rotary_gguf.dashboard import SAMPLE_SECONDS, Dashboard  # noqa: E402
from rotary_gguf.engine import Engine  # noqa: E402
from rotary_gguf.plan import Placement  # noqa: E402
from rotary_gguf.telemetry import RoutingTelemetry  # noqa: E402

PROMPT = "The quick brown fox jumps over the lazy dog. " * 4
NAME_OFFSET = native.GgmlTensor.name.offset
TOPK = b"ffn_moe_topk-"


class PythonTap:
    """The naive design: a Python eval callback that counts selections with numpy."""

    def __init__(self, n_layer: int, n_expert: int):
        self.counts = np.zeros((n_layer, n_expert), dtype=np.int64)
        self.calls = 0
        self.callback = native.EvalCallback(self._eval)
        self.user_data = None

    def _eval(self, tensor: int, ask: bool, _user_data) -> bool:
        self.calls += 1
        if ask:
            return ctypes.string_at(tensor + NAME_OFFSET, len(TOPK)) == TOPK
        t = native.GgmlTensor.from_address(tensor)
        n_used, n_tokens, row = t.ne[0], t.ne[1], t.nb[1] // 4
        data = np.frombuffer(native.tensor_bytes(tensor), dtype=np.int32)
        ids = np.lib.stride_tricks.as_strided(data, shape=(n_tokens, n_used), strides=(row * 4, 4))
        np.add.at(self.counts[int(t.name[len(TOPK):])], ids.ravel(), 1)
        return True


def decode(engine: Engine, prompt: list[int], tokens: int) -> tuple[float, float]:
    """(decode t/s as the engine reports it, CPU seconds of this process per decoded token)."""
    stats, cpu_start = None, None
    for event in engine.generate(prompt, max_tokens=tokens):
        stats = event.stats
        if cpu_start is None:
            cpu_start = time.process_time()
    cpu = time.process_time() - cpu_start
    return stats.decode_tps, cpu / max(stats.completion_tokens - 1, 1)


def dashboard_refresh_ms(engine: Engine, telemetry: RoutingTelemetry, width: int, height: int, n: int = 40) -> float:
    console = Console(width=width, height=height, file=io.StringIO(), force_terminal=True, color_system="truecolor")
    dashboard = Dashboard(engine, telemetry=telemetry, serving=True)
    start = time.process_time()
    for _ in range(n):
        dashboard.sample()
        console.print(dashboard)
    return (time.process_time() - start) / n * 1e3


def bench(model: Path, tokens: int, rounds: int, threads: int, device: str | None) -> None:
    telemetry = RoutingTelemetry.for_model(model)
    inv = telemetry.inventory
    idle = RoutingTelemetry(inv)
    idle.enabled = False
    python_tap = PythonTap(inv.n_layer, inv.n_expert)
    shown, shown_large = RoutingTelemetry(inv), RoutingTelemetry(inv)
    placement = Placement(devices=(device,), n_gpu_layers=-1) if device else None
    load = dict(placement=placement, n_ctx=len(PROMPT) + tokens + 64, n_threads=threads)
    engines = {
        "off": Engine.load(model, **load),
        "python": Engine.load(model, telemetry=python_tap, **load),
        "native": Engine.load(model, telemetry=telemetry, **load),
        "native-idle": Engine.load(model, telemetry=idle, **load),
        "dashboard": Engine.load(model, telemetry=shown, **load),
        "dash-160x48": Engine.load(model, telemetry=shown_large, **load),
    }
    prompt = engines["off"].tokenize(PROMPT)
    for engine in engines.values():
        decode(engine, prompt, 8)  # warm up
    python_tap.calls = 0
    decode(engines["python"], prompt, 1)
    calls_prompt = python_tap.calls
    python_tap.calls = 0
    decode(engines["python"], prompt, tokens)
    calls_per_token = (python_tap.calls - calls_prompt) / max(tokens - 1, 1)

    tps: dict[str, list[float]] = {name: [] for name in engines}
    cpu: dict[str, list[float]] = {name: [] for name in engines}
    sinks = {
        "dashboard": (shown, Console(file=io.StringIO(), width=80, height=24, force_terminal=True, color_system="truecolor")),
        "dash-160x48": (shown_large, Console(file=io.StringIO(), width=160, height=48, force_terminal=True, color_system="truecolor")),
    }
    for _ in range(rounds):
        for name, engine in engines.items():
            if name in sinks:
                telemetry_shown, sink = sinks[name]
                with Dashboard(engine, telemetry=telemetry_shown, serving=True).live(sink):
                    result = decode(engine, prompt, tokens)
            else:
                result = decode(engine, prompt, tokens)
            tps[name].append(result[0])
            cpu[name].append(result[1])
    tps_med = {name: statistics.median(v) for name, v in tps.items()}
    cpu_med = {name: statistics.median(v) for name, v in cpu.items()}

    print(f"model {model.name}: {inv.arch}, {inv.n_layer} blocks, {inv.n_expert} experts (top {inv.n_expert_used}); "
          f"{tokens} tokens x {rounds} rounds, {threads} threads, on {device or 'the CPU'}")
    print(f"eval callback calls per decoded token: {calls_per_token:.0f} "
          f"({calls_per_token / max(len(telemetry.layers), 1):.0f} per MoE block)")
    print("decode t/s is wall time (noisy on a busy machine); CPU us/token counts this process's CPU time,")
    print("the dashboard's drawing thread included: its ratio to 'off' is the cost that does not depend on load")
    print(f"{'variant':<12} {'decode t/s':>11} {'vs off':>7} {'CPU us/token':>13} {'vs off':>7}")
    for name in engines:
        print(f"{name:<12} {tps_med[name]:>11.1f} {tps_med[name] / tps_med['off']:>7.3f} "
              f"{cpu_med[name] * 1e6:>13.1f} {cpu_med['off'] / cpu_med[name]:>7.3f}")
    python_extra = cpu_med["python"] - cpu_med["native-idle"]
    print(f"python callback: {python_extra / calls_per_token * 1e6:.2f} us of CPU per call more than the native one")
    for width, height in ((80, 24), (160, 48)):
        ms = dashboard_refresh_ms(engines["native"], telemetry, width, height)
        print(f"dashboard reading + drawing at {width}x{height}: {ms:.2f} ms "
              f"({ms / 1e3 / SAMPLE_SECONDS:.1%} of one core at one drawing per {SAMPLE_SECONDS} s)")
    for engine in engines.values():
        engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers", type=int, nargs="*", default=[4, 40])
    parser.add_argument("--device", help="run the whole model on this ggml device (e.g. CUDA0) instead of the CPU")
    args = parser.parse_args()
    if args.model:
        bench(args.model, args.tokens, args.rounds, args.threads, args.device)
        return
    with tempfile.TemporaryDirectory() as folder:
        for layers in args.layers:
            model = make_model(Path(folder) / f"bench-{layers}.gguf", layers=layers)
            bench(model, args.tokens, args.rounds, args.threads, args.device)
            print()


if __name__ == "__main__":
    main()
