"""Multi-token-prediction drafts measured: decode speed with and without `--draft mtp` on a qwen35moe
with Qwen3.6's expert widths (make_test_model --bench-dims: n_embd 2048, 256 experts, top-8, FFN
512, Q4_K) and an MTP block, its experts in host memory: on the CPU alone, and (with --rpc) with
everything else on a ggml-rpc device serving this machine's CPU, or (with --device) on a GPU.

The test model's MTP head is the "mirror" kind (it drafts what the trunk predicts from the last
token alone), not a trained head: its acceptance rate is set by how much the trunk adds to that
(`--trunk-gain`: 1 gives a random model's trunk and under a tenth of the drafts accepted; 0.1,
the default, about half at 8 blocks), so the figures show the cost of a draft round against the
tokens it wins at that acceptance. Settings take turns, one generation each per round, and each
reports the median of its rounds. The last column is how many leading greedy tokens equal the run
without drafts: all of them on batch-invariant kernels; on this model's f16/Q4_K CPU kernels a batch of tokens rounds differently from the same
tokens one at a time, which can flip a near tie (see README, MTP drafts).

`--model small` measures a demo-sized qwen35moe instead (Q4_K_M, n_embd 256, 32 experts, top-4,
FFN 128, 4 blocks: the whole model fits the CPU's caches). `--breakdown` adds where a drafting
run's time goes: the mean milliseconds of a target batch by its size (1 token, or a token and its
drafts) and of one step of the MTP head.

    python tools/bench_mtp.py [--model bench|small] [--layers 8] [--trunk-gain 0.1] [--tokens 64] [--runs 3]
                              [--draft-max 1,2,3] [--rpc] [--device CUDA0] [--breakdown] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_split import PROMPT, start_rpc  # noqa: E402
from synthetic_models import make_bench_model, make_model  # noqa: E402
from rotary_gguf import native  # noqa: E402
from rotary_gguf.arch import expert_pattern  # noqa: E402
from rotary_gguf.engine import Engine  # noqa: E402
from rotary_gguf.plan import Placement  # noqa: E402


class Timings:
    """Milliseconds of each target batch (by its size) and of each MTP head step, measured around
    the engine's own calls (this tool's instrument, not the engine's)."""

    def __init__(self, engine: Engine):
        self.batches: dict[int, list[float]] = defaultdict(list)
        self.head: list[float] = []
        eval_ = engine.eval

        def timed_eval(tokens, every_row=False):
            t0 = time.perf_counter()
            eval_(tokens, every_row)
            self.batches[len(tokens)].append((time.perf_counter() - t0) * 1e3)

        def timed_draft(token, pos, n):
            t0 = time.perf_counter()
            out = draft(token, pos, n)
            self.head.append((time.perf_counter() - t0) * 1e3 / max(n, 1))
            return out

        engine.eval = timed_eval
        if engine.drafter is not None:
            draft = engine.drafter.draft
            engine.drafter.draft = timed_draft

    def to_json(self) -> dict:
        return {"batch_ms": {str(n): statistics.mean(v) for n, v in sorted(self.batches.items()) if n <= 16},
                "batches": {str(n): len(v) for n, v in sorted(self.batches.items()) if n <= 16},
                "head_step_ms": statistics.mean(self.head) if self.head else None}


def measure(path: Path, placement: Placement, tokens: int, threads: int, draft_max: int | None,
            breakdown: bool = False) -> dict:
    """Decode t/s of one generation of `tokens` greedy tokens after a warm-up; drafts of at most
    `draft_max` tokens (None: no drafts); with `breakdown`, where a drafting run's time went."""
    draft = dict(draft="mtp", draft_max=draft_max) if draft_max else {}
    timings = None
    with Engine.load(path, placement, n_ctx=512, n_threads=threads, **draft) as engine:
        prompt = engine.tokenize(PROMPT)
        engine.greedy(prompt, 4)  # warm-up: pages the weights in
        engine.reset()
        if breakdown:
            timings = Timings(engine)
        events = list(engine.generate(prompt, max_tokens=tokens))
    stats = events[-1].stats
    return {
        "timings": timings.to_json() if timings else None,
        "draft_max": draft_max or 0,
        "decode_tps": stats.decode_tps,
        "acceptance": stats.draft_accepted / stats.drafted_tokens if stats.drafted_tokens else None,
        "mean_accepted": stats.mean_accepted,
        "tokens": [e.token for e in events if e.token is not None],
    }


def summarize(runs: list[dict]) -> dict:
    """The median speed of interleaved runs of one setting, with its acceptance (the same every run)."""
    return {**runs[0], "decode_tps": statistics.median(r["decode_tps"] for r in runs),
            "spread": max(r["decode_tps"] for r in runs) - min(r["decode_tps"] for r in runs)}


