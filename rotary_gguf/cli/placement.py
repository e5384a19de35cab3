"""The plan for this machine: the accelerator found (or --rpc, or --vram for a GPU not here), the
host-expert mode measured where it must be, and the CPU when there is nothing to fill."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..errors import UserError
from ..units import human_bytes
from .app import misses_setting


def plan_for(model: Path, *, vram: Optional[str], ctx: int, n_batch: int, mode: str, rpc: Optional[str],
             expert_cache: str | int = "off", cache_misses: str = "split", routing_profile: Optional[Path] = None):
    """The plan for `model` on this machine's accelerator (or the RPC device at `rpc`, or a GPU
    this machine lacks, sized by `vram`), with the expert cache `expert_cache` ("auto", "off" or
    slots per block). Decides the host-expert mode before loading anything."""
    import os

    from .. import native
    from ..demo import model_inventory
    from ..plan import HOST_MODES, ROTARY_OFFLOAD_MIN_BATCH, Accelerator, ModelFigures, choose_mode, make_plan
    from ..units import parse_size

    if mode not in (*HOST_MODES, "auto"):
        raise UserError(f"unknown --mode {mode!r}: use auto, cpu or rotary")
    misses_setting(cache_misses)
    inv = model_inventory(model)  # a name not pulled yet: its header, read from the Hub
    figures = ModelFigures.from_inventory(inv)
    hit_rates = None
    if routing_profile is not None:
        from ..plan import HitRates
        from ..profile_io import load_profile

        hit_rates = HitRates.from_profile(load_profile(routing_profile, inv))
    if mode == "rotary":
        native.set_offload_min_batch(ROTARY_OFFLOAD_MIN_BATCH)  # read once, when the GPU backend loads
    accelerator = native.find_accelerator(rpc)
    notes: list[str] = []
    if vram is not None:
        budget, source = parse_size(vram), "--vram"
    elif accelerator is None:
        raise UserError("no GPU here and no --rpc: pass --vram SIZE to plan for a GPU with that much free memory")
    else:
        budget, source = accelerator.free_bytes, f"free memory {accelerator.name} reports"
        if not accelerator.streams_host_ops:
            notes.append(f"{accelerator.name} reports the RPC server's free RAM; pass --vram to simulate a smaller GPU")
    if accelerator is None:
        accelerator = Accelerator.planned_cuda()
        notes.append(f"no GPU on this machine: planning for a CUDA GPU with {human_bytes(budget)} free")
    elif accelerator.free_bytes is not None and budget > accelerator.free_bytes:
        notes.append(f"the budget is more than the {human_bytes(accelerator.free_bytes)} {accelerator.name} reports free")
    options = dict(budget_source=source, ctx=ctx, n_batch=n_batch, notes=tuple(notes))
    link = None
    if mode == "auto" and accelerator.present and accelerator.streams_host_ops:
        cpu_plan = make_plan(figures, accelerator, budget, mode="cpu", **options)
        if cpu_plan.host_layers:
            expert_type = next(t.ggml_type for t in inv.expert_tensors if t.layer == cpu_plan.host_layers[0])
            link = native.measure_link(accelerator, expert_type, inv.n_embd, os.cpu_count() or 1)
        chosen, reason = choose_mode(mode, accelerator, cpu_plan, link)
    else:
        chosen, reason = choose_mode(mode, accelerator)
    return make_plan(figures, accelerator, budget, mode=chosen, mode_reason=reason, expert_cache=expert_cache,
                     cache_misses=cache_misses, cpu_expert_bytes_per_s=link.cpu_expert_bytes_per_s if link else None,
                     upload_bytes_per_s=link.upload_bytes_per_s if link else None, hit_rates=hit_rates, **options)


def plan_or_cpu(model: Path, *, vram: Optional[str], mode: str, ctx: int, n_batch: int, rpc: Optional[str],
                expert_cache: str | int = "off", cache_misses: str = "split", routing_profile: Optional[Path] = None):
    """The plan for MoE `model` when there is an accelerator to fill (a GPU, or the RPC device at
    `rpc`), else None: everything runs on the CPU (always so for a dense model)."""
    from .. import native
    from ..inventory import read_inventory

    misses_setting(cache_misses)
    if not read_inventory(model).is_moe:
        return None

    if vram is None and rpc is None and mode != "rotary" and not any(d.is_local_gpu for d in native.devices()):
        return None
    the_plan = plan_for(model, vram=vram, ctx=ctx, n_batch=n_batch, mode=mode, rpc=rpc, expert_cache=expert_cache,
                        cache_misses=cache_misses, routing_profile=routing_profile)
    if not the_plan.accelerator.present:
        raise UserError(f"there is no GPU on this machine to fill with --vram {vram}; use --rpc HOST:PORT for a simulated one")
    return the_plan
