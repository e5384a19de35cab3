#!/usr/bin/env python3
"""Measure prompt reuse on a hybrid model: a multi-turn chat with thinking whose template drops
earlier turns' thinking (Qwen3.5/3.6), served with prompt checkpoints and without them (what
llama.cpp-based servers do on hybrid models: the whole history again every turn).

Each turn sends the earlier replies back, reasoning included, through the server's own
/v1/chat/completions (in process, real engine); per turn it prints the prompt tokens, how many
were evaluated (the rest came from the context) and the prompt time.

Without MODEL a synthetic qwen35moe with the Qwen3.5 chat template is generated.

Usage: python tools/bench_prompt_reuse.py [MODEL] [--turns 5] [--threads 1] [--ctx 8192]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from fastapi.testclient import TestClient

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic_models import make_model  # noqa: E402

from rotary_gguf.engine import Engine  # noqa: E402
from rotary_gguf.prompt_cache import DEFAULT_CHECKPOINT_BYTES  # noqa: E402
from rotary_gguf.serve import ServeOptions, create_app  # noqa: E402

# ~270 MB, the bench_serve model's widths, with the model family's chat template
BENCH_MODEL = dict(arch="qwen35moe", layers=8, experts=16, used=4, embd=1024, ff=512, quant="q8_0",
                   chat_template="qwen3.5")


def conversation(engine: Engine, turns: int) -> list[tuple[int, int, float]]:
    """(prompt tokens, evaluated tokens, prompt seconds) of each turn."""
    out = []
    messages = [{"role": "system", "content": "You are a careful assistant."}]
    with TestClient(create_app(engine, ServeOptions("bench", 4))) as client:
        for turn in range(turns):
            messages.append({"role": "user", "content": f"Question {turn}: what should I pack for a week by the sea?"})
            body = {"messages": messages, "max_tokens": 48, "temperature": 0, "thinking_budget": 24}
            reply = client.post("/v1/chat/completions", json=body).json()
            usage = reply["usage"]
            cached = usage["prompt_tokens_details"]["cached_tokens"]
            seconds = engine.live.snapshot().last_prompt_tps
            evaluated = usage["prompt_tokens"] - cached
            out.append((usage["prompt_tokens"], evaluated, evaluated / seconds if seconds else 0.0))
            message = reply["choices"][0]["message"]
            messages.append({"role": "assistant", "content": message["content"],
                             "reasoning_content": message.get("reasoning_content")})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?")
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ctx", type=int, default=8192)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        model = Path(args.model) if args.model else make_model(Path(folder) / "bench.gguf", **BENCH_MODEL)
        runs = {}
        for name, budget in (("checkpoints", DEFAULT_CHECKPOINT_BYTES), ("none", 0)):
            with Engine.load(model, n_ctx=args.ctx, n_threads=args.threads, checkpoint_bytes=budget) as engine:
                if engine.checkpoints is None:
                    print("error: not a hybrid (recurrent) model: nothing to measure", file=sys.stderr)
                    return 2
                runs[name] = conversation(engine, args.turns)
    print(f"{'turn':>4} {'prompt':>7} | {'evaluated':>9} {'seconds':>8} (checkpoints) | {'evaluated':>9} {'seconds':>8} (none)")
    for turn, (a, b) in enumerate(zip(runs["checkpoints"], runs["none"]), 1):
        print(f"{turn:>4} {a[0]:>7} | {a[1]:>9} {a[2]:>8.3f}               | {b[1]:>9} {b[2]:>8.3f}")
    totals = [sum(r[1] for r in runs[k]) for k in ("checkpoints", "none")]
    print(f"evaluated in all: {totals[0]} with checkpoints, {totals[1]} without")
    return 0


if __name__ == "__main__":
    sys.exit(main())
