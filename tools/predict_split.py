"""Predicted decode speed of Qwen3.6-35B-A3B (Q4_K_M) on a small GPU: resident expert blocks only
(llama.cpp's --n-cpu-moe at the same memory), split compute as the planner sizes it, and the same
slots uploading every miss; from the GPU's memory bandwidth, the host link's speed, the CPU's
expert throughput (measured here unless given) and the cache's hit rate (the planner's field
curve unless given).

A decoded token costs, in this model:
  GPU:  every accelerator weight but the experts, read once (attention, shared experts, router,
        output head), plus the used experts of each resident block, at the GPU's bandwidth, plus a
        fixed launch cost per block;
  per host block, by how it runs:
    cpu     its used experts read by the CPU, plus a hop (the activations to the CPU and back);
    split   the misses read by the CPU while the GPU computes the hits, plus the hop and three syncs;
    upload  the misses copied over the link before the block runs (a copy latency each), then
            computed on the GPU with the hits.
The GPU part and the host blocks add up (a block waits for the one before it). Uploads that fill
split compute's slots happen between tokens, under the plan's budget: their time is added too.
The check rows compare the same model with published --n-cpu-moe figures of two desktop cards.

    python tools/predict_split.py [--vram 6.3GB 8GiB] [--gpu-gbs 230] [--link-gbs 12] [--cpu-gbs MEASURED]
                                  [--hit-rates bench-split.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rotary_gguf.decode_cost import HostBlock, block_seconds, field_hit_rate  # noqa: E402
from rotary_gguf.plan import COPY_LATENCY_S, Accelerator, ModelFigures, Plan, make_plan  # noqa: E402
from rotary_gguf.units import parse_size  # noqa: E402

MiB, GiB = 2**20, 2**30
# Kernel launches and small ops of one block on the GPU (attention or DeltaNet, norms, router,
# shared expert: dozens of kernels, no CUDA graphs once an eval callback splits the graph):
# calibrated so that the first check below comes out at its published figure.
GPU_BLOCK_LAUNCH_S = 240e-6
# Published --n-cpu-moe decode figures for Qwen3.6-35B-A3B, and the machines' figures this model
# needs for them (memory bandwidths: the cards' specifications at 80%, the hosts' CPUs reading
# experts at 40 GB/s, about 60% of dual-channel DDR5 peak). The first calibrates
# GPU_BLOCK_LAUNCH_S; the second (Q4_K_S, slightly smaller than the Q4_K_M modelled) checks it.
FIELD_CHECKS = (
    ("RTX 3060 12GB, Q4_K_M, --n-cpu-moe", 42.3, 12 * GiB, 360e9 * 0.8, 16e9, 40e9),
    ("RTX 4060 Ti 8GB, Q4_K_S, --n-cpu-moe", 40.0, 8 * GiB, 288e9 * 0.8, 16e9, 40e9),
)


def qwen36_figures(n_layer: int = 40, fused: bool = False) -> ModelFigures:
    """Qwen3.6-35B-A3B at Q4_K_M as the model card and its GGUF describe it: Q4_K gate/up (144 MiB
    each per block), Q6_K down (210 MiB), 10 full-attention blocks of 40, 248320-token vocabulary."""
    tensors = [("token_embd.weight", 2048 * 248320 // 256 * 144), ("output_norm.weight", 2048 * 4),
               ("output.weight", 2048 * 248320 // 256 * 210)]
    attention = tuple("full" if (i + 1) % 4 == 0 else "linear" for i in range(n_layer))
    for i in range(n_layer):
        p = f"blk.{i}."
        tensors += [(p + "attn_norm.weight", 8192), (p + "ffn_gate_inp.weight", 2048 * 256 * 4),
                    (p + "attn_qkv.weight" if attention[i] == "linear" else p + "attn_q.weight", 2048 * 8192 // 32 * 34)]
        if fused:
            tensors.append((p + "ffn_gate_up_exps.weight", 288 * MiB))
        else:
            tensors += [(p + "ffn_gate_exps.weight", 144 * MiB), (p + "ffn_up_exps.weight", 144 * MiB)]
        tensors.append((p + "ffn_down_exps.weight", 210 * MiB))
    return ModelFigures(
        name="qwen3.6-35b-a3b", arch="qwen35moe", n_layer=n_layer, tensors=tuple(tensors), attention=attention,
        n_vocab=248320, n_embd=2048, n_expert=256, n_expert_used=8, n_ff_exp=512, n_head=16, n_head_kv=2,
        head_dim_k=256, head_dim_v=256, recurrent_conv=3 * (4096 + 2 * 16 * 128), recurrent_ssm=128 * 4096,
        recurrent_width=2 * 8192 + 4096 + 4 * 64 * 32,
    )


@dataclass(frozen=True)
class Machine:
    gpu_bytes_per_s: float
    link_bytes_per_s: float
    cpu_expert_bytes_per_s: float


def token_seconds(plan: Plan, machine: Machine, hit_rate, misses: str = "split") -> float:
    """Predicted seconds per decoded token of `plan` (its cache's misses handled as `misses`)."""
    m = plan.model
    one_expert = {i: m.expert_bytes(i) // m.n_expert for i in range(m.n_layer)}
    used = {i: m.n_expert_used * one_expert[i] for i in range(m.n_layer)}
    gpu = (m.base_weight_bytes + sum(used[i] for i in plan.resident)) / machine.gpu_bytes_per_s
    gpu += m.n_layer * GPU_BLOCK_LAUNCH_S
    cache = plan.expert_cache
    slots = cache.slots if cache is not None else 0
    h = hit_rate(slots, m.n_expert) if slots else 0.0
    host = 0.0
    for i in plan.host_layers:
        if not slots or misses == "split":
            host += block_seconds(HostBlock(used[i], slots, h), machine.cpu_expert_bytes_per_s, machine.gpu_bytes_per_s)
        else:
            missed = (1 - h) * m.n_expert_used
            host += missed * (one_expert[i] / machine.link_bytes_per_s + COPY_LATENCY_S) + used[i] / machine.gpu_bytes_per_s
    if slots and misses == "split" and cache.upload_budget:
        host += cache.upload_budget / machine.link_bytes_per_s  # between tokens, at most the budget
    return gpu + host


def measured_cpu_bytes_per_s() -> float:
    """This machine's CPU reading Q4_K experts for matrix-vector products, all cores."""
    from gguf import GGMLQuantizationType

    from rotary_gguf import native

    return native.cpu_matvec_bytes_per_s(int(GGMLQuantizationType.Q4_K), 2048, os.cpu_count() or 1)


def measured_hit_rates(path: Path):
    """hit_rate(slots, n_expert) interpolated from tools/bench_split.py's rows (256 experts)."""
    rows = sorted((r["slots"] / 256, r["accelerator_share"]) for r in json.loads(path.read_text()))
    points = [(0.0, 0.0), *rows, (1.0, 1.0)]

    def hit_rate(slots: int, n_expert: int) -> float:
        f = slots / n_expert
        for (f0, h0), (f1, h1) in zip(points, points[1:]):
            if f <= f1:
                return h0 + (h1 - h0) * (f - f0) / (f1 - f0) if f1 > f0 else h1
        return 1.0

    return hit_rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vram", nargs="+", default=["6.3GB", "8GiB"], help="GPU budgets (default 6.3GB 8GiB)")
    ap.add_argument("--gpu-gbs", type=float, default=256 * 0.8,
                    help="GPU memory bandwidth in GB/s (default: an RTX 4060 Laptop's 256 GB/s at 80%%)")
    ap.add_argument("--link-gbs", type=float, default=12.0,
                    help="host->GPU copies in GB/s from pinned memory (default 12: PCIe 4.0 x8, a laptop 4060's link)")
    ap.add_argument("--cpu-gbs", type=float, help="CPU expert throughput in GB/s (default: measured on this machine)")
    ap.add_argument("--hit-rates", type=Path,
                    help="tools/bench_split.py --json output: use its measured accelerator shares (by slots per "
                         "block, interpolated) instead of the planner's field curve")
    args = ap.parse_args()
    cpu = args.cpu_gbs * 1e9 if args.cpu_gbs else measured_cpu_bytes_per_s()
    machine = Machine(args.gpu_gbs * 1e9, args.link_gbs * 1e9, cpu)
    hit_rate, hit_source = field_hit_rate, "the planner's field curve"
    if args.hit_rates:
        hit_rate, hit_source = measured_hit_rates(args.hit_rates), f"measured in {args.hit_rates.name}"
    model = qwen36_figures()
    gpu = Accelerator.planned_cuda()
    print(f"Qwen3.6-35B-A3B Q4_K_M, decode, ctx 4096: GPU {args.gpu_gbs:.0f} GB/s, link {args.link_gbs:.0f} GB/s, "
          f"CPU experts {cpu / 1e9:.1f} GB/s ({'given' if args.cpu_gbs else 'measured here'}), hit rates: {hit_source}")
    print("| budget | placement | resident blocks | slots/block | hit rate | predicted t/s | vs --n-cpu-moe |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for vram in args.vram:
        budget = parse_size(vram)
        plain = make_plan(model, gpu, budget, cpu_expert_bytes_per_s=cpu)
        split = make_plan(model, gpu, budget, expert_cache="auto", cpu_expert_bytes_per_s=cpu,
                          upload_bytes_per_s=machine.link_bytes_per_s)
        base = 1 / token_seconds(plain, machine, hit_rate)
        rows = [("--n-cpu-moe (resident blocks only)", plain, "split")]
        if split.expert_cache is not None:
            rows.append(("split compute (auto)", split, "split"))
            if split.expert_cache.slots >= model.n_expert_used:
                rows.append(("same slots, upload every miss", split, "upload"))
        for name, plan, misses in rows:
            tps = 1 / token_seconds(plan, machine, hit_rate, misses)
            slots = plan.expert_cache.slots if plan.expert_cache else 0
            h = hit_rate(slots, model.n_expert) if slots else 0.0
            print(f"| {vram} | {name} | {len(plan.resident)} | {slots or '-'} | {f'{h:.0%}' if slots else '-'} | "
                  f"{tps:.1f} | {tps / base:.2f}x |")
    for name, published, budget, gpu_bps, link_bps, cpu_bps in FIELD_CHECKS:
        plan = make_plan(model, gpu, budget)
        tps = 1 / token_seconds(plan, Machine(gpu_bps, link_bps, cpu_bps), hit_rate)
        print(f"check: {name}: predicted {tps:.1f} t/s, published {published} t/s "
              f"(GPU {gpu_bps / 1e9:.0f} GB/s, CPU {cpu_bps / 1e9:.0f} GB/s assumed)")


if __name__ == "__main__":
    main()