def format_row(r: dict) -> str:
    accepted = f"{r['acceptance']:.0%}" if r["acceptance"] is not None else "-"
    line = (f"{r['placement']:24} {r['draft_max'] or 'off':>6} {r['decode_tps']:>11.2f} {r['spread']:>7.2f} "
            f"{r['speedup']:>7.2f}x {accepted:>9} {r['mean_accepted']:>10.2f} {r['same_tokens']:>12}")
    t = r.get("timings")
    if t:
        sizes = ", ".join(f"{n} tok {ms:.1f} ms" for n, ms in t["batch_ms"].items())
        line += f"\n{'':31}target batches: {sizes}; head step {t['head_step_ms'] or 0:.1f} ms"
    return line


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("bench", "small"), default="bench",
                    help="bench: Qwen3.6's expert widths (make_test_model --bench-dims); small: a demo-sized qwen35moe")
    ap.add_argument("--layers", type=int, default=8, help="trunk blocks of the bench model (plus its MTP block)")
    ap.add_argument("--trunk-gain", type=float, default=0.1,
                    help="how much the trunk's blocks write (make_test_model --trunk-gain): sets the acceptance rate")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per generation")
    ap.add_argument("--runs", type=int, default=3, help="timed generations per setting, interleaved (median)")
    ap.add_argument("--draft-max", default="1,2,3", help="draft lengths to measure, comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rpc", action="store_true", help="also measure with everything but the experts on a ggml-rpc device")
    ap.add_argument("--port", type=int, default=50157, help="port of the ggml-rpc server --rpc starts")
    ap.add_argument("--device", action="append", default=[],
                    help="also measure with everything but the experts on this device (e.g. CUDA0); repeatable")
    ap.add_argument("--breakdown", action="store_true", help="time target batches by size and MTP head steps")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    folder = Path(tempfile.gettempdir()) / "rotary-gguf-bench"
    if args.model == "small":
        path = folder / f"small-mtp-{args.layers}-gain{args.trunk_gain:g}.gguf"
        if not path.exists():
            make_model(path, arch="qwen35moe", layers=args.layers, quant="q4_k_m", experts=32, used=4, ff=128,
                       router_skew=1.5, mtp="mirror", trunk_gain=args.trunk_gain)
    else:
        path = folder / f"bench-mtp-{args.layers}-gain{args.trunk_gain:g}.gguf"
        if not path.exists():
            make_bench_model(path, layers=args.layers, mtp="mirror", trunk_gain=args.trunk_gain)
    placements = {"cpu": Placement(repack=False)}
    server = None
    if args.rpc:
        server = start_rpc(args.port)
        rpc = native.add_rpc_device(f"127.0.0.1:{args.port}")
        placements["rpc, experts on host"] = Placement(devices=(rpc.name,), n_gpu_layers=-1,
                                                       overrides=((expert_pattern(), "CPU"),), repack=False)
    for name in args.device:
        try:
            native.device_by_name(name)
        except native.UserError as e:  # a device this build does not have: one line, before any run
            raise SystemExit(str(e)) from None
        placements[f"{name}, experts on host"] = Placement(devices=(name,), n_gpu_layers=-1,
                                                           overrides=((expert_pattern(), "CPU"),), repack=False)
    rows, identical = [], True
    if not args.json:
        print(f"{path.name}: {args.tokens} tokens, median of {args.runs} runs, {args.threads} threads")
        print(f"{'placement':24} {'draft':>6} {'decode t/s':>11} {'spread':>7} {'speedup':>8} {'accepted':>9} "
              f"{'per round':>10} "
              f"{'same tokens':>12}",
              flush=True)
    try:
        drafts = [None, *(int(n) for n in args.draft_max.split(","))]
        for name, placement in placements.items():
            # interleaved: every setting once per round, so drift on a busy machine hits them alike
            runs = [[measure(path, placement, args.tokens, args.threads, d, args.breakdown) for d in drafts]
                    for _ in range(args.runs)]
            base = None
            for i in range(len(drafts)):
                row = {"placement": name, **summarize([r[i] for r in runs])}
                base = base or row
                row["speedup"] = row["decode_tps"] / base["decode_tps"]
                row["same_tokens"] = next((i for i, (a, b) in enumerate(zip(row["tokens"], base["tokens"])) if a != b),
                                          min(len(row["tokens"]), len(base["tokens"])))
                identical &= row["tokens"] == base["tokens"]
                rows.append(row)
                if not args.json:
                    print(format_row(row), flush=True)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
    for row in rows:
        del row["tokens"]
    if args.json:
        print(json.dumps({"model": path.name, "layers": args.layers, "trunk_gain": args.trunk_gain, "rows": rows, "outputs_identical": identical}, indent=2))
    else:
        print("outputs identical to the run without drafts" if identical else "outputs differ (see the last column)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
