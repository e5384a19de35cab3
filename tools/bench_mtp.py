"""Multi-token-prediction drafts measured: decode speed with and without `--draft mtp` on a qwen35moe
with Qwen3.6's expert widths (make_test_model --bench-dims: n_embd 2048, 256 experts, top-8, FFN
512, Q4_K) and an MTP block, its experts in host memory: on the CPU alone, and (with --rpc) with
everything else on a ggml-rpc device serving this machine's CPU.

The test model's MTP head is the "mirror" kind (it drafts what the trunk predicts from the last
token alone), not a trained head: its acceptance rate is set by how much the trunk adds to that
(`--trunk-gain`: 1 gives a random model's trunk and under a tenth of the drafts accepted; 0.1,
the default, about half at 8 blocks), so the figures show the cost of a draft round against the
tokens it wins at that acceptance. Settings take turns, one generation each per round, and each
reports the median of its rounds. The last column is how many leading greedy tokens equal the run
without drafts: all of them on batch-invariant kernels; on this model's f16/Q4_K CPU kernels a batch of tokens rounds differently from the same
tokens one at a time, which can flip a near tie (see README, MTP drafts).

    python tools/bench_mtp.py [--layers 8] [--trunk-gain 0.1] [--tokens 64] [--runs 3] [--draft-max 1,2,3] [--rpc] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_split import PROMPT, start_rpc  # noqa: E402
from make_test_model import make_bench_model  # noqa: E402
from rotary_gguf import native  # noqa: E402
from rotary_gguf.arch import expert_pattern  # noqa: E402
from rotary_gguf.engine import Engine  # noqa: E402
from rotary_gguf.plan import Placement  # noqa: E402


def measure(path: Path, placement: Placement, tokens: int, threads: int, draft_max: int | None) -> dict:
    """Decode t/s of one generation of `tokens` greedy tokens after a warm-up; drafts of at most
    `draft_max` tokens (None: no drafts)."""
    draft = dict(draft="mtp", draft_max=draft_max) if draft_max else {}
    with Engine.load(path, placement, n_ctx=512, n_threads=threads, **draft) as engine:
        prompt = engine.tokenize(PROMPT)
        engine.greedy(prompt, 4)  # warm-up: pages the weights in
        engine.reset()
        events = list(engine.generate(prompt, max_tokens=tokens))
    stats = events[-1].stats
    return {
        "draft_max": draft_max or 0,
        "decode_tps": stats.decode_tps,
        "acceptance": stats.draft_accepted / stats.drafted_tokens if stats.drafted_tokens else None,
        "mean_accepted": stats.mean_accepted,
        "tokens": [e.token for e in events if e.token is not None],
    }


def summarize(runs: list[dict]) -> dict:
    """The median speed of interleaved runs of one setting, with its acceptance (the same every run)."""
    return {**runs[0], "decode_tps": statistics.median(r["decode_tps"] for r in runs)}


def format_row(r: dict) -> str:
    accepted = f"{r['acceptance']:.0%}" if r["acceptance"] is not None else "-"
    return (f"{r['placement']:24} {r['draft_max'] or 'off':>6} {r['decode_tps']:>11.2f} {r['speedup']:>7.2f}x "
            f"{accepted:>9} {r['mean_accepted']:>10.2f} {r['same_tokens']:>12}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8, help="trunk blocks of the bench model (plus its MTP block)")
    ap.add_argument("--trunk-gain", type=float, default=0.1,
                    help="how much the trunk's blocks write (make_test_model --trunk-gain): sets the acceptance rate")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per generation")
    ap.add_argument("--runs", type=int, default=3, help="timed generations per setting, interleaved (median)")
    ap.add_argument("--draft-max", default="1,2,3", help="draft lengths to measure, comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rpc", action="store_true", help="also measure with everything but the experts on a ggml-rpc device")
    ap.add_argument("--port", type=int, default=50157, help="port of the ggml-rpc server --rpc starts")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    folder = Path(tempfile.gettempdir()) / "rotary-gguf-bench"
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
    rows, identical = [], True
    if not args.json:
        print(f"{path.name}: {args.tokens} tokens, median of {args.runs} runs, {args.threads} threads")
        print(f"{'placement':24} {'draft':>6} {'decode t/s':>11} {'speedup':>8} {'accepted':>9} {'per round':>10} "
              f"{'same tokens':>12}",
              flush=True)
    try:
        drafts = [None, *(int(n) for n in args.draft_max.split(","))]
        for name, placement in placements.items():
            # interleaved: every setting once per round, so drift on a busy machine hits them alike
            runs = [[measure(path, placement, args.tokens, args.threads, d) for d in drafts] for _ in range(args.runs)]
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
