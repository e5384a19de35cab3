"""Predict expert-cache hit rates per policy and slot count from recorded routing traces.

Records the experts every block selects while the model generates after a set of prompts (one
step per block and decode call: the prompt batch, then each decoded token), then replays the
trace through each policy for each slot count. The profile-seeded policy gets its prior from a
separate recording over other prompts, so it is not scored on what it was seeded with.

    python tools/simulate_cache.py MODEL [--tokens 64] [--slots 4,8,16] [--save-trace out.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rotary_gguf.engine import Engine  # noqa: E402
from rotary_gguf.experts.cache import TraceRecorder  # noqa: E402
from rotary_gguf.experts.policies import POLICIES, Trace, replay, total  # noqa: E402
from rotary_gguf.inventory import read_inventory  # noqa: E402
from rotary_gguf.telemetry import BUILTIN_PROMPTS  # noqa: E402


def record(model: Path, prompts: list[str], tokens: int, n_batch: int) -> Trace:
    """Greedy generation of `tokens` tokens after each prompt, in a fresh context each time."""
    inv = read_inventory(model)
    recorder = TraceRecorder(inv.n_expert, inv.n_expert_used)
    with Engine.load(model, n_ctx=1024, n_batch=n_batch, telemetry=recorder) as engine:
        for text in prompts:
            engine.reset()
            engine.greedy(engine.tokenize(text), tokens)
    return recorder.trace


def table(trace: Trace, prior_trace: Trace, slot_counts: list[int]) -> list[dict]:
    prior = prior_trace.counts()
    rows = []
    for slots in slot_counts:
        for policy in (*POLICIES, "belady"):
            stats = total(replay(trace, policy, slots, prior=prior))
            rows.append({"slots": slots, "policy": policy, "hit_rate": stats.hit_rate, "uploads": stats.misses,
                         "fallback_steps": stats.fallback_steps, "steps": stats.steps})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--tokens", type=int, default=64, help="tokens generated after each prompt")
    ap.add_argument("--slots", default="", help="comma-separated slot counts (default: used .. n_expert)")
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--save-trace", type=Path)
    args = ap.parse_args()

    inv = read_inventory(args.model)
    seed_prompts = list(BUILTIN_PROMPTS[0::2])  # prose, code, math, dialogue: one of each pair
    eval_prompts = list(BUILTIN_PROMPTS[1::2])
    prior_trace = record(args.model, seed_prompts, args.tokens, args.n_batch)
    trace = record(args.model, eval_prompts, args.tokens, args.n_batch)
    if args.save_trace:
        trace.save(args.save_trace)
    used, n = inv.n_expert_used, inv.n_expert
    slot_counts = [int(s) for s in args.slots.split(",")] if args.slots else sorted({used, 2 * used, n // 4, n // 2, 3 * n // 4, n} - {0})
    print(f"{args.model.name}: {inv.arch}, {len(trace.steps)} MoE blocks, {n} experts, {used} used; "
          f"{args.tokens} tokens after each of {len(eval_prompts)} prompts")
    print(f"{'slots':>5} {'policy':<12} {'hit rate':>8} {'uploads':>8} {'fallback':>8} {'steps':>6}")
    for row in table(trace, prior_trace, [s for s in slot_counts if used <= s <= n]):
        print(f"{row['slots']:>5} {row['policy']:<12} {row['hit_rate']:>8.1%} {row['uploads']:>8} "
              f"{row['fallback_steps']:>8} {row['steps']:>6}")


if __name__ == "__main__":
    main()
