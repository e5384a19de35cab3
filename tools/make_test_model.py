#!/usr/bin/env python3
"""Write a small synthetic Mixture-of-Experts GGUF model for tests (``synthetic_models`` says what
the models are: architectures, routing skew, MTP blocks, benchmark widths).

Usage::

    python tools/make_test_model.py -o tiny.gguf --arch qwen35moe \\
        --quant q8_0 --router-skew 1.5 --seed 3
    python tools/make_test_model.py -o bench.gguf --bench-dims --layers 16
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from synthetic_models import (ARCHS, BENCH_EMBD, BENCH_EXPERTS, BENCH_FF, BENCH_USED, CHAT_TEMPLATES, DEFAULT_EMBD,
                              DEFAULT_EMBD_KQUANT, DEFAULT_EXPERTS, DEFAULT_FF, DEFAULT_FF_KQUANT, DEFAULT_LAYERS,
                              DEFAULT_USED, MTP_KINDS, QUANTS, make_bench_model, make_model)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="Write a small synthetic (MoE) GGUF model that llama.cpp can run.",
    )
    ap.add_argument("-o", "--output", required=True, help="output .gguf path")
    ap.add_argument("--arch", choices=ARCHS, default="qwen3moe",
                    help="qwen3moe, qwen35moe (hybrid DeltaNet/attention MoE) or qwen3 (dense)")
    ap.add_argument("--layers", type=int, default=DEFAULT_LAYERS, help="number of blocks")
    ap.add_argument("--experts", type=int, default=None,
                    help=f"routed experts per block (default {DEFAULT_EXPERTS}, {BENCH_EXPERTS} with --bench-dims)")
    ap.add_argument("--used", type=int, default=None,
                    help=f"experts used per token (default {DEFAULT_USED}, {BENCH_USED} with --bench-dims)")
    ap.add_argument("--embd", type=int, default=None,
                    help=f"embedding size (default {DEFAULT_EMBD}, {DEFAULT_EMBD_KQUANT} for q4_k_m, "
                         f"{BENCH_EMBD} with --bench-dims)")
    ap.add_argument("--ff", type=int, default=None,
                    help=f"expert FFN size, dense FFN size for qwen3 "
                         f"(default {DEFAULT_FF}, {DEFAULT_FF_KQUANT} for q4_k_m, {BENCH_FF} with --bench-dims)")
    ap.add_argument("--quant", choices=QUANTS, default="f32", help="weight type")
    ap.add_argument("--router-skew", type=float, default=None,
                    help="0 = near-uniform routing; 1-2 = a few hot experts per layer take most selections "
                         "(default 0, 1 with --bench-dims)")
    ap.add_argument("--seed", type=int, default=0, help="weights seed")
    ap.add_argument("--fused-gate-up", action="store_true",
                    help="write ffn_gate_up_exps instead of ffn_gate_exps + ffn_up_exps (qwen35moe)")
    ap.add_argument("--chat-template", choices=CHAT_TEMPLATES, default="chatml",
                    help="chatml (plain), qwen3.5 (tools as <function=..>, thinking on by default) or qwen3 "
                         "(JSON tool calls)")
    ap.add_argument("--mtp", choices=MTP_KINDS, default=None,
                    help="add a multi-token-prediction (nextn) block (qwen35moe): random weights, or 'mirror' "
                         "(drafts what the trunk predicts from the last token alone, often accepted)")
    ap.add_argument("--trunk-gain", type=float, default=1.0,
                    help="scale what every block writes into the residual stream (below 1: the next token depends "
                         "more on the last one, and a mirror MTP head's drafts are accepted more often)")
    ap.add_argument("--bench-dims", action="store_true",
                    help="make_bench_model: a qwen35moe with Qwen3.5/3.6-35B-A3B's expert widths, its experts "
                         "written straight as random Q4_K blocks (--arch, --quant and --fused-gate-up do not apply)")
    return ap


def _given(value, default):
    return default if value is None else value


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.bench_dims:
            path = make_bench_model(
                args.output,
                layers=args.layers,
                embd=_given(args.embd, BENCH_EMBD),
                experts=_given(args.experts, BENCH_EXPERTS),
                used=_given(args.used, BENCH_USED),
                ff=_given(args.ff, BENCH_FF),
                router_skew=_given(args.router_skew, 1.0),
                seed=args.seed,
                mtp=args.mtp,
                trunk_gain=args.trunk_gain,
            )
        else:
            path = make_model(
                args.output,
                arch=args.arch,
                layers=args.layers,
                experts=_given(args.experts, DEFAULT_EXPERTS),
                used=_given(args.used, DEFAULT_USED),
                embd=args.embd,
                ff=args.ff,
                quant=args.quant,
                router_skew=_given(args.router_skew, 0.0),
                seed=args.seed,
                fused_gate_up=args.fused_gate_up,
                chat_template=args.chat_template,
                mtp=args.mtp,
                trunk_gain=args.trunk_gain,
            )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{path} {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
