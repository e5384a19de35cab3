"""The plan for this machine: the accelerator found (or --rpc, or --vram for a GPU not here), or
several (--rpc A,B, --devices, several GPUs), the budget less a display and driver reserve, the
host-expert mode measured where it must be, and the CPU when there is nothing to fill."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

from .. import log
from ..errors import UserError
from ..units import human_bytes
from .app import device_names, misses_setting, rpc_endpoints


def context_for(model, *, ctx: Optional[int], batch: int, ubatch: Optional[int], kv_type: str, flash_attn: str):
    """The context settings for `model` (a file, or a model on the Hub: its header), checked
    (`ctx` None: the model's default)."""
    from ..demo import model_inventory
    from ..plan import context_settings

    return context_settings(model_inventory(model), ctx, batch, ubatch, kv_type, flash_attn)


def budget_for(accelerator, vram: Optional[str], reserve: Optional[str]) -> tuple[int, str, int, str]:
    """(budget, where it comes from, reserve, why) for `accelerator` (None: a GPU not here): the
    --vram size or the free memory reported, less the reserve kept for the display and driver."""
    from ..plan import CARD_RESERVE, FREE_MEMORY_RESERVE
    from ..units import parse_size

    if vram is not None:
        given, source = parse_size(vram, "--vram"), "--vram"
        default, why = CARD_RESERVE, "display and driver reserve (a --vram size is the card's: CUDA context, desktop)"
    elif accelerator is None:
        raise UserError("no GPU here and no --rpc: pass --vram SIZE to plan for a GPU with that much memory")
    else:
        given, source = accelerator.free_bytes, f"free memory {accelerator.name} reports"
        default, why = FREE_MEMORY_RESERVE, "display and driver reserve (room for their growth after the plan)"
    if reserve is not None:
        amount, why = parse_size(reserve, "--reserve"), "display and driver reserve (--reserve)"
    elif accelerator is not None and not accelerator.streams_host_ops:
        amount, why = 0, "no display and driver reserve: an RPC device drives no display"
    else:
        amount = default
    if amount >= given:
        raise UserError(f"a VRAM budget of {human_bytes(given)} ({source}) is too small: the {human_bytes(amount)} "
                        f"{why.split(' (')[0]} takes all of it; pass a larger --vram, or --reserve SIZE (0 on a GPU "
                        "that drives no display)")
    return given - amount, source, amount, why


def accelerators_for(rpc: Optional[str], devices: Optional[str]) -> list:
    """The accelerators a plan may use (`native.find_accelerators`): --devices among this machine's
    GPUs and the --rpc servers; by default every one of them (none: no GPU here and no --rpc)."""
    from .. import native

    return native.find_accelerators(rpc_endpoints(rpc), device_names(devices))


def vram_sizes(vram: Optional[str], n_devices: int) -> list[Optional[str]]:
    """--vram for each of `n_devices` devices: one size for each, or one per device."""
    sizes = [part.strip() for part in vram.split(",")] if vram is not None else [None]
    if len(sizes) == 1:
        return sizes * n_devices
    if len(sizes) != n_devices:
        raise UserError(f"--vram gives {len(sizes)} sizes for {n_devices} device{'s' if n_devices > 1 else ''}: "
                        "give one size for each, or one per device in --devices order")
    return sizes


def plan_for(model: Path, *, vram: Optional[str], context, mode: str, rpc: Optional[str], reserve: Optional[str] = None,
             expert_cache: str | int = "off", cache_misses: str = "split", routing_profile: Optional[Path] = None,
             all_outputs: bool = False, threads: int = 0, calibrate: bool = False, on_calibration=None,
             devices: Optional[str] = None, draft_max: int = 0):
    """The plan for `model` on this machine's accelerator (or the RPC device at `rpc`, or a GPU
    this machine lacks, sized by `vram`), or over several (`rpc` servers and `devices`; see
    `spread_plan_for`), with the context settings `context`, and the expert cache
    `expert_cache` ("auto", "off" or slots per block). Decides the host-expert mode before loading
    anything. In cpu mode the speed model weighs the candidates, from this machine's calibration
    (measured on first use, again with `calibrate`; `on_calibration` gets it) at `threads` CPU
    threads (0: the engine's default). `draft_max` > 0 plans for MTP drafts of that many tokens."""
    import os

    from .. import native
    from ..demo import model_inventory
    from ..plan import HOST_MODES, ROTARY_OFFLOAD_MIN_BATCH, Accelerator, ModelFigures, choose_mode, make_plan

    if mode not in (*HOST_MODES, "auto"):
        raise UserError(f"unknown --mode {mode!r}: use auto, cpu or rotary")
    misses_setting(cache_misses)
    found = accelerators_for(rpc, devices)
    if len(found) > 1:
        spread = spread_plan_for(model, found, vram=vram, context=context, mode=mode, reserve=reserve,
                                 expert_cache=expert_cache, all_outputs=all_outputs, threads=threads,
                                 calibrate=calibrate, on_calibration=on_calibration)
        unplanned = ("the memory of MTP drafts is planned on one device: not counted over several",)
        return replace(spread, notes=spread.notes + unplanned) if draft_max else spread
    (vram,) = vram_sizes(vram, 1)
    inv = model_inventory(model)  # a name not pulled yet: its header, read from the Hub
    figures = ModelFigures.from_inventory(inv)
    hit_rates = None
    if routing_profile is not None:
        from ..plan import HitRates
        from ..profile_io import load_profile

        hit_rates = HitRates.from_profile(load_profile(routing_profile, inv))
    if mode == "rotary":
        native.set_offload_min_batch(ROTARY_OFFLOAD_MIN_BATCH)  # read once, when the GPU backend loads
    accelerator = found[0] if found else None
    budget, source, reserved, reserve_reason = budget_for(accelerator, vram, reserve)
    notes: list[str] = []
    if vram is None and not accelerator.streams_host_ops:
        notes.append(f"{accelerator.name} reports the RPC server's free RAM; pass --vram to simulate a smaller GPU")
    if accelerator is None:
        accelerator = Accelerator.planned_cuda()
        notes.append(f"no GPU on this machine: planning for a CUDA GPU with {human_bytes(budget + reserved)}")
    elif vram is not None and accelerator.free_bytes is not None and budget > accelerator.free_bytes:
        notes.append(f"the budget is more than the {human_bytes(accelerator.free_bytes)} {accelerator.name} reports free")
    options = dict(budget_source=source, reserve=reserved, reserve_reason=reserve_reason, notes=tuple(notes),
                   all_outputs=all_outputs, draft_max=draft_max, **context.plan_options())
    link = None
    if mode == "auto" and accelerator.present and accelerator.streams_host_ops:
        cpu_plan = make_plan(figures, accelerator, budget, mode="cpu", **options)
        if cpu_plan.host_layers:
            expert_type = next(t.ggml_type for t in inv.expert_tensors if t.layer == cpu_plan.host_layers[0])
            link = native.measure_link(accelerator, expert_type, inv.n_embd, os.cpu_count() or 1)
        chosen, reason = choose_mode(mode, accelerator, cpu_plan, link)
    else:
        chosen, reason = choose_mode(mode, accelerator)
    speeds = None
    plan_options = dict(mode=chosen, mode_reason=reason, expert_cache=expert_cache, cache_misses=cache_misses,
                        cpu_expert_bytes_per_s=link.cpu_expert_bytes_per_s if link else None,
                        upload_bytes_per_s=link.upload_bytes_per_s if link else None, hit_rates=hit_rates, **options)
    if chosen == "cpu":
        make_plan(figures, accelerator, budget, **plan_options)  # a budget that cannot hold it fails before measuring
        from ..calibration import plan_speeds
        from ..engine import default_threads

        speeds, calibration = plan_speeds(inv, accelerator.name if accelerator.present else None,
                                          threads or default_threads(), kv_type=context.kv_type, refresh=calibrate,
                                          on_step=lambda step: log.logger.info("calibrating: %s", step))
        if on_calibration is not None:
            on_calibration(calibration)
    return make_plan(figures, accelerator, budget, speeds=speeds, **plan_options)


def spread_plan_for(model: Path, accelerators: list, *, vram: Optional[str], context, mode: str,
                    reserve: Optional[str] = None, expert_cache: str | int = "off", all_outputs: bool = False,
                    threads: int = 0, calibrate: bool = False, on_calibration=None):
    """The plan for `model` over several `accelerators` (`plan.make_spread_plan`): each one's budget
    from `vram` (one size for each, or one per device) or the free memory it reports, less its
    reserve; host experts on the CPU; the devices' speeds from this machine's calibration."""
    from ..calibration import device_plan_speeds
    from ..demo import model_inventory
    from ..engine import default_threads
    from ..plan import ModelFigures, make_spread_plan

    if mode == "rotary":
        raise UserError("rotary mode streams host experts to one GPU: pick it with --devices NAME")
    if not isinstance(expert_cache, str):
        raise UserError(f"the expert cache uses one accelerator: --expert-cache {expert_cache} needs one device "
                        "(--devices NAME)")
    inv = model_inventory(model)
    figures = ModelFigures.from_inventory(inv)
    devices, notes, reserves = [], [], set()
    for acc, size in zip(accelerators, vram_sizes(vram, len(accelerators))):
        budget, source, reserved, reason = budget_for(acc, size, reserve)
        devices.append((acc, budget))
        reserves.add((reserved, reason))
        if size is None and not acc.streams_host_ops:
            notes.append(f"{acc.name} reports the RPC server's free RAM; pass --vram to simulate a smaller GPU")
    reserved, reason = max(reserves)
    source = "--vram" if vram is not None else "free memory each device reports"
    mode_reason = "host experts run on the CPU in a plan over several devices (rotary mode and the expert cache use one)"
    options = dict(budget_source=source, mode="cpu", mode_reason=mode_reason, reserve=reserved, reserve_reason=reason,
                   notes=tuple(notes), all_outputs=all_outputs, **context.plan_options())
    make_spread_plan(figures, devices, **options)  # budgets that cannot hold it fail before measuring
    speeds, calibrations = device_plan_speeds(inv, [acc.name for acc in accelerators], threads or default_threads(),
                                              kv_type=context.kv_type, refresh=calibrate,
                                              on_step=lambda step: log.logger.info("calibrating: %s", step))
    if on_calibration is not None:
        for calibration in calibrations:
            on_calibration(calibration)
    return make_spread_plan(figures, devices, speeds=speeds, **options)


def plan_or_cpu(model: Path, *, vram: Optional[str], mode: str, context, rpc: Optional[str], reserve: Optional[str] = None,
                expert_cache: str | int = "off", cache_misses: str = "split", routing_profile: Optional[Path] = None,
                all_outputs: bool = False, threads: int = 0, devices: Optional[str] = None, draft_max: int = 0):
    """The plan for MoE `model` when there is an accelerator to fill (a GPU, the RPC devices at
    `rpc`, those named in `devices`), else None: everything runs on the CPU (always so for a dense
    model)."""
    from .. import native
    from ..inventory import read_inventory

    misses_setting(cache_misses)
    if not read_inventory(model).is_moe:
        return None

    if (vram is None and rpc is None and devices is None and mode != "rotary"
            and not any(d.is_local_gpu for d in native.devices())):
        return None
    the_plan = plan_for(model, vram=vram, context=context, mode=mode, rpc=rpc, reserve=reserve, expert_cache=expert_cache,
                        cache_misses=cache_misses, routing_profile=routing_profile, all_outputs=all_outputs,
                        threads=threads, devices=devices, draft_max=draft_max)
    if not the_plan.accelerator.present:
        raise UserError(f"there is no GPU on this machine to fill with --vram {vram}; use --rpc HOST:PORT for a simulated one")
    return the_plan


_SAID: set[str] = set()


def plan_and_draft(model: Path, draft: str, draft_max: int, threads: int, planner):
    """(the plan or None, "mtp" or "off") for --draft `draft`, with `planner(draft_max)` the plan
    for drafts of that many tokens (0: none; None for the CPU alone): `mtp` plans for drafts, `off`
    for none, and `auto` drafts where the model has an MTP block and `bench` recorded drafts as
    faster on this machine for the placement drafting gets (`draft.verdict`); without a record it
    says once how to get one."""
    from ..demo import model_inventory
    from ..draft import draft_setting, has_mtp
    from ..draft import verdict as verdicts
    from ..engine import default_threads
    from ..plan import Placement

    if draft_setting(draft) == "off" or (draft == "auto" and not has_mtp(model_inventory(model))):
        return planner(0), "off"
    try:
        drafting = planner(draft_max)
    except UserError:
        if draft == "mtp":
            raise
        return planner(0), "off"  # no room for the MTP block beside the rest
    if draft == "mtp":
        return drafting, "mtp"
    placement, cache = (drafting.placement, drafting.expert_cache) if drafting else (Placement.all_cpu(), None)
    key = verdicts.setup_key(model, placement, cache.slots if cache else None, bool(cache and cache.split), draft_max,
                             threads or default_threads())
    found = verdicts.lookup(key)
    if found is not None and found.faster:
        log.logger.info("MTP drafts on (--draft auto): %s", found.describe())
        return drafting, "mtp"
    if found is not None:
        log.logger.info("MTP drafts off (--draft auto): %s", found.describe())
    elif model.name not in _SAID:
        _SAID.add(model.name)
        log.logger.info("MTP drafts off (--draft auto): not measured for %s with this placement on this machine yet; "
                        "`rotary-gguf bench %s` with the same options decides it (or --draft mtp)", model.name, model.name)
    return planner(0), "off"
