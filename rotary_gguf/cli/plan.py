"""`plan`: where every tensor goes for a VRAM budget, and `--check` against llama.cpp's allocations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..errors import UserError
from ..units import human_bytes
from ..defaults import CALIBRATIONS_KEPT, DEFAULT_BATCH, DEFAULT_FLASH_ATTN, DEFAULT_KV_TYPE
from ..draft import DEFAULT_DRAFT_MAX
from .app import (BatchOpt, CacheOpt, CtxOpt, DevicesOpt, FlashAttnOpt, JsonOpt, KvTypeOpt, MissesOpt, ModeOpt, ModelSourceArg,
                  ProfileOpt, ReserveOpt, RpcOpt, ThreadsOpt, UbatchOpt, VramOpt, app, cache_setting, out)
from .placement import context_for, plan_and_draft, plan_for
from .run import DraftMaxOpt, DraftOpt


@app.command()
def plan(
    model: ModelSourceArg,
    vram: VramOpt = None,
    reserve: ReserveOpt = None,
    ctx: CtxOpt = None,
    batch: BatchOpt = DEFAULT_BATCH,
    ubatch: UbatchOpt = None,
    kv_type: KvTypeOpt = DEFAULT_KV_TYPE,
    flash_attn: FlashAttnOpt = DEFAULT_FLASH_ATTN,
    mode: ModeOpt = "auto",
    rpc: RpcOpt = None,
    devices: DevicesOpt = None,
    expert_cache: CacheOpt = "auto",
    cache_misses: MissesOpt = "split",
    routing_profile: ProfileOpt = None,
    threads: ThreadsOpt = 0,
    calibrate: Annotated[
        bool, typer.Option("--calibrate", help="Measure this machine's speeds again (seconds; kept in the cache folder, "
                           "measured on first use otherwise) and show them. Each figure planned with is the "
                           f"median of the last {CALIBRATIONS_KEPT} measurements.")
    ] = False,
    check: Annotated[
        bool, typer.Option("--check", help="Also load the model with the plan and show what llama.cpp allocated.")
    ] = False,
    as_json: JsonOpt = False,
    draft: DraftOpt = "auto",
    draft_max: DraftMaxOpt = DEFAULT_DRAFT_MAX,
) -> None:
    """Decide where every tensor lives for a VRAM budget, predict each device's memory, and predict
    the prompt and decode speed of the candidates weighed (from this machine's calibration). With
    MTP drafts on, the memory table has the MTP block's lines."""
    context = context_for(model, ctx=ctx, batch=batch, ubatch=ubatch, kv_type=kv_type, flash_attn=flash_attn)
    calibrations = []

    def planner(n: int):
        return plan_for(model, vram=vram, reserve=reserve, context=context, mode=mode, rpc=rpc, devices=devices,
                        expert_cache=cache_setting(expert_cache), cache_misses=cache_misses,
                        routing_profile=routing_profile, threads=threads, calibrate=calibrate and not calibrations,
                        on_calibration=calibrations.append, draft_max=n)

    the_plan, _ = plan_and_draft(model, draft, draft_max, threads, planner)
    rows = _check_plan(model, the_plan) if check else None
    if as_json:
        summary = the_plan.to_json()
        if calibrate and calibrations:
            summary["calibration"] = calibrations[0].to_json()
            if len(calibrations) > 1:  # a plan over several devices: the others' speeds
                summary["device_calibrations"] = [c.accelerator.to_json() for c in calibrations[1:]]
        if rows is not None:
            summary["check"] = [{"device": d, "purpose": p, "predicted": pr, "actual": a} for d, p, pr, a in rows]
        print(json.dumps(summary, indent=2))
        return
    for calibration in calibrations if calibrate else ():
        _print_calibration(calibration)
    _print_plan(the_plan)
    if rows is not None:
        _print_check(rows, the_plan)


def _check_plan(model: Path, the_plan) -> list[tuple[str, str, int, int]]:
    """Load `model` with the plan (and its expert cache); (device, purpose, predicted, actual) for
    each buffer kind."""
    from ..demo import resolve_model
    from ..engine import Engine
    from ..experts.cache import ExpertCache
    from ..inventory import read_inventory

    model = resolve_model(model)  # a name must be pulled before it is loaded
    if not the_plan.accelerator.present:
        raise UserError(f"--check loads the model, and {the_plan.accelerator.name} is not on this machine")
    cache = ExpertCache.for_plan(the_plan, read_inventory(model))
    drafts = dict(draft="mtp", draft_max=the_plan.draft.draft_max) if the_plan.draft else {}
    with Engine.load(model, the_plan.placement, n_ctx=the_plan.ctx, n_batch=the_plan.n_batch, n_ubatch=the_plan.n_ubatch,
                     kv_type=the_plan.kv_type, flash_attn=the_plan.flash_attn, all_outputs=the_plan.all_outputs,
                     expert_cache=cache, **drafts) as engine:
        rows = the_plan.compare(engine.load_report)
        if cache is not None:
            rows.append(("accelerator", "expert_cache", the_plan.accelerator_use.expert_cache, cache.slot_bytes))
        return rows


def _print_plan(p) -> None:
    from ..plan import ESTIMATE_MARGIN_SHARE, DeviceUse

    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    acc = p.accelerator
    head.add_row("model", f"{p.model.name} ({p.model.arch}, {p.model.n_layer} blocks)")
    if p.shares:
        for s in p.shares:
            blocks = _ranges(s.layers) + (" and the output layer" if s.output else "")
            head.add_row(f"device {s.accelerator.name}", f"{s.accelerator.kind}, buffer type {s.accelerator.buffer_type}, "
                         f"budget {human_bytes(s.budget)}; blocks {blocks or 'none'} ({s.split} of "
                         f"{sum(x.split for x in p.shares)} llama.cpp layers)")
        head.add_row("budget", f"{human_bytes(p.budget)} in all ({p.budget_source}); {p.reserve_reason or 'no reserve'}")
    else:
        head.add_row("accelerator", f"{acc.name} ({acc.kind}), buffer type {acc.buffer_type}")
        given = f"{human_bytes(p.budget + p.reserve)} ({p.budget_source})"
        head.add_row("budget", f"{human_bytes(p.budget)}: {given} less {human_bytes(p.reserve)} {p.reserve_reason}"
                     if p.reserve else f"{given}; {p.reserve_reason or 'no reserve'}")
    head.add_row("host experts", f"{p.mode}: {p.mode_reason}")
    outputs = "logits of every token" if p.all_outputs else "logits of one token a batch"
    head.add_row("context", f"{p.ctx} tokens (largest that fits: {p.largest_ctx}), batch {p.n_batch}, micro-batch "
                 f"{p.n_ubatch}, KV cache {p.kv_type}, flash attention {p.flash_attn}, {outputs}")
    cache = p.expert_cache
    if cache and cache.split:
        line = (f"{cache.slots} slots per host block + a zero slot ({human_bytes(cache.bytes)}), split compute: misses "
                f"run on the CPU meanwhile, up to {human_bytes(cache.upload_budget)} uploaded between tokens; {cache.reason}")
    elif cache:
        line = f"{cache.slots} slots per host block ({human_bytes(cache.bytes)}), misses uploaded first: {cache.reason}"
    else:
        line = f"off: {p.expert_cache_reason}"
    head.add_row("expert cache", line)
    if p.draft:
        where = "accelerator" if p.draft.experts_resident else f"host ({p.host_buffer_type})"
        head.add_row("MTP drafts", f"up to {p.draft.draft_max} a round; the MTP block's experts live in {where}: "
                     f"{p.draft.reason}")
    out.print(head)

    blocks = Table(title="expert tensors per block", title_justify="left", box=None, pad_edge=False)
    columns = (("block", "right"), ("attention", "left"), ("experts", "right"), ("live in", "left"))
    for col, justify in columns + ((("block on", "left"),) if p.shares else ()):
        blocks.add_column(col, justify=justify)
    for i in range(p.model.n_layer):
        on = p.device_of(i)
        where = (f"{on.name if p.shares else 'accelerator'} ({on.buffer_type})" if i in p.resident
                 else f"host ({p.host_buffer_type})")
        block_on = [next(s.accelerator.name for s in p.shares if i in s.layers)] if p.shares else []
        blocks.add_row(str(i), p.model.attention[i], human_bytes(p.model.expert_bytes(i)), where, *block_on)
    out.print(blocks)

    pools = [(s.accelerator.name, s.use) for s in p.shares] or [("accelerator", p.accelerator_use)]
    pools.append(("host", p.host_use))
    totals = Table(title="predicted memory (~ = estimate)", title_justify="left", box=None, pad_edge=False)
    for col in ("", *(name for name, _ in pools)):
        totals.add_column(col, justify="right" if col else "left")
    for part in DeviceUse().parts():
        values = [getattr(use, part) for _, use in pools]
        if any(values):
            mark = "~" if part in DeviceUse.ESTIMATES else ""
            totals.add_row(part.replace("_", " "), *(mark + human_bytes(n) if n else "-" for n in values))
    totals.add_row("[bold]total[/]", *(f"[bold]{human_bytes(use.total)}[/]" for _, use in pools))
    if p.draft:  # already in the parts above: what drafting adds to them
        totals.add_row("[dim]of which MTP drafts:[/]", "", "")
        for part, a, h in p.draft.lines():
            mark = "~" if part.endswith("~") else ""
            totals.add_row(f"  {part.rstrip(' ~')}", *(mark + human_bytes(n) if n else "-" for n in (a, h)))
    out.print(totals)
    resident = len(p.resident)
    for s in p.shares:
        out.print(f"{s.accelerator.name}: {human_bytes(s.use.total)} of {human_bytes(s.budget)}, margin "
                  f"{human_bytes(s.margin)}; {len(s.resident)} expert blocks resident")
    out.print(
        f"{'accelerators' if p.shares else 'accelerator'}: {human_bytes(p.accelerator_use.total)} of "
        f"{human_bytes(p.budget)}, margin {human_bytes(p.margin)} "
        f"(at least {human_bytes(p.estimate_margin)} kept for the ~ estimates: {ESTIMATE_MARGIN_SHARE:.0%} of them); "
        f"{resident} of {resident + len(p.host_layers)} expert blocks resident (minimum budget {human_bytes(p.minimum_budget)})"
    )
    _print_predictions(p)
    for pattern, buft in p.overrides:
        out.print(f"override: {pattern} -> {buft}", markup=False)
    for note in p.notes:
        out.print(f"[yellow]note:[/] {note}")


def _ranges(layers) -> str:
    """Block indexes as ranges: 0-2, 5."""
    runs: list[list[int]] = []
    for i in layers:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def _print_predictions(p) -> None:
    if not p.predictions:
        return
    table = Table(title=f"predicted speed ({p.speeds_source})", title_justify="left", box=None, pad_edge=False)
    for col in ("candidate", "prompt t/s", "decode t/s", "ms: weights", "kv", "state", "experts", "host", "graph",
                "splits"):
        table.add_column(col, justify="left" if col == "candidate" else "right")
    for name, pred in p.predictions:
        parts = pred.decode_parts
        table.add_row(name, f"{pred.prompt_tps:.0f}", f"{pred.decode_tps:.1f}",
                      *(f"{parts[k] * 1e3:.2f}" for k in ("weights", "kv cache", "recurrent", "resident experts",
                                                          "host experts", "graph", "splits")))
    out.print(table)
    out.print("decode ms by part; kv: KV cache reads, experts: resident, host: host experts")


def _print_calibration(cal) -> None:
    """This machine's calibration: throughput per device and weight type (a prompt's expert FFN
    at each share of tokens per expert), then each device's fixed costs."""
    devices = [d for d in (cal.cpu, cal.accelerator) if d is not None]
    shares = sorted({k for dev in devices for by_share in dev.prompt_experts.values() for k in by_share})
    kept = len(cal.measurements)
    medians = f"medians of the last {kept} measurements" if kept > 1 else "one measurement"
    rates = Table(title=f"calibration ({medians}; measuring took {cal.seconds:.1f} s; kept in {cal.path}), GB/s",
                  title_justify="left", box=None, pad_edge=False)
    for col in ("device", "type", "decode", "prompt", "experts", *(f"x{k}" for k in shares)):
        rates.add_column(col, justify="left" if col in ("device", "type") else "right")
    for dev in devices:
        for i, name in enumerate(sorted(dev.decode) + sorted(dev.prompt_experts)):  # the types, then the expert FFNs
            by_share = dev.prompt_experts.get(name, {})
            rates.add_row(dev.name if i == 0 else "", name, *(f"{rates_of[name] / 1e9:.1f}" if name in rates_of else "-"
                                                              for rates_of in (dev.decode, dev.prompt, dev.experts)),
                          *(f"{by_share[k] / 1e9:.1f}" if k in by_share else "-" for k in shares))
    out.print(rates)
    out.print("experts: the expert op at decode; xN: a prompt's expert FFN (gate/up/down types, n_embd x n_ff), "
              "N tokens on each expert the batch selects")

    def us(seconds: float | None, digits: int = 1) -> str:
        return "-" if seconds is None else f"{seconds * 1e6:.{digits}f}"

    fixed = Table(title="fixed costs", title_justify="left", box=None, pad_edge=False)
    for col in ("device", "graph us", "op us", "copy us", "host block us", "state GB/s", "upload GB/s",
                "expert uploads GB/s"):
        fixed.add_column(col, justify="left" if col == "device" else "right")
    copy_sizes = sorted({k for dev in devices for k in dev.expert_uploads})
    for dev in devices:
        upload = "/".join(f"{v / 1e9:.1f}" for v in (dev.upload_pinned, dev.upload_pageable) if v) or "-"
        state = "/".join(f"{v / 1e9:.1f}" for v in (dev.recurrent, dev.prompt_recurrent) if v) or "-"
        expert_uploads = "/".join(f"{dev.expert_uploads[k] / 1e9:.1f}" for k in copy_sizes if k in dev.expert_uploads)
        fixed.add_row(dev.name, us(dev.graph_seconds), us(dev.op_seconds, 2), us(dev.copy_seconds),
                      us(dev.host_block_seconds), state, upload, expert_uploads or "-")
    out.print(fixed)
    sizes = " / ".join(human_bytes(k) for k in copy_sizes)
    out.print("state: the recurrent update at decode / in a prompt; upload: from page-locked / ordinary memory"
              + (f"; expert uploads: an expert cache's, in copies of {sizes}" if sizes else ""))
    for name, by_threads in sorted(cal.cpu_decode_by_threads.items()):
        out.print(f"CPU {name} decode by threads: " + ", ".join(f"{n}: {v / 1e9:.1f} GB/s" for n, v in sorted(by_threads.items())))


def _print_check(rows: list[tuple[str, str, int, int]], the_plan) -> None:
    table = Table(title="predicted vs allocated by llama.cpp", title_justify="left", box=None, pad_edge=False)
    for col in ("device", "purpose", "predicted", "allocated"):
        table.add_column(col, justify="left" if col in ("device", "purpose") else "right")
    for device, purpose, predicted, actual in rows:
        if predicted or actual:
            table.add_row(device, purpose.replace("_", " "), human_bytes(predicted), human_bytes(actual))
    out.print(table)
    if the_plan.placement.use_mmap:
        out.print("[dim]host weights in a mapped buffer count the file span they lie in (paged in on use)[/]")
