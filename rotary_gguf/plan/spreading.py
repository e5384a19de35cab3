"""Plans over several accelerators (two GPUs, a GPU and ggml-rpc servers, several ggml-rpc
servers): llama.cpp's layer split, the resident expert blocks spread over the devices, and each
device's memory.

llama.cpp gives its layers (the blocks, any NextN block, then the output layer) to the devices in
the order they are listed, in contiguous runs sized by `tensor_split` (src/llama-model.cpp,
load_tensors: layer il goes to the first device whose cumulative share of the split exceeds
il / layers). The plan passes the layer counts themselves as the split, so the assignment is exact
whatever the devices report free; the counts follow the devices' budgets, as llama.cpp's default
split follows their free memory. A block's tensors other than its routed experts, its KV cache
and its recurrent state live on its block's device, the output layer on the last device's.

Then the expert blocks, largest first (ties: later blocks): each device, the one that computes
experts fastest first, takes the blocks of its own layers while they fit (no crossing between
devices), then blocks still in host memory while they fit (two crossings each: with the devices'
speeds known, only where the speed model predicts a faster token); the rest stay in host memory
for the CPU. An expert cache and rotary streaming stay single-device: a plan over several devices
runs its host experts on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from ..errors import UserError
from ..speed_model import Layout, PlanSpeeds, Prediction
from ..units import human_bytes
from .budget import estimate_margin, largest_fitting_ctx
from .figures import Accelerator, ModelFigures
from .memory import (DeviceUse, accelerator_compute_bytes, host_compute_bytes, kv_cache_bytes, recurrent_state_bytes,
                     staging_bytes, ubatch_tokens)
from .placing import DeviceShare, Plan, make_plan, speed_layout, spread_layout
from .settings import DEFAULT_BATCH, DEFAULT_CTX, DEFAULT_FLASH_ATTN, DEFAULT_KV_TYPE, FLASH_ATTN

SINGLE_DEVICE_CACHE = "the expert cache uses one accelerator: it is off in a plan over several devices"


def layer_split(n_layers: int, budgets: Sequence[int]) -> list[int]:
    """llama.cpp layers per device, in proportion to the budgets (largest remainders round up)."""
    total = sum(budgets)
    exact = [n_layers * b / total for b in budgets]
    counts = [int(x) for x in exact]
    for d in sorted(range(len(budgets)), key=lambda d: (counts[d] - exact[d], d))[: n_layers - sum(counts)]:
        counts[d] += 1
    return counts


def layers_by_device(counts: Sequence[int], n_layer: int, n_nextn: int = 0) -> tuple[list[tuple[int, ...]], int]:
    """The blocks each device holds under llama.cpp's split `counts`, and the device of the output
    layer (llama.cpp's layer n_layer + n_nextn)."""
    bounds = [sum(counts[: d + 1]) for d in range(len(counts))]

    def device(il: int) -> int:
        return next(d for d, bound in enumerate(bounds) if bound > il)

    blocks = [tuple(i for i in range(n_layer) if device(i) == d) for d in range(len(counts))]
    return blocks, device(n_layer + n_nextn)


def make_spread_plan(
    model: ModelFigures,
    devices: Sequence[tuple[Accelerator, int]],
    *,
    budget_source: str = "--vram",
    mode: str = "cpu",
    mode_reason: str = "",
    ctx: int = DEFAULT_CTX,
    n_batch: int = DEFAULT_BATCH,
    kv_type: str = DEFAULT_KV_TYPE,
    n_ubatch: int | None = None,
    flash_attn: str = DEFAULT_FLASH_ATTN,
    all_outputs: bool = False,
    reserve: int = 0,
    reserve_reason: str = "",
    notes: tuple[str, ...] = (),
    expert_cache: str | int = "off",
    speeds: PlanSpeeds | None = None,
) -> Plan:
    """A plan over several accelerators, each with its budget (`devices`: (accelerator, budget)
    in llama.cpp's device order; see the module's docstring). `reserve` is what was kept off each
    budget. With `speeds` (each device's in `speeds.devices`), the devices fill fastest first and
    the plan carries its predicted speed beside each device's alone."""
    if len(devices) < 2:
        raise UserError("a plan over several devices needs at least two")
    if mode != "cpu":
        raise UserError(f"{mode} mode streams host experts to one GPU: plan it on one device (--devices NAME)")
    if not isinstance(expert_cache, str):
        raise UserError(f"the expert cache uses one accelerator: plan {expert_cache} slots on one device (--devices NAME)")
    if flash_attn not in FLASH_ATTN:
        raise UserError(f"unknown flash attention setting {flash_attn!r} (known: {', '.join(FLASH_ATTN)})")
    n_ubatch = n_batch if n_ubatch is None else n_ubatch
    if ctx < 1 or n_batch < 1 or n_ubatch < 1:
        raise UserError("the context and batch sizes must be at least 1")
    n_batch = ubatch_tokens(ctx, n_batch)
    n_ubatch = min(n_batch, n_ubatch)
    accelerators = [a for a, _ in devices]
    budgets = [b for _, b in devices]
    counts = layer_split(model.n_layer + model.n_nextn + 1, budgets)
    blocks, output = layers_by_device(counts, model.n_layer, model.n_nextn)
    layers = [i for i in range(model.n_layer) if model.expert_bytes(i)]
    flash = flash_attn != "off"

    def fixed(d: int, at_ctx: int) -> DeviceUse:
        """Device d's bytes whatever the experts do, at a context of `at_ctx` tokens."""
        mine, has_output = blocks[d], d == output
        n_full = model.attention.count("full")
        n_linear = model.attention.count("linear")
        full_here = sum(model.attention[i] == "full" for i in mine)
        linear_here = sum(model.attention[i] == "linear" for i in mine)
        streams = d == _streaming_device(accelerators)
        staging = staging_bytes(model, accelerators[d], layers, mode, ubatch_tokens(at_ctx, n_ubatch)) if streams else 0
        return DeviceUse(
            weights=sum(model.block_weight_bytes(i) for i in mine) + (model.output_weight_bytes if has_output else 0),
            kv_cache=kv_cache_bytes(model, at_ctx, kv_type) // n_full * full_here if n_full else 0,
            recurrent_state=recurrent_state_bytes(model) // n_linear * linear_here if n_linear else 0,
            compute=accelerator_compute_bytes(model, at_ctx, n_ubatch, flash, all_outputs, has_output)
            if mine or has_output else 0,
            staging=staging,
            runtime_reserve=accelerators[d].runtime_reserve,
        )

    base = [fixed(d, ctx) for d in range(len(devices))]
    margins = [estimate_margin(use) for use in base]
    rooms = [budget - margin for budget, margin in zip(budgets, margins)]
    for d, use in enumerate(base):
        if use.total > rooms[d]:
            raise UserError(
                f"a budget of {human_bytes(budgets[d])} for {accelerators[d].name} is too small for the {len(blocks[d])} "
                f"blocks{' and the output layer' if d == output else ''} llama.cpp gives it ({counts[d]} of "
                f"{sum(counts)} layers, in proportion to the budgets): it needs at least "
                f"{human_bytes(use.total + margins[d])}; give it more, or leave it out (--devices)")
    resident: list[list[int]] = [[] for _ in devices]
    used = [use.total for use in base]

    def shares_now() -> tuple[DeviceShare, ...]:
        return tuple(
            DeviceShare(acc, budgets[d], blocks[d], d == output, counts[d], tuple(sorted(resident[d])),
                        replace(base[d], weights=base[d].weights + sum(model.expert_bytes(i) for i in resident[d])))
            for d, acc in enumerate(accelerators))

    def layout_of(shares: tuple[DeviceShare, ...]) -> Layout:
        host = [i for i in layers if not any(i in s.resident for s in shares)]
        return replace(speed_layout(model, accelerators[0], None, host), **spread_layout(shares, model.n_layer))

    def decode_tps() -> float:
        return speeds.predict(layout_of(shares_now())).decode_tps

    def take(d: int, candidates, only_if_faster: bool) -> None:
        for i in candidates:
            if used[d] + model.expert_bytes(i) > rooms[d] or any(i in r for r in resident):
                continue
            before = decode_tps() if only_if_faster and speeds else 0.0
            resident[d].append(i)
            if before and decode_tps() <= before:
                resident[d].pop()  # computed on another device, it would cost more crossings than it saves
                continue
            used[d] += model.expert_bytes(i)

    by_size = sorted(layers, key=lambda i: (-model.expert_bytes(i), -i))
    order = _fastest_first(accelerators, layers, speeds)
    for d in order:
        take(d, [i for i in by_size if i in blocks[d]], only_if_faster=False)
    for d in order:
        take(d, by_size, only_if_faster=True)
    shares = shares_now()
    on_accelerators = {i for r in resident for i in r}
    host_layers = [i for i in layers if i not in on_accelerators]
    total = DeviceUse(**{part: sum(getattr(s.use, part) for s in shares) for part in DeviceUse().parts()})
    layout = layout_of(shares)
    predictions = _weighed(model, devices, layout, layers, speeds, ctx=ctx, n_batch=n_batch, n_ubatch=n_ubatch,
                           kv_type=kv_type, flash_attn=flash_attn, all_outputs=all_outputs) if speeds else ()
    faster = [(name, p) for name, p in predictions[1:]
              if name.endswith(" alone") and p.decode_tps > predictions[0][1].decode_tps]
    if faster:
        name, p = max(faster, key=lambda item: item[1].decode_tps)
        notes += (f"{name} is predicted to decode faster than this plan ({p.decode_tps:.1f} vs "
                  f"{predictions[0][1].decode_tps:.1f} t/s); --devices {name.removesuffix(' alone')} plans for it alone",)
    return Plan(
        model=model,
        accelerator=accelerators[0],
        budget=sum(budgets),
        budget_source=budget_source,
        mode=mode,
        mode_reason=mode_reason or "host experts run on the CPU in a plan over several devices",
        ctx=ctx,
        n_batch=n_batch,
        kv_type=kv_type,
        resident=frozenset(on_accelerators),
        accelerator_use=total,
        host_use=DeviceUse(
            weights=model.embedding_bytes + sum(model.expert_bytes(i) for i in host_layers),
            compute=host_compute_bytes(model, ctx, n_ubatch, bool(host_layers), flash),
            output=4 * model.n_vocab,
        ),
        minimum_budget=sum(use.total + margin for use, margin in zip(base, margins)),
        n_ubatch=n_ubatch,
        flash_attn=flash_attn,
        all_outputs=all_outputs,
        reserve=reserve,
        reserve_reason=reserve_reason,
        estimate_margin=sum(margins),
        largest_ctx=_largest_ctx(model, budgets, fixed),
        notes=notes,
        expert_cache=None,
        expert_cache_reason=SINGLE_DEVICE_CACHE,
        predictions=predictions,
        speeds_source=speeds.source if speeds else "",
        shares=shares,
    )


def _streaming_device(accelerators: Sequence[Accelerator]) -> int | None:
    """The device llama.cpp's scheduler hands host-resident ops of large batches to: the first one
    whose backend offloads them (CUDA), if any."""
    return next((d for d, a in enumerate(accelerators) if a.streams_host_ops), None)


def _fastest_first(accelerators: Sequence[Accelerator], layers: list[int], speeds: PlanSpeeds | None) -> list[int]:
    """Device indexes, the one that computes a decoded token's experts fastest first (as listed
    when their speeds are not known)."""
    indexes = list(range(len(accelerators)))
    if speeds is None or not layers or not all(a.name in speeds.devices for a in accelerators):
        return indexes
    block = max(layers, key=lambda i: sum(speeds.weights.expert.get(i, {}).values()))
    return sorted(indexes, key=lambda d: speeds.weights.used_seconds(block, speeds.devices[accelerators[d].name], "decode"))


def _largest_ctx(model: ModelFigures, budgets: Sequence[int], fixed) -> int:
    """The largest context (at most the trained one) whose fixed part, with its margin, fits every
    device's budget; 0 when not even MIN_CTX tokens fit."""
    def fits(ctx: int) -> bool:
        return all(use.total + estimate_margin(use) <= budget
                   for use, budget in ((fixed(d, ctx), budget) for d, budget in enumerate(budgets)))

    return largest_fitting_ctx(model, fits)


def _weighed(model: ModelFigures, devices: Sequence[tuple[Accelerator, int]], layout: Layout, layers: list[int],
             speeds: PlanSpeeds, **options) -> tuple[tuple[str, Prediction], ...]:
    """Predicted speeds of the plan beside each device alone (its own single-device plan within its
    budget, where that fits), llama.cpp's --cpu-moe on the first device, and the CPU alone."""
    out = [("this plan", speeds.predict(layout))]
    for acc, budget in devices:
        alone = replace(speeds, accelerator=speeds.devices.get(acc.name, speeds.accelerator))
        try:
            single = make_plan(model, acc, budget, mode="cpu", expert_cache="off", **options)
        except UserError:  # its budget cannot hold every block's other tensors
            continue
        out.append((f"{acc.name} alone", alone.predict(single.speed_layout(single.host_layers))))
    first = replace(speeds, accelerator=speeds.devices.get(devices[0][0].name, speeds.accelerator))
    out.append(("--cpu-moe", first.predict(speed_layout(model, devices[0][0], None, layers))))
    out.append(("CPU only", speeds.predict(Layout(accelerator=False))))
    return tuple(out)
