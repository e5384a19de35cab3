"""The cost of the expert cache's hot path (its eval callback) per decoded token, on a synthetic
40-block qwen35moe with its experts on the host and everything else on a ggml-rpc device.

Runs the Python hot path with a stopwatch in its callback (graph nodes seen per token, the time
spent answering them and remapping the topk nodes, as a share of a 25 ms token; the budget is
2%), then the native hot path, and prints both per-token times side by side. Over ggml-rpc each
transfer is a loopback round trip, so the remaps cost far more here than on a GPU.

    python tools/bench_expert_cache.py [--tokens 32] [--slots 16]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic_models import make_model  # noqa: E402
from rotary_gguf import native  # noqa: E402
from rotary_gguf.arch import expert_pattern  # noqa: E402
from rotary_gguf.engine import Engine  # noqa: E402
from rotary_gguf.experts.cache import TOPK_PREFIX, ExpertCache  # noqa: E402
from rotary_gguf.plan import Placement  # noqa: E402

TOKEN_BUDGET_S = 0.025


class TimedCache(ExpertCache):
    """The cache with a stopwatch around its callback: time and calls, split by topk or not."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.timing = {"other": [0, 0.0], "topk": [0, 0.0]}

    def _eval(self, tensor, ask, user_data) -> bool:
        t0 = time.perf_counter()
        result = super()._eval(tensor, ask, user_data)
        kind = "topk" if native.GgmlTensor.from_address(tensor).name.startswith(TOPK_PREFIX) else "other"
        entry = self.timing[kind]
        entry[0] += 1
        entry[1] += time.perf_counter() - t0
        return result


def decode(engine: Engine, tokens: int) -> float:
    """Seconds per greedy token after the prompt."""
    engine.reset()
    engine.eval(engine.tokenize("The river bends twice before it reaches the sea, and"))
    token = int(engine.logits().argmax())
    t0 = time.perf_counter()
    for _ in range(tokens):
        engine.eval([token])
        token = int(engine.logits().argmax())
    return (time.perf_counter() - t0) / tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--port", type=int, default=50599)
    args = ap.parse_args()
    n = args.tokens
    with tempfile.TemporaryDirectory() as folder:
        path = make_model(Path(folder) / "q35-40.gguf", arch="qwen35moe", layers=40, experts=64, used=8, router_skew=1.5)
        server = subprocess.Popen([sys.executable, "-m", "rotary_gguf.cli", "rpc-device", "--port", str(args.port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    native.probe_rpc(f"127.0.0.1:{args.port}", timeout=1)
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            rpc = native.add_rpc_device(f"127.0.0.1:{args.port}")
            placement = Placement(devices=(rpc.name,), n_gpu_layers=-1, overrides=((expert_pattern(), "CPU"),), repack=False)
            timed = TimedCache(40, 64, 8, args.slots, rpc.buffer_type, hot_path="python")
            with Engine.load(path, placement, n_ctx=512, n_threads=2, expert_cache=timed) as engine:
                decode(engine, 2)
                timed.timing = {"other": [0, 0.0], "topk": [0, 0.0]}
                python_s = decode(engine, n)
            fast = ExpertCache(40, 64, 8, args.slots, rpc.buffer_type, hot_path="native")
            with Engine.load(path, placement, n_ctx=512, n_threads=2, expert_cache=fast) as engine:
                decode(engine, 2)
                native_s = decode(engine, n)
                snap = fast.snapshot()
        finally:
            server.terminate()
            server.wait()
    other_calls, other_s = timed.timing["other"]
    topk_calls, topk_s = timed.timing["topk"]
    print(f"40-block qwen35moe, 64 experts, 8 used, {args.slots} slots, {n} decoded tokens; "
          f"hit rate {snap['hit_rate']:.1%}")
    print(f"python hot path: {python_s * 1e3:7.2f} ms/token; in its callback: "
          f"{other_calls / n:.0f} other nodes/token at {other_s / max(other_calls, 1) * 1e6:.2f} us = "
          f"{other_s / n * 1e3:.3f} ms/token ({other_s / n / TOKEN_BUDGET_S:.1%} of a 25 ms token), "
          f"{topk_calls / n:.0f} topk calls/token = {topk_s / n * 1e3:.3f} ms/token (remap and uploads)")
    print(f"native hot path: {native_s * 1e3:7.2f} ms/token; saved {(python_s - native_s) * 1e3:.2f} ms/token "
          f"= {(python_s - native_s) / TOKEN_BUDGET_S:.0%} of a 25 ms token")


if __name__ == "__main__":
    main()
