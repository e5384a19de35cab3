"""The speed model against measurement on ggml-rpc: `rotary-gguf bench --calibrate --json` on
test models of two shapes at three budgets (every expert in host memory, about half of the blocks
resident, every block resident), and at the half budget once more with an expert cache of a
quarter of the experts per host block (split compute, and the same slots uploading every miss),
its hit rates from the model's routing profile (`rotary-gguf profile`, made once); each
candidate's predicted decode and prompt t/s beside what bench measured, and how many are within
the target (20% of the measured speed).

Shapes, built once into --work-dir:
- mid: qwen3moe, 8 blocks, n_embd 1024, 64 experts of FFN 512, top-8, Q4_K_M (482 MiB): larger
  than this machine's caches, so decode reads its weights from memory, as a real model's do;
- bench-dims: qwen35moe with Qwen3.6's expert widths (n_embd 2048, 256 experts of FFN 512, top-8,
  Q4_K), 4 blocks (1.9 GiB).

A ggml-rpc server on this machine is the accelerator (its own CPU thread, `--rpc-threads`). Runs
are interleaved by bench; on a shared machine the spread column says how far to trust them.

    python tools/bench_predictions.py [--shapes mid,bench-dims] [--runs 3] [--tokens 48] [--threads 1] [--no-cache]
                                      [--json]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic_models import make_bench_model, make_model  # noqa: E402
from rotary_gguf import native  # noqa: E402
from rotary_gguf.inventory import read_inventory  # noqa: E402

CLI = [sys.executable, "-m", "rotary_gguf.cli"]
TARGET = 0.20
SHAPES = {
    "mid": lambda path: make_model(path, arch="qwen3moe", quant="q4_k_m", layers=8, embd=1024, ff=512, experts=64,
                                   used=8, router_skew=1.0),
    "bench-dims": lambda path: make_bench_model(path, layers=4),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_rpc(threads: int) -> tuple[subprocess.Popen, str]:
    endpoint = f"127.0.0.1:{free_port()}"
    server = subprocess.Popen([*CLI, "rpc-device", "--port", endpoint.rsplit(":", 1)[1], "--threads", str(threads)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            native.probe_rpc(endpoint, timeout=1)
            return server, endpoint
        except native.UserError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise SystemExit("the ggml-rpc server did not start")
            time.sleep(0.2)


def run_cli(*args: str) -> str:
    """`rotary-gguf ARGS`'s output; its last error line, and a stop, when it fails."""
    done = subprocess.run([*CLI, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"rotary-gguf {' '.join(args[:2])} failed: {done.stderr.strip().splitlines()[-1:]}")
    return done.stdout


def cli_json(*args: str) -> dict:
    return json.loads(run_cli(*args, "--json"))


def budgets(path: Path, endpoint: str, ctx: int) -> dict[str, int]:
    """Every expert on the host, about half of the blocks resident, every block resident (bytes)."""
    plan = cli_json("plan", str(path), "--rpc", endpoint, "--vram", "1TiB", "--ctx", str(ctx), "--expert-cache", "off")
    experts = sorted(layer["expert_bytes"] for layer in plan["layers"] if layer["expert_bytes"])
    least = plan["minimum_budget"]
    return {"host": least, "half": least + sum(experts[len(experts) // 2:]), "resident": least + sum(experts) + 2**20}


def routing_profile(path: Path) -> Path:
    """The model's routing profile (the built-in prompts, 32 tokens after each), made once beside it."""
    profile = path.with_name(path.stem + "-profile.json")
    if not profile.exists():
        print(f"profiling {path.name} ...", file=sys.stderr)
        run_cli("profile", str(path), "-o", str(profile), "--tokens", "32", "--ctx", "1024")
    return profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="mid,bench-dims", help="comma-separated: " + ", ".join(SHAPES))
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "rotary-gguf-bench")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=48, help="generated tokens per run")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of the engine")
    parser.add_argument("--rpc-threads", type=int, default=1, help="CPU threads of the ggml-rpc device")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--no-cache", dest="cache", action="store_false",
                        help="skip the run with an expert cache (and the routing profile it needs)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    unknown = set(args.shapes.split(",")) - set(SHAPES)
    if unknown:
        raise SystemExit(f"unknown shape {sorted(unknown)[0]!r} (known: {', '.join(SHAPES)})")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    server, endpoint = start_rpc(args.rpc_threads)
    rows = []
    try:
        for shape in args.shapes.split(","):
            path = args.work_dir / f"predictions-{shape}.gguf"
            if not path.exists():
                print(f"building the {shape} model ...", file=sys.stderr)
                SHAPES[shape](path)
            sizes = budgets(path, endpoint, args.ctx)
            runs = [(name, budget, ["--expert-cache", "off"]) for name, budget in sizes.items()]
            if args.cache:
                slots = max(1, read_inventory(path).n_expert // 4)
                runs.append(("half", sizes["half"], ["--expert-cache", str(slots), "--profile", str(routing_profile(path))]))
            for budget_name, budget, cache in runs:
                print(f"{shape}, budget {budget_name} ({budget / 2**20:.0f} MiB), {' '.join(cache)}: bench ...",
                      file=sys.stderr)
                doc = cli_json("bench", str(path), "--rpc", endpoint, "--vram", f"{budget}B", "--ctx", str(args.ctx),
                               *cache, "--threads", str(args.threads), "--runs", str(args.runs),
                               "--prompt-tokens", "64", "--gen-tokens", str(args.tokens), "--calibrate")
                for cand in doc["candidates"]:
                    figures, predicted = cand["figures"], cand["predicted"]
                    rows.append({"shape": shape, "budget": budget_name, "candidate": cand["name"],
                                 "decode_tps": figures["decode_tps"]["median"],
                                 "decode_spread": figures["decode_tps"]["spread"] / figures["decode_tps"]["median"],
                                 "predicted_decode_tps": predicted["decode_tps"],
                                 "prompt_tps": figures["prompt_tps"]["median"],
                                 "predicted_prompt_tps": predicted["prompt_tps"],
                                 "predicted_decode_ms": predicted["decode_ms"]})
    finally:
        server.kill()
    firsts = {(r["shape"], r["candidate"]): r for r in reversed(rows)}  # a placement every budget has: its first run
    rows = [r for r in rows if firsts[(r["shape"], r["candidate"])] is r]
    for r in rows:
        r["error"] = r["predicted_decode_tps"] / r["decode_tps"] - 1
        r["prompt_error"] = r["predicted_prompt_tps"] / r["prompt_tps"] - 1
    within = sum(abs(r["error"]) <= TARGET for r in rows)
    prompts_within = sum(abs(r["prompt_error"]) <= TARGET for r in rows)
    if args.json:
        print(json.dumps({"rows": rows, "within_target": within, "prompts_within_target": prompts_within,
                          "target": TARGET}, indent=2))
        return
    print(f"{'shape':11} {'budget':9} {'candidate':30} {'decode t/s':>14} {'predicted':>10} {'error':>7} "
          f"{'prompt t/s':>10} {'predicted':>10} {'error':>7}")
    for r in rows:
        print(f"{r['shape']:11} {r['budget']:9} {r['candidate']:30} {r['decode_tps']:8.1f} ±{r['decode_spread']:3.0%} "
              f"{r['predicted_decode_tps']:10.1f} {r['error']:+7.0%} {r['prompt_tps']:10.1f} {r['predicted_prompt_tps']:10.1f}"
              f" {r['prompt_error']:+7.0%}")
    print(f"within {TARGET:.0%} of the prediction: decode {within} of {len(rows)}, prompt {prompts_within} of {len(rows)}")


if __name__ == "__main__":
    main()
