"""Split compute measured on the CPU: a qwen35moe with Qwen3.6's expert widths
(make_test_model --bench-dims: n_embd 2048, 256 experts, top-8, FFN 512, Q4_K), its experts in
host memory and everything else on a ggml-rpc device, decoded at several slot counts per block.

Per decoded token it prints: the share of expert computations on the accelerator (the cache's
hits), the expert computations the CPU worker ran (the misses) and its time on them, the time the
graph waited for it, the hot path's own time (the callbacks' reads, remaps and writes), the bytes
admitted into slots, and decode speed. The CPU work should fall in proportion to the misses: the
last column, CPU time per missed expert, should stay flat. Slots 0 is the all-CPU reference (every
expert a miss). Over ggml-rpc every read and write is a loopback round trip, so the hot path costs
far more here than on a GPU, and the "accelerator" is this machine's CPU too: decode t/s here says
nothing of a GPU's (tools/predict_split.py does).

    python tools/bench_split.py [--layers 40] [--tokens 32] [--slots 0,16,32,64,128,255] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic_models import BENCH_EXPERTS, BENCH_USED, make_bench_model  # noqa: E402
from rotary_gguf import native  # noqa: E402
from rotary_gguf.arch import expert_pattern  # noqa: E402
from rotary_gguf.engine import Engine  # noqa: E402
from rotary_gguf.experts.cache import ExpertCache  # noqa: E402
from rotary_gguf.plan import Placement  # noqa: E402

PROMPT = "The river bends twice before it reaches the sea, and"


def start_rpc(port: int) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "rotary_gguf.cli", "rpc-device", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            native.probe_rpc(f"127.0.0.1:{port}", timeout=1)
            return server
        except native.UserError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise SystemExit("the ggml-rpc server did not start")
            time.sleep(0.2)


def measure(path: Path, placement: Placement, rpc, slots: int, tokens: int, threads: int, layers: int) -> dict:
    """Decode `tokens` tokens after a warm-up with `slots` split slots per block."""
    cache = ExpertCache(layers, BENCH_EXPERTS, BENCH_USED, slots, rpc.buffer_type, split=True, n_threads=threads)
    with Engine.load(path, placement, n_ctx=512, n_threads=threads, expert_cache=cache) as engine:
        token = engine.greedy(engine.tokenize(PROMPT), 8)[-1]  # warm-up: the slots fill
        before = cache.snapshot()
        t0 = time.perf_counter()
        for _ in range(tokens):
            engine.eval([token])
            token = int(engine.logits().argmax())
        seconds = (time.perf_counter() - t0) / tokens
        after = cache.snapshot()
    per_token = {k: (after[k] - before[k]) / tokens
                 for k in ("hits", "misses", "cpu_seconds", "cpu_wait_seconds", "hot_seconds", "uploaded_bytes")}
    misses = per_token["misses"]
    return {
        "slots": slots,
        "accelerator_share": per_token["hits"] / (per_token["hits"] + misses),
        "cpu_experts_per_token": misses,
        "cpu_ms_per_token": per_token["cpu_seconds"] * 1e3,
        "cpu_wait_ms_per_token": per_token["cpu_wait_seconds"] * 1e3,
        "hot_path_ms_per_token": per_token["hot_seconds"] * 1e3,
        "uploaded_mib_per_token": per_token["uploaded_bytes"] / 2**20,
        "cpu_ms_per_missed_expert": per_token["cpu_seconds"] * 1e3 / misses if misses else None,
        "decode_tps": 1 / seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=40, help="blocks of the model (40 like Qwen3.6; each ~450 MiB)")
    ap.add_argument("--tokens", type=int, default=32, help="timed tokens per slot count")
    ap.add_argument("--slots", default="0,16,32,64,128,255", help="slot counts per block (comma-separated)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skew", type=float, default=1.0, help="router skew of the test model (0 uniform .. 2 peaked)")
    ap.add_argument("--model", type=Path, help="a --bench-dims model to reuse (default: write one to a temp folder)")
    ap.add_argument("--port", type=int, default=50621)
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args()
    slot_counts = [int(s) for s in args.slots.split(",")]
    with tempfile.TemporaryDirectory() as folder:
        path = args.model
        if path is None:
            print(f"writing a {args.layers}-block bench-dims model...", file=sys.stderr)
            path = make_bench_model(Path(folder) / "bench.gguf", layers=args.layers, router_skew=args.skew)
        server = start_rpc(args.port)
        try:
            rpc = native.add_rpc_device(f"127.0.0.1:{args.port}")
            placement = Placement(devices=(rpc.name,), n_gpu_layers=-1, overrides=((expert_pattern(), "CPU"),),
                                  repack=False)
            rows = []
            for slots in slot_counts:
                rows.append(measure(path, placement, rpc, slots, args.tokens, args.threads, args.layers))
                print(f"slots {slots}: done", file=sys.stderr)
        finally:
            server.terminate()
            server.wait()
    reference = next((r for r in rows if r["slots"] == 0), rows[0])
    print(f"{args.layers}-block qwen35moe at Qwen3.6's expert widths (Q4_K), router skew {args.skew}, "
          f"{args.tokens} decoded tokens per row, {args.threads} CPU threads, experts on the host, the rest on ggml-rpc")
    head = ("slots", "on accel", "CPU experts/tok", "CPU ms/tok", "vs slots 0", "1 - share", "waited ms/tok",
            "hot path ms/tok", "uploads MiB/tok", "CPU ms/expert", "decode t/s")
    print(" | ".join(head))
    for r in rows:
        print(" | ".join([
            f"{r['slots']}", f"{r['accelerator_share']:.1%}", f"{r['cpu_experts_per_token']:.1f}",
            f"{r['cpu_ms_per_token']:.2f}", f"{r['cpu_ms_per_token'] / reference['cpu_ms_per_token']:.2f}",
            f"{1 - r['accelerator_share']:.2f}", f"{r['cpu_wait_ms_per_token']:.2f}", f"{r['hot_path_ms_per_token']:.2f}",
            f"{r['uploaded_mib_per_token']:.1f}",
            "-" if r["cpu_ms_per_missed_expert"] is None else f"{r['cpu_ms_per_missed_expert']:.3f}",
            f"{r['decode_tps']:.2f}",
        ]))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
