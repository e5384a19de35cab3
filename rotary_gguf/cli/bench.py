"""`bench`: placements measured side by side, and a recommendation."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

import typer
from rich.console import Console
from rich.measure import Measurement as RichMeasurement
from rich.table import Table

from .. import log
from ..errors import UserError
from ..defaults import CALIBRATIONS_KEPT, DEFAULT_BATCH, DEFAULT_FLASH_ATTN, DEFAULT_KV_TYPE
from ..draft import DEFAULT_DRAFT_MAX
from ..units import human_bytes
from .app import (BatchOpt, CacheOpt, CtxOpt, DevicesOpt, FlashAttnOpt, JsonOpt, KvTypeOpt, MissesOpt, ModelArg, ProfileOpt, ReserveOpt,
                  RpcOpt, ThreadsOpt, UbatchOpt, VramOpt, app, cache_setting, out)
from .placement import context_for, plan_or_cpu
from .run import DraftMaxOpt, DraftOpt


@app.command()
def bench(
    model: ModelArg,
    vram: VramOpt = None,
    reserve: ReserveOpt = None,
    ctx: CtxOpt = None,
    batch: BatchOpt = DEFAULT_BATCH,
    ubatch: UbatchOpt = None,
    kv_type: KvTypeOpt = DEFAULT_KV_TYPE,
    flash_attn: FlashAttnOpt = DEFAULT_FLASH_ATTN,
    prompt_tokens: Annotated[int, typer.Option(help="Prompt tokens each run evaluates (the same for every candidate).")] = 512,
    gen_tokens: Annotated[int, typer.Option(help="Tokens each run generates, greedily.")] = 128,
    runs: Annotated[int, typer.Option(help="Timed runs per candidate, after one warm-up run each.")] = 3,
    rpc: RpcOpt = None,
    devices: DevicesOpt = None,
    expert_cache: CacheOpt = "auto",
    cache_misses: MissesOpt = "split",
    routing_profile: ProfileOpt = None,
    threads: ThreadsOpt = 0,
    as_json: JsonOpt = False,
    draft: DraftOpt = "auto",
    draft_max: DraftMaxOpt = DEFAULT_DRAFT_MAX,
    calibrate: Annotated[
        bool, typer.Option("--calibrate", help="Measure this machine's speeds again right after the runs, for the "
                           "predicted column (else the figures kept from the first use), so both see the same load; "
                           f"each figure is the median of the last {CALIBRATIONS_KEPT} measurements.")
    ] = False,
) -> None:
    """Measure placements side by side (the plan with and without its expert cache, llama.cpp's
    --cpu-moe and --n-cpu-moe N, all on the accelerator; a plan over several devices beside the
    first device alone and --cpu-moe on it) and recommend one. Identical placements
    are measured once, as one row. The table shows where each candidate's experts compute
    (CPU_REPACK, CPU, RPC0, CUDA0); where greedy outputs differ, the reference's tokens are fed
    through both and their logits compared: a near tie within the tolerance is a note, more is an
    error (exit code 1). Warns when runs are too noisy to tell candidates apart. Needs a GPU or
    --rpc to compare placements; without one it measures the CPU-only run alone and says so.
    For a model with an MTP block (--draft auto or mtp), the plan also runs with drafts ("plan ...
    +mtp", planned with the MTP block's memory): whether that was faster is kept for --draft auto."""
    from .. import bench as benching
    from ..plan import Placement

    for flag, value in (("--runs", runs), ("--gen-tokens", gen_tokens), ("--prompt-tokens", prompt_tokens)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, not {value}")
    context = context_for(model, ctx=ctx, batch=batch, ubatch=ubatch, kv_type=kv_type, flash_attn=flash_attn)
    cpu_plan = plan_or_cpu(model, vram=vram, reserve=reserve, mode="cpu", context=context, rpc=rpc, devices=devices,
                           expert_cache=cache_setting(expert_cache), cache_misses=cache_misses,
                           routing_profile=routing_profile, threads=threads)
    notes: list[str] = []
    if cpu_plan is None:
        cands = [benching.Candidate("cpu-only", Placement.all_cpu(), "cpu-only", "everything on the CPU")]
        notes.append("only the CPU-only run was measured: no GPU here and no --rpc (or a dense model), so there are no placements to compare")
    elif cpu_plan.shares:
        cands = benching.spread_candidates(cpu_plan)
        if len(cands) == 1:
            notes.append(f"{cpu_plan.accelerator.name}'s budget cannot hold every block alone: only the plan over "
                         "several devices was measured")
    else:
        plans = [cpu_plan] if cpu_plan.expert_cache is None else [benching.without_expert_cache(cpu_plan), cpu_plan]
        if cpu_plan.accelerator.streams_host_ops:
            notes.append("rotary mode was not measured: its offload threshold is fixed per process, and cpu mode was set first")
        cands = benching.candidates(plans)
    drafting = _drafting(model, draft, draft_max, context.n_ubatch, cpu_plan, notes, lambda: plan_or_cpu(
        model, vram=vram, reserve=reserve, mode="cpu", context=context, rpc=rpc, devices=devices,
        expert_cache=cache_setting(expert_cache), cache_misses=cache_misses, routing_profile=routing_profile,
        threads=threads, draft_max=draft_max))
    cands = benching.with_drafting(cands, drafting)

    def progress(run: int, cand, m) -> None:
        if not as_json:
            label = "warm-up" if run == 0 else f"run {run}/{runs}"
            log.logger.info("%s: %s: decode %.1f t/s", label, cand.name, m.decode_tps)

    load_options = dict(n_ubatch=context.n_ubatch, kv_type=context.kv_type, flash_attn=context.flash_attn)
    results, prompt = benching.run_bench(model, cands, n_ctx=context.ctx, n_batch=context.n_batch, prompt_len=prompt_tokens,
                                         gen_tokens=gen_tokens, runs=runs, n_threads=threads or None, on_run=progress,
                                         load_options=load_options)
    from ..speed_model import kv_cells_read

    _predict(model, results, cpu_plan, threads, calibrate, min(prompt_tokens, context.n_ubatch), context.kv_type,
             kv_cells_read(prompt_tokens + gen_tokens // 2, context.flash_attn != "off"))
    best = benching.recommend(results)
    from ..engine import default_threads

    verdicts = benching.draft_verdicts(model, results, threads or default_threads())
    notes += [f"{name}: MTP drafts {'faster' if v.faster else 'not faster'}, kept for --draft auto: {v.describe()}"
              for name, v in verdicts]
    checks = benching.check_outputs(model, results, prompt, n_ctx=context.ctx, n_batch=context.n_batch,
                                    n_threads=threads or None, load_options=load_options)
    bugs = [c for c in checks if not c.legitimate]
    notes += [c.describe() for c in checks if c.legitimate]
    warnings = benching.noise_warnings(results, best, runs)
    if as_json:
        print(json.dumps({"candidates": [r.to_json() for r in results], "recommended": best.candidate.name,
                          "outputs_identical": not checks, "output_checks": [c.to_json() for c in checks],
                          "draft_verdicts": [{"candidate": name, **asdict(v)} for name, v in verdicts],
                          "warnings": warnings, "notes": notes}, indent=2))
    else:
        console = _wide_console(_bench_table(results, runs))
        piped = not console.is_terminal  # whole lines, for grep
        base = next((r for r in results if benching.BASELINE in r.candidate.names), None)
        ratio = best.summary("decode_ratio")
        versus = f", {ratio['median']:.2f}x {benching.BASELINE}" if base is not None and ratio else ""
        console.print(f"[bold green]recommended:[/] {best.candidate.name} ({best.candidate.description}): "
                      f"decode {best.summary('decode_tps')['median']:.1f} t/s{versus}", soft_wrap=piped)
        for pattern, buft in best.candidate.placement.overrides:
            console.print(f"override: {pattern} -> {buft}", markup=False)
        for warning in warnings:
            console.print(f"[bold yellow]warning:[/] {warning}", soft_wrap=piped)
        for note in notes:
            console.print(f"[yellow]note:[/] {note}", soft_wrap=piped)
    if bugs:
        from ..verify import OutputsDiffer

        raise OutputsDiffer("BUG: " + "; ".join(c.describe() for c in bugs) + " (a placement must not change the output "
                            "beyond its kernels' rounding)")


def _drafting(model, draft: str, draft_max: int, n_ubatch: int, cpu_plan, notes: list[str], drafting_plan) -> list:
    """The candidates that run the plan with MTP drafts, planned by `drafting_plan()` for the MTP
    block's memory: none with --draft off or (auto) for a model without an MTP block."""
    from .. import bench as benching
    from ..draft import check_mtp, draft_setting, has_mtp
    from ..inventory import read_inventory
    from ..plan import Placement

    inv = read_inventory(model)
    if draft_setting(draft) == "off" or (draft == "auto" and not has_mtp(inv)):
        return []
    check_mtp(inv, draft_max, n_ubatch)  # e.g. --draft mtp on a model without a head: one line
    if cpu_plan is None:
        return [benching.Candidate("cpu-only", Placement.all_cpu(), "cpu-only", "everything on the CPU")
                .with_drafts(draft_max)]
    try:
        plan = drafting_plan()
    except UserError as e:
        notes.append(f"not measured with MTP drafts: {e}")
        return []
    if plan.shares:
        return [benching.spread_candidates(plan)[0].with_drafts(draft_max)]
    plans = [plan] if plan.expert_cache is None else [benching.without_expert_cache(plan), plan]
    return [c.with_drafts(draft_max) for p in plans for c in benching.plan_candidates(p)]


def _predict(model, results, the_plan, threads: int, refresh: bool, prompt_batch: int, kv_type: str,
             kv_cells: int) -> None:
    """Calibrate this machine (seconds, the first time or with `refresh`; kept in the cache folder)
    and add the speed model's predictions to `results`, attention reading `kv_cells` cells of a
    KV cache of `kv_type` per decoded token (where the runs' generation was halfway)."""
    from .. import bench as benching
    from ..calibration import plan_speeds
    from ..engine import default_threads
    from ..inventory import read_inventory

    inv = read_inventory(model)
    accelerator = the_plan.accelerator.name if the_plan is not None else None
    on_step = lambda step: log.logger.info("calibrating: %s", step)  # noqa: E731
    if the_plan is not None and the_plan.shares:
        from ..calibration import device_plan_speeds

        speeds, _ = device_plan_speeds(inv, [s.accelerator.name for s in the_plan.shares], threads or default_threads(),
                                       kv_type=kv_type, kv_cells=kv_cells, refresh=refresh, on_step=on_step)
    else:
        speeds, _ = plan_speeds(inv, accelerator, threads or default_threads(), kv_type=kv_type, kv_cells=kv_cells,
                                refresh=refresh, on_step=on_step)
    benching.add_predictions(results, speeds, prompt_batch)


def _wide_console(table: Table) -> Console:
    """Print `table` and return the console for the lines after it. On a terminal its cells fold to
    the window; through a pipe or into a file the console is as wide as the table, so nothing is cut."""
    console = out
    if not out.is_terminal:
        width = RichMeasurement.get(out, out.options.update_width(10_000), table).maximum
        console = Console(highlight=False, width=max(width, out.width))
    console.print(table)
    return console


def _predicted_cell(r) -> str:
    """The speed model's prompt / decode t/s, and how far the measured decode is from it."""
    if r.prediction is None:
        return "-"
    error = r.prediction_error("decode_tps")
    return f"{r.prediction.prompt_tps:.0f} / {r.prediction.decode_tps:.1f}" + (f" ({error:+.0%})" if error is not None else "")


def _drafts_cell(r) -> str:
    """The share of MTP drafts accepted and the mean accepted a round (median over the runs)."""
    share, mean = r.summary("draft_acceptance"), r.summary("mean_accepted")
    if mean is None:
        return "-"
    return (f"{share['median']:.0%}" if share else "0%") + f", {mean['median']:.2f}/round"


def _bench_table(results, runs: int) -> Table:
    table = Table(title=f"median over {runs} run(s), ± spread (max - min) as a share of it; predicted: prompt / decode "
                  "t/s from this machine's calibration (measured decode's difference from it)", title_justify="left",
                  box=None, pad_edge=False)
    columns = ("candidate", "mode", "experts on", "prompt t/s", "decode t/s", "predicted", "vs --cpu-moe", "TTFT ms",
               "cache hits", "drafts accepted", "peak accel", "peak RSS")
    for col in columns:
        table.add_column(col, justify="left" if col in ("candidate", "mode", "experts on") else "right", overflow="fold")

    def cell(result, figure: str, fmt, spread: bool = True) -> str:
        s = result.summary(figure)
        if s is None:
            return "-"
        share = f" ±{s['spread'] / s['median']:.0%}" if spread and s["median"] else ""
        return fmt(s["median"]) + share

    for r in results:
        table.add_row(
            r.candidate.name, r.candidate.mode, r.kernel_path,
            cell(r, "prompt_tps", lambda v: f"{v:.1f}"),
            cell(r, "decode_tps", lambda v: f"{v:.1f}"),
            _predicted_cell(r),
            cell(r, "decode_ratio", lambda v: f"{v:.2f}x"),
            cell(r, "ttft_seconds", lambda v: f"{v * 1e3:.1f}"),
            cell(r, "cache_hit_rate", lambda v: f"{v:.1%}", spread=False),
            _drafts_cell(r),
            cell(r, "peak_accelerator_bytes", human_bytes, spread=False),
            cell(r, "peak_rss_bytes", human_bytes, spread=False),
        )
    return table
