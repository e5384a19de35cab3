#!/usr/bin/env python3
"""Decode speed and accelerator memory of one model in each host-expert variant, under one budget.

Variants, each measured in its own process (llama.cpp reads GGML_OP_OFFLOAD_MIN_BATCH once per
process, so rotary mode cannot share one with cpu mode), one after the other:
  cpu       the plan in cpu mode, no expert cache: resident blocks only, the CPU computes the
            other blocks' experts (llama.cpp's --n-cpu-moe at the same memory)
  rotary    the plan in rotary mode, no expert cache: every token's host experts streamed to the GPU
  split-S   split compute: an expert cache of S slots per host block whose hits the GPU computes
            while the CPU computes the misses ("auto": the planner weighs slot counts against
            resident blocks and may choose none)
  upload-S  an expert cache of S slots per host block that uploads every miss before the block
            runs ("auto": it fills what the resident blocks leave)

Each variant is planned (`cli.plan_for`), loaded with the plan's placement and expert cache, warmed
up with one generation and timed on a second (the same prompt, greedy). Its figures go to
OUT/VARIANT.json as soon as it ends (its output to OUT/VARIANT.log); a variant the planner refuses
(rotary on an RPC device, a cache the budget cannot hold) is recorded as skipped with the reason,
one that crashes or runs past --timeout as an error. At the end a Markdown table goes to stdout
and OUT/table.md; the exit status is 1 when a variant failed.

Peak VRAM is NVML's used memory at its highest during the timed run less what was used before the
variant's process touched the GPU; on an RPC device (--rpc, a simulated accelerator) it is what
llama.cpp placed there. The hit rate is the expert cache's over the timed run. Beside the measured
decode and prompt t/s: the speed model's prediction for the variant (`plan`'s, from this
machine's calibration, measured on first use) and the measured figure's difference from it.

    python tools/bench_gpu.py MODEL [--vram 6.3GB] [--split auto 64] [--upload 64] [--ctx 4096] [--out DIR]
                              [--prompt-tokens 128] [--gen-tokens 64] [--timeout 300] [--rpc HOST:PORT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rotary_gguf.errors import UserError  # noqa: E402
from rotary_gguf.units import human_bytes, parse_size  # noqa: E402

N_BATCH = 512
BASELINE = "cpu"
PEAK_SOURCES = {
    "NVML": "NVML's used memory at the peak less what was used before the variant's process started",
    "placed": "the bytes llama.cpp and the expert cache placed on the RPC device",
    "ggml": "the device's used memory as ggml reports it",
}


# --- one variant, in its own process ------------------------------------------------------------------
def variant_setting(name: str) -> tuple[str, str | int, str]:
    """(host-expert mode, expert cache setting, cache-miss handling) of a variant name."""
    if name in ("cpu", "rotary"):
        return name, "off", "split"
    misses, _, size = name.partition("-")
    return "cpu", size if size == "auto" else int(size), misses


def nvml_used(index: int = 0) -> int | None:
    """Bytes NVML reports used on GPU `index`, or None without NVML or that GPU."""
    import pynvml

    try:
        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).used)
    except pynvml.NVMLError:
        return None


def cache_counts(cache) -> tuple[int, int, int] | None:
    """(hits, misses, uploaded bytes) of a live expert cache so far; None without one."""
    if cache is None or not cache.enabled:
        return None
    stats = cache.summary()
    return stats.hits, stats.misses, cache.uploaded_bytes


def predicted_speeds(plan, inv, misses: str, args: argparse.Namespace) -> dict:
    """The speed model's decode and prompt t/s for a cpu-mode plan, from this machine's calibration
    (measured on first use, then kept), at the prompt and KV cache the timed run sees; nothing for
    rotary mode, which the speed model does not cover."""
    if plan.mode != "cpu":
        return {}
    from rotary_gguf.calibration import plan_speeds
    from rotary_gguf.engine import default_threads
    from rotary_gguf.speed_model import kv_cells_read

    speeds, _ = plan_speeds(inv, plan.accelerator.name, args.threads or default_threads(),
                            kv_cells=kv_cells_read(args.prompt_tokens + args.gen_tokens // 2))
    slots = plan.expert_cache.slots if plan.expert_cache else 0
    layout = plan.speed_layout(plan.host_layers, slots, misses)
    predicted = speeds.predict(layout, prompt_batch=min(args.prompt_tokens, N_BATCH))
    return {"predicted_decode_tps": predicted.decode_tps, "predicted_prompt_tps": predicted.prompt_tps,
            "speeds_source": speeds.source}


def run_variant(name: str, args: argparse.Namespace) -> dict:
    """Plan, load, warm up and time one variant; its figures as one JSON-ready dict."""
    mode, cache_setting, misses = variant_setting(name)
    # before anything here touches the GPU: what others (and the driver) hold
    baseline = nvml_used() if args.rpc is None else None

    from rotary_gguf import log
    from rotary_gguf.bench import measure, prompt_tokens
    from rotary_gguf.cli import plan_for
    from rotary_gguf.dashboard import MemoryProbe
    from rotary_gguf.engine import Engine
    from rotary_gguf.experts.cache import ExpertCache
    from rotary_gguf.inventory import read_inventory
    from rotary_gguf.plan import ContextSettings

    log.setup()
    result = {"variant": name, "mode": mode, "expert_cache_setting": cache_setting,
              "budget_bytes": parse_size(args.vram), "accelerator_baseline_bytes": baseline}
    try:
        plan = plan_for(args.model, vram=args.vram, context=ContextSettings(args.ctx, N_BATCH, N_BATCH), mode=mode, rpc=args.rpc,
                        expert_cache=cache_setting, cache_misses=misses)
    except UserError as e:
        return {**result, "status": "skipped", "reason": str(e)}
    result.update(
        device=plan.accelerator.name,
        resident_blocks=len(plan.resident),
        host_blocks=len(plan.host_layers),
        cache_slots=plan.expert_cache.slots if plan.expert_cache else None,
        predicted_accelerator_bytes=plan.accelerator_use.total,
        predicted_accelerator=plan.accelerator_use.parts(),
        plan_notes=[plan.mode_reason, *plan.notes, *([plan.expert_cache_reason] if plan.expert_cache_reason else [])],
    )
    inv = read_inventory(args.model)
    result.update(predicted_speeds(plan, inv, misses, args))
    cache = ExpertCache.for_plan(plan, inv, n_threads=args.threads)
    start = time.perf_counter()
    with Engine.load(args.model, plan.placement, n_ctx=args.ctx, n_batch=plan.n_batch, n_threads=args.threads or None,
                     expert_cache=cache) as engine:
        load_seconds = time.perf_counter() - start
        prompt = prompt_tokens(engine, args.prompt_tokens)
        measure(engine, prompt, args.gen_tokens)  # warm-up
        before = cache_counts(cache)
        m = measure(engine, prompt, args.gen_tokens)
        after = cache_counts(cache)
        sources = {acc.source for acc in MemoryProbe(engine).accelerators()}
        disabled = cache.disabled_reason if cache is not None else None
    hit_rate = uploaded = None
    if before is not None and after is not None:
        hits, misses, uploaded = (a - b for a, b in zip(after, before))
        hit_rate = hits / (hits + misses) if hits + misses else None
    peak = m.peak_accelerator_bytes
    return {
        **result,
        "status": "ok",
        "load_seconds": load_seconds,
        "decode_tps": m.decode_tps,
        "prompt_tps": m.prompt_tps,
        "ttft_seconds": m.ttft_seconds,
        "peak_accelerator_bytes": peak,
        "peak_accelerator_source": "+".join(sorted(sources)) or None,
        "peak_vram_bytes": peak - (baseline or 0) if peak is not None else None,
        "peak_rss_bytes": m.peak_rss_bytes,
        "hit_rate": hit_rate,
        "cache_uploaded_bytes": uploaded,
        "cache_disabled_reason": disabled,
        "tokens": m.tokens,
    }


# --- the parent: every variant in a subprocess, then the table --------------------------------------------
def child_command(name: str, args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), str(args.model), "--child", name, "--vram", args.vram,
           "--ctx", str(args.ctx), "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens),
           "--threads", str(args.threads)]
    return cmd + (["--rpc", args.rpc] if args.rpc else [])


def measure_variant(name: str, args: argparse.Namespace, out: Path) -> dict:
    """Run one variant's process; its result, or an error record when it crashed or timed out."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(child_command(name, args), capture_output=True, text=True, timeout=args.timeout)
        stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        stdout, stderr, rc = _text(e.stdout), _text(e.stderr), None
    wall = time.perf_counter() - start
    (out / f"{name}.log").write_text(stdout + stderr)
    lines = stdout.strip().splitlines()
    if rc == 0 and lines:
        result = json.loads(lines[-1])
    else:
        why = f"ran past --timeout {args.timeout}s" if rc is None else f"exited with status {rc}"
        tail = [line for line in stderr.strip().splitlines() if line.strip()][-1:]
        result = {"variant": name, "status": "error", "reason": "; ".join([why, *tail])}
    result["wall_seconds"] = wall
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _beside(measured: float, predicted: float | None) -> str:
    """A predicted t/s and the measured one's difference from it: "52.1 (-8%)"; "-" without one."""
    if not predicted:
        return "-"
    return f"{predicted:.1f} ({measured / predicted - 1:+.0%})"


def _text(data: bytes | str | None) -> str:
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data or ""


def table(results: list[dict], args: argparse.Namespace) -> str:
    """The Markdown table of every variant, with the reasons for those not measured."""
    budget = parse_size(args.vram)
    base = next((r for r in results if r["variant"] == BASELINE and r["status"] == "ok"), None)
    lines = [
        f"`{args.model.name}`, budget {args.vram} ({human_bytes(budget)}), ctx {args.ctx}, "
        f"{args.prompt_tokens} prompt tokens, {args.gen_tokens} generated (after one warm-up)",
        "",
        "| variant | decode t/s | predicted | vs cpu | prompt t/s | predicted | peak VRAM | predicted | hit rate | "
        "expert blocks on GPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for r in results:
        if r["status"] != "ok":
            lines.append(f"| {r['variant']} | {r['status']} | | | | | | | | |")
            notes.append(f"- {r['variant']} {r['status']}: {r['reason']}")
            continue
        ratio = f"{r['decode_tps'] / base['decode_tps']:.2f}x" if base and base["decode_tps"] else "-"
        peak = human_bytes(r["peak_vram_bytes"]) if r["peak_vram_bytes"] is not None else "-"
        hits = f"{r['hit_rate']:.1%}" if r["hit_rate"] is not None else "-"
        slots = f" ({r['cache_slots'] or 'no'} slots)" if r["variant"].endswith("-auto") else ""
        blocks = f"{r['resident_blocks']} of {r['resident_blocks'] + r['host_blocks']}"
        decode, prompt = (_beside(r[f"{figure}_tps"], r.get(f"predicted_{figure}_tps")) for figure in ("decode", "prompt"))
        lines.append(f"| {r['variant']}{slots} | {r['decode_tps']:.1f} | {decode} | {ratio} | {r['prompt_tps']:.1f} | "
                     f"{prompt} | {peak} | {human_bytes(r['predicted_accelerator_bytes'])} | {hits} | {blocks} |")
        if r.get("cache_disabled_reason"):
            notes.append(f"- {r['variant']}: the expert cache turned itself off: {r['cache_disabled_reason']}")
    for source in sorted({r["speeds_source"] for r in results if r.get("speeds_source")}):
        notes.append(f"- predicted t/s: the speed model ({source}); the measured figure's difference from it in "
                     "brackets (rotary mode is not predicted)")
    for source in sorted({r["peak_accelerator_source"] for r in results if r.get("peak_accelerator_source")}):
        notes.append(f"- peak VRAM ({source}): {PEAK_SOURCES.get(source, source)}")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="a GGUF MoE model")
    ap.add_argument("--vram", default="6.3GB", help="accelerator budget, e.g. 6.3GB, 8GiB (default 6.3GB)")
    ap.add_argument("--split", nargs="*", default=["auto", "64"], metavar="SLOTS",
                    help="split-compute cache sizes to measure, slots per host block or 'auto' (default auto 64)")
    ap.add_argument("--upload", nargs="*", default=["64"], metavar="SLOTS",
                    help="upload-every-miss cache sizes to measure, slots per host block or 'auto' (default 64)")
    ap.add_argument("--ctx", type=int, default=4096, help="context length the plan sizes for (default 4096)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: the engine's default)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds each variant may take (default 300)")
    ap.add_argument("--rpc", metavar="HOST:PORT", help="plan for a ggml-rpc device (rotary is then skipped)")
    ap.add_argument("--out", type=Path, help="folder for the results (default $OUT, else ./gpu-out)")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # run this one variant and print its JSON
    args = ap.parse_args(argv)
    parse_size(args.vram)
    if args.prompt_tokens < 1 or args.gen_tokens < 2:
        raise UserError("--prompt-tokens must be at least 1 and --gen-tokens at least 2 (decode speed needs two)")
    if args.prompt_tokens + args.gen_tokens > args.ctx:
        raise UserError(f"--prompt-tokens plus --gen-tokens ({args.prompt_tokens + args.gen_tokens}) do not fit --ctx {args.ctx}")
    for flag, sizes in (("--split", args.split), ("--upload", args.upload)):
        for size in sizes:
            if size != "auto" and not (size.isdigit() and int(size) > 0):
                raise UserError(f"{flag} takes slot counts or 'auto', not {size!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.child:
        print(json.dumps(run_variant(args.child, args)))
        return 0
    out = args.out or Path(os.environ.get("OUT") or "gpu-out")
    out.mkdir(parents=True, exist_ok=True)
    variants = ["cpu", "rotary", *dict.fromkeys(f"split-{size}" for size in args.split),
                *dict.fromkeys(f"upload-{size}" for size in args.upload)]
    results = []
    for name in variants:
        result = measure_variant(name, args, out)
        figure = f"decode {result['decode_tps']:.1f} t/s" if result["status"] == "ok" else result["reason"]
        print(f"{name}: {result['status']}, {figure} ({result['wall_seconds']:.0f} s)", file=sys.stderr, flush=True)
        results.append(result)
    text = table(results, args)
    (out / "table.md").write_text(text)
    print(text, end="")
    return 1 if any(r["status"] == "error" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
