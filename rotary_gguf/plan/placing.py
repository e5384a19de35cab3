"""The placement policy: resident expert blocks and the expert cache for a budget, and the `Plan`
that results (see the package's docstring)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from .. import arch as names
from ..decode_cost import DEFAULT_CPU_EXPERT_BYTES_PER_S
from ..errors import UserError
from ..speed_model import Layout, PlanSpeeds, Prediction
from ..units import human_bytes
from .figures import Accelerator, ModelFigures
from .caching import (SPLIT_UPLOAD_SECONDS, ExpertCachePlan, HitRates, cache_hit_rate, cache_size, cache_slots,
                      fastest_split, predicted_host_seconds)
from .budget import Sizing, estimate_margin, largest_ctx, shrink_advice
from .drafting import DraftUse
from .memory import DeviceUse, host_compute_bytes, staging_bytes, ubatch_tokens
from .settings import (CACHE_MISSES, DEFAULT_BATCH, DEFAULT_CTX, DEFAULT_FLASH_ATTN,
                       DEFAULT_KV_TYPE, FLASH_ATTN, HOST_BUFFER_TYPE, HOST_MODES,
                       ROTARY_OFFLOAD_MIN_BATCH)


@dataclass(frozen=True)
class Placement:
    """How llama.cpp should load a model."""

    devices: tuple[str, ...] = ()  # ggml device names for llama_model_params.devices; () = CPU only
    overrides: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # (regex, buffer type name)
    n_gpu_layers: int = 0  # -1: every layer "on the accelerator", so the overrides decide
    offload_min_batch: int | None = None  # GGML_OP_OFFLOAD_MIN_BATCH for host-resident ops
    use_mmap: bool = True
    repack: bool = True  # llama.cpp's CPU repacked buffer types (faster CPU matmuls)
    tensor_split: tuple[int, ...] = ()  # several devices: llama.cpp layers (blocks, then output) each holds
    # more overrides when drafting loads the MTP block; None: its experts in host memory beside an accelerator
    draft_overrides: tuple[tuple[str, str], ...] | None = None

    @classmethod
    def all_cpu(cls) -> "Placement":
        return cls()

    def buffers(self, tensor_names: Iterable[str]) -> tuple[tuple[str, str], ...]:
        """Where the overrides put each of `tensor_names` they match: the first matching pattern's
        buffer type, as llama.cpp reads them. Two spellings of the same overrides give the same."""
        out = []
        for name in tensor_names:
            buft = next((buft for pattern, buft in self.overrides if re.search(pattern, name)), None)
            if buft is not None:
                out.append((name, buft))
        return tuple(out)


@dataclass(frozen=True)
class DeviceShare:
    """One accelerator's part of a plan over several: the blocks llama.cpp gives it (their tensors
    other than the routed experts, KV cache and recurrent state), the output layer, and the expert
    blocks resident on it."""

    accelerator: Accelerator
    budget: int
    layers: tuple[int, ...]
    output: bool
    split: int  # its weight in llama.cpp's tensor_split: the llama.cpp layers it holds
    resident: tuple[int, ...]
    use: DeviceUse

    @property
    def margin(self) -> int:
        return self.budget - self.use.total

    def to_json(self) -> dict:
        acc = self.accelerator
        return {"device": acc.name, "buffer_type": acc.buffer_type, "kind": acc.kind, "budget": self.budget,
                "layers": list(self.layers), "output": self.output, "tensor_split": self.split,
                "resident_experts": list(self.resident), "predicted_bytes": self.use.total, "predicted": self.use.parts(),
                "margin_bytes": self.margin}


@dataclass(frozen=True)
class Plan:
    """Where every tensor lives, and what each device is predicted to hold."""

    model: ModelFigures
    accelerator: Accelerator
    budget: int
    budget_source: str
    mode: str
    mode_reason: str
    ctx: int
    n_batch: int
    kv_type: str
    resident: frozenset[int]  # blocks whose expert tensors stay on the accelerator
    accelerator_use: DeviceUse
    host_use: DeviceUse
    minimum_budget: int  # the least budget: every expert in host memory, and the estimate margin
    n_ubatch: int = DEFAULT_BATCH
    flash_attn: str = DEFAULT_FLASH_ATTN
    all_outputs: bool = False  # logits of every token of a micro-batch (routing profiles), else of one
    reserve: int = 0  # kept off the accelerator before planning (display and driver)
    reserve_reason: str = ""
    estimate_margin: int = 0  # kept free for the estimated parts' error
    largest_ctx: int = 0  # the largest context whose least budget fits
    notes: tuple[str, ...] = ()
    expert_cache: ExpertCachePlan | None = None
    expert_cache_reason: str = ""  # why there is no expert cache (when there is none)
    hit_rates: HitRates | None = field(default=None, repr=False)  # from a routing profile, per block
    predictions: tuple[tuple[str, Prediction], ...] = ()  # the candidates weighed, this plan first
    speeds_source: str = ""  # where the predictions' speeds come from
    draft: DraftUse | None = None  # what MTP drafting adds (folded into the uses), when planned for it
    shares: tuple[DeviceShare, ...] = ()  # several accelerators: each one's part (the first is `accelerator`)

    def speed_layout(self, host, slots: int = 0, misses: str = "split") -> Layout:
        """A placement of this plan's model and accelerator(s) as the speed model sees it (`speed_layout`)."""
        admit = self.expert_cache.upload_budget if self.expert_cache and slots else None
        layout = speed_layout(self.model, self.accelerator, self.hit_rates, host, slots, misses, admit)
        return replace(layout, **spread_layout(self.shares, self.model.n_layer)) if self.shares else layout

    def device_of(self, layer: int) -> Accelerator:
        """The accelerator holding `layer`'s resident experts."""
        return next((s.accelerator for s in self.shares if layer in s.resident), self.accelerator)

    @property
    def host_layers(self) -> list[int]:
        return [i for i in range(self.model.n_layer) if i not in self.resident and self.model.expert_bytes(i)]

    @property
    def uploads_host_experts(self) -> bool:
        """Whether host experts are copied to the accelerator as they are used (rotary mode or an
        expert cache): they then need ggml's plain layout, and pinned memory speeds the copies."""
        return self.mode == "rotary" or self.expert_cache is not None

    @property
    def host_buffer_type(self) -> str:
        """Where host experts go: pinned memory when they are uploaded (faster copies), else plain CPU."""
        if self.uploads_host_experts and self.accelerator.pinned_host_buffer_type:
            return self.accelerator.pinned_host_buffer_type
        return HOST_BUFFER_TYPE

    @property
    def overrides(self) -> tuple[tuple[str, str], ...]:
        """tensor_buft_overrides exactly as handed to llama.cpp; everything else follows n_gpu_layers."""
        host = self.host_layers
        on_host = ((names.expert_pattern(host), self.host_buffer_type),) if host else ()
        return on_host + tuple((names.expert_pattern(list(s.resident)), s.accelerator.buffer_type)
                               for s in self.shares if s.resident)

    @property
    def placement(self) -> Placement:
        uploads = self.uploads_host_experts
        return Placement(
            devices=tuple(s.accelerator.name for s in self.shares) or (self.accelerator.name,),
            tensor_split=tuple(s.split for s in self.shares),
            overrides=self.overrides,
            n_gpu_layers=-1,
            offload_min_batch=ROTARY_OFFLOAD_MIN_BATCH if self.mode == "rotary" else None,
            # pinned memory is allocated, not mapped; repacked CPU buffers are never offloaded
            use_mmap=not (uploads and self.accelerator.pinned_host_buffer_type),
            repack=not uploads,
            draft_overrides=self._draft_overrides,
        )

    @property
    def _draft_overrides(self) -> tuple[tuple[str, str], ...] | None:
        """The MTP block's experts to host memory unless the plan keeps them resident."""
        if self.draft is None:
            return None
        if self.draft.experts_resident:
            return ()
        return ((names.expert_pattern(self.model.mtp_blocks), self.host_buffer_type),)

    def location(self, tensor: str) -> str:
        """The buffer type a tensor is planned to live in."""
        mtp_resident = self.draft is not None and self.draft.experts_resident
        on_host = tensor == "token_embd.weight" or (
            names.expert_kind(tensor) is not None and names.block_index(tensor) not in self.resident
            and not (mtp_resident and names.block_index(tensor) in self.model.mtp_blocks)
        )
        if on_host:
            return self.host_buffer_type
        if self.shares:
            layer = names.block_index(tensor)
            if names.expert_kind(tensor) is not None:
                return self.device_of(layer).buffer_type
            return next((s.accelerator.buffer_type for s in self.shares
                         if (layer in s.layers if layer is not None else s.output)), self.accelerator.buffer_type)
        return self.accelerator.buffer_type

    @property
    def margin(self) -> int:
        return self.budget - self.accelerator_use.total

    @property
    def host_expert_bytes_per_token(self) -> float:
        """Expert bytes a decoded token reads from host memory (its used experts in each host block)."""
        share = self.model.n_expert_used / max(self.model.n_expert, 1)
        return share * sum(self.model.expert_bytes(i) for i in self.host_layers)

    def predicted_host_expert_seconds(self, cpu_expert_bytes_per_s: float = DEFAULT_CPU_EXPERT_BYTES_PER_S) -> float:
        """The decode-time model's seconds per token on host experts (CPU mode; split caches at the
        plan's hit rates: its routing profile's, else field figures)."""
        cache = self.expert_cache
        slots = cache.slots if cache is not None and cache.split else 0
        return predicted_host_seconds(self.model, self.host_layers, slots, cpu_expert_bytes_per_s, self.hit_rates)

    def to_json(self) -> dict:
        """The plan as one JSON-ready object; key order and content depend only on the inputs."""
        acc = self.accelerator
        return {
            "model": self.model.name,
            "arch": self.model.arch,
            "accelerator": {"device": acc.name, "buffer_type": acc.buffer_type, "kind": acc.kind},
            "vram_budget": self.budget,
            "budget_source": self.budget_source,
            "host_expert_mode": self.mode,
            "mode_reason": self.mode_reason,
            "reserve": {"bytes": self.reserve, "reason": self.reserve_reason},
            "ctx": self.ctx,
            "largest_ctx": self.largest_ctx,
            "n_batch": self.n_batch,
            "n_ubatch": self.n_ubatch,
            "kv_type": self.kv_type,
            "flash_attn": self.flash_attn,
            "all_outputs": self.all_outputs,
            "predicted": {
                "accelerator_bytes": self.accelerator_use.total,
                "host_bytes": self.host_use.total,
                "accelerator": self.accelerator_use.parts(),
                "host": self.host_use.parts(),
                "estimates": list(DeviceUse.ESTIMATES),
            },
            "margin_bytes": self.margin,
            "estimate_margin_bytes": self.estimate_margin,
            "minimum_budget": self.minimum_budget,
            "layers": [
                {
                    "index": i,
                    "attention": self.model.attention[i],
                    "expert_bytes": self.model.expert_bytes(i),
                    "experts": "accelerator" if i in self.resident else "host",
                }
                for i in range(self.model.n_layer)
            ],
            "overrides": [list(o) for o in self.overrides],
            "devices": [s.to_json() for s in self.shares],
            "placement": {
                "devices": list(self.placement.devices),
                "tensor_split": list(self.placement.tensor_split),
                "n_gpu_layers": self.placement.n_gpu_layers,
                "offload_min_batch": self.placement.offload_min_batch,
                "use_mmap": self.placement.use_mmap,
                "repack": self.placement.repack,
            },
            **self._expert_cache_json(),
            "draft": self.draft.to_json() if self.draft else None,
            "predictions": {"speeds": self.speeds_source,
                            "candidates": [{"name": name, **p.to_json()} for name, p in self.predictions]},
            "notes": list(self.notes),
        }

    def _expert_cache_json(self) -> dict:
        cache = self.expert_cache
        if cache is None:
            return {"expert_cache": None, "expert_cache_reason": self.expert_cache_reason}
        return {"expert_cache": {
            "slots": cache.slots,
            "slots_per_layer": {str(i): cache.slots for i in cache.layers},
            "layers": list(cache.layers),
            "slot_bytes": {str(i): n for i, n in zip(cache.layers, cache.slot_bytes)},
            "bytes": cache.bytes,
            "misses": "split" if cache.split else "upload",
            "upload_budget": cache.upload_budget,
            "reason": cache.reason,
        }}

    def compare(self, report) -> list[tuple[str, str, int, int]]:
        """(device, purpose, predicted, actual) for what llama.cpp reported allocating. `report`
        has dicts weight_bytes, kv_bytes, recurrent_bytes, compute_bytes: buffer name -> bytes."""
        rows = []
        pools = [(s.accelerator.name, s.accelerator.buffer_type, s.use) for s in self.shares] or [
            ("accelerator", self.accelerator.buffer_type, self.accelerator_use)]
        for purpose, attr in (("weights", "weight_bytes"), ("kv_cache", "kv_bytes"),
                              ("recurrent_state", "recurrent_bytes"), ("compute", "compute_bytes")):
            actual = getattr(report, attr)
            on_accelerators = 0
            for name, buffer_type, use in pools:
                here = sum(n for b, n in actual.items() if b == buffer_type)
                rows.append((name, purpose, getattr(use, purpose), here))
                on_accelerators += here
            rows.append(("host", purpose, getattr(self.host_use, purpose), sum(actual.values()) - on_accelerators))
        return rows


def make_plan(
    model: ModelFigures,
    accelerator: Accelerator,
    budget: int,
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
    cache_misses: str = "split",
    cpu_expert_bytes_per_s: float | None = None,
    upload_bytes_per_s: float | None = None,
    hit_rates: HitRates | None = None,
    speeds: PlanSpeeds | None = None,
    draft_max: int = 0,
) -> Plan:
    """Fill `budget` bytes of `accelerator` (what is left after `reserve`), less a margin for the
    estimated parts: the non-expert part first, then whole expert blocks, largest first (ties:
    later blocks, like llama.cpp's --n-cpu-moe), as long as they fit.
    `expert_cache` is "off", "auto" or a number of slots per host block (the resident blocks fit
    around them); `cache_misses` "split" or "upload" (see the module's docstring). The decode-time
    model uses `cpu_expert_bytes_per_s` where it was measured, and `hit_rates` (a routing
    profile's, `HitRates.from_profile`) where there is one; else published field figures. With
    `speeds` (this machine's calibration), the speed model weighs the candidates instead, and the
    plan carries the predicted prompt and decode t/s of those it weighed. `draft_max` > 0 plans
    for MTP drafts of that many tokens a round (`drafting`): the MTP block's experts stay on the
    accelerator when the room left after the trunk's blocks holds them."""
    if cache_misses not in CACHE_MISSES:
        raise UserError(f"unknown cache-miss handling {cache_misses!r} (known: {', '.join(CACHE_MISSES)})")
    split = cache_misses == "split"
    asked_slots = cache_slots(model, expert_cache, split)
    if mode not in HOST_MODES:
        raise UserError(f"unknown host-expert mode {mode!r} (known: {', '.join(HOST_MODES)}, auto)")
    if mode == "rotary" and not accelerator.streams_host_ops:
        raise UserError(f"rotary mode needs a CUDA GPU: {accelerator.name} cannot run host-resident expert ops (no offload_op)")
    n_ubatch = n_batch if n_ubatch is None else n_ubatch
    if ctx < 1 or n_batch < 1 or n_ubatch < 1:
        raise UserError("the context and batch sizes must be at least 1")
    if flash_attn not in FLASH_ATTN:
        raise UserError(f"unknown flash attention setting {flash_attn!r} (known: {', '.join(FLASH_ATTN)})")
    n_batch = ubatch_tokens(ctx, n_batch)
    n_ubatch = min(n_batch, n_ubatch)
    sizing = Sizing(ctx, n_ubatch, kv_type, flash_attn != "off", all_outputs, draft_max)
    fixed = sizing.fixed_use(model, accelerator)
    margin = estimate_margin(fixed)
    room = budget - margin  # what the plan may fill
    layers = [i for i in range(model.n_layer) if model.expert_bytes(i)]
    slot_bytes = {i: sum(n // model.n_expert for n in model.expert_tensors[i]) for i in layers}

    def allocated_slots(slots: int) -> int:
        return slots + 1 if split and 0 < slots < model.n_expert else slots  # split's zero slot

    def accelerator_use(resident: set[int], slots: int = 0) -> DeviceUse:
        host = [i for i in layers if i not in resident]
        return DeviceUse(
            **{**fixed.parts(),
               "weights": fixed.weights + sum(model.expert_bytes(i) for i in resident),
               "staging": staging_bytes(model, accelerator, host, mode, n_ubatch),
               "expert_cache": allocated_slots(slots) * sum(slot_bytes[i] for i in host)}
        )

    fill_order = sorted(layers, key=lambda i: (-model.expert_bytes(i), -i))

    def most_residents_around(slots: int) -> set[int] | None:
        """The resident blocks that fit beside `slots` per host block; None if the slots alone do not."""
        if accelerator_use(set(), slots).total > room:
            return None
        resident: set[int] = set()
        for i in fill_order:
            if accelerator_use(resident | {i}, slots).total <= room:
                resident.add(i)
        return resident

    cpu_bps = cpu_expert_bytes_per_s or DEFAULT_CPU_EXPERT_BYTES_PER_S

    def layout(host: list[int], slots: int = 0, misses: str = cache_misses) -> Layout:
        admit = split_admit_bytes(model, [slot_bytes[i] for i in host], upload_bytes_per_s) if slots and host else None
        return speed_layout(model, accelerator, hit_rates, host, slots, misses, admit)

    def decode_seconds(resident: set[int], slots: int) -> float:
        host = [i for i in layers if i not in resident]
        if speeds is not None:
            return 1.0 / speeds.predict(layout(host, slots)).decode_tps
        return predicted_host_seconds(model, host, slots, cpu_bps, hit_rates)

    def residents_around(slots: int) -> set[int] | None:
        """The resident blocks that fit beside `slots`, fewer where the speed model predicts fewer
        faster (an accelerator whose expert op is slower than the CPU's: a simulated one)."""
        most = most_residents_around(slots)
        if most is None or speeds is None:
            return most
        best, best_seconds = most, decode_seconds(most, slots)
        ordered = [i for i in fill_order if i in most]
        for k in range(len(most)):
            fewer = set(ordered[:k])
            seconds = decode_seconds(fewer, slots)
            if seconds < best_seconds * (1 - FEWER_RESIDENT_MARGIN):
                best, best_seconds = fewer, seconds
        return best

    minimum = accelerator_use(set())
    if minimum.total > room:
        reserved = f" after a {human_bytes(reserve)} {reserve_reason}" if reserve else ""
        shrink = "; ".join(shrink_advice(model, accelerator, mode, sizing))
        raise UserError(
            f"a VRAM budget of {human_bytes(budget)}{reserved} is too small for {model.name}: with every expert in host "
            f"memory the accelerator needs at least {human_bytes(minimum.total + margin)} ({_describe(minimum)}, "
            f"margin {human_bytes(margin)}); use --vram {math.ceil((minimum.total + margin + reserve) / 2**20)}MiB or more"
            + (f", or shrink the need: {shrink}" if shrink else "")
        )
    with_cache = accelerator_use(set(), asked_slots)
    if with_cache.total > room:
        fit = (room - minimum.total) // sum(slot_bytes.values()) - split
        least = 1 if split else model.n_expert_used
        instead = (f"{fit} slots per block fit (--expert-cache {fit})" if fit >= least
                   else f"not even {least} slot{'s' if least > 1 else ''} per block fit (--expert-cache off)")
        raise UserError(
            f"a VRAM budget of {human_bytes(budget)} is too small for {asked_slots} expert cache slots per block: with "
            f"every expert in host memory the accelerator needs {human_bytes(with_cache.total)} ({_describe(with_cache)}); "
            f"{instead}, or use --vram {math.ceil((with_cache.total + margin + reserve) / 2**20)}MiB or more"
        )
    if expert_cache == "auto" and split:
        resident, slots, cache_reason = fastest_split(model, len(layers), residents_around, decode_seconds,
                                                       cpu_expert_bytes_per_s, hit_rates, speeds)
    else:
        resident = residents_around(asked_slots)
        host = [i for i in layers if i not in resident]
        slots, cache_reason = cache_size(model, expert_cache, room - accelerator_use(resident).total,
                                          len(resident), [slot_bytes[i] for i in host])
    host_layers = [i for i in layers if i not in resident]
    most = most_residents_around(slots) or set()
    if len(resident) < len(most):
        notes = (*notes, f"{len(resident)} of the {len(most)} expert blocks that fit kept resident: the speed model "
                         f"predicts {1 / decode_seconds(resident, slots):.1f} t/s against "
                         f"{1 / decode_seconds(most, slots):.1f} t/s with all of them ({speeds.source}; the "
                         f"accelerator's expert op is slower than the CPU's)")
    cache_split = split and 0 < slots < model.n_expert
    budget_bytes = split_admit_bytes(model, [slot_bytes[i] for i in host_layers], upload_bytes_per_s) if cache_split else None
    cache = (ExpertCachePlan(slots, tuple(host_layers), tuple(slot_bytes[i] for i in host_layers), cache_reason,
                             cache_split, budget_bytes)
             if slots and host_layers else None)
    if cache is None and slots and not host_layers:
        cache_reason = "every expert block is resident on the accelerator: no host experts to cache"
    experts_on_cpu = bool(host_layers) and mode == "cpu"
    draft = _place_mtp_experts(sizing, model, room - accelerator_use(resident, slots).total, mode)
    mtp_on_host = draft is not None and not draft.experts_resident
    host_use = DeviceUse(
        weights=(model.embedding_bytes + sum(model.expert_bytes(i) for i in host_layers)
                 + (draft.experts if mtp_on_host else 0)),
        compute=(host_compute_bytes(model, ctx, n_ubatch, experts_on_cpu, sizing.flash_attn)
                 + (draft.host_compute if draft else 0)),
        output=4 * model.n_vocab + (draft.host_outputs if draft else 0),
    )
    accelerator_final = accelerator_use(resident, slots)
    if draft is not None and draft.experts_resident:
        accelerator_final = replace(accelerator_final, weights=accelerator_final.weights + draft.experts)
    return Plan(
        model=model,
        accelerator=accelerator,
        budget=budget,
        budget_source=budget_source,
        mode=mode,
        mode_reason=mode_reason or f"{mode} mode was asked for",
        ctx=ctx,
        n_batch=n_batch,
        kv_type=kv_type,
        resident=frozenset(resident),
        accelerator_use=accelerator_final,
        host_use=host_use,
        minimum_budget=minimum.total + margin,
        n_ubatch=n_ubatch,
        flash_attn=flash_attn,
        all_outputs=all_outputs,
        reserve=reserve,
        reserve_reason=reserve_reason,
        estimate_margin=margin,
        largest_ctx=largest_ctx(model, accelerator, budget, mode, sizing),
        notes=notes,
        expert_cache=cache,
        expert_cache_reason="" if cache else cache_reason,
        hit_rates=hit_rates,
        predictions=_weighed(speeds, layout, layers, host_layers, slots if cache else 0, residents_around) if speeds else (),
        speeds_source=speeds.source if speeds else "",
        draft=draft,
    )


def _place_mtp_experts(sizing: Sizing, model: ModelFigures, left: int, mode: str) -> DraftUse | None:
    """What drafting adds, its MTP block's experts resident when the `left` bytes (after the trunk's
    blocks) hold them; None without drafting."""
    if not sizing.draft_max:
        return None
    resident = model.mtp_expert_bytes <= left
    draft = sizing.draft_use(model, experts_on_cpu=not resident and mode == "cpu")
    if resident:
        return replace(draft, experts_resident=True,
                       reason=f"the {human_bytes(left)} left after the trunk's blocks hold them")
    return replace(draft, reason=f"the {human_bytes(max(left, 0))} left after the trunk's blocks are less than their "
                   f"{human_bytes(draft.experts)}: in host memory")


def _weighed(speeds: PlanSpeeds, layout, layers: list[int], host: list[int], slots: int,
             residents_around) -> tuple[tuple[str, Prediction], ...]:
    """Predicted speeds of the plan and of what it was weighed against: the resident blocks the
    same budget holds without a cache, llama.cpp's --cpu-moe, and the CPU alone."""
    out = [("this plan", speeds.predict(layout(host, slots)))]
    if slots:
        plain = residents_around(0) or set()
        out.append(("resident blocks only", speeds.predict(layout([i for i in layers if i not in plain]))))
    if len(host) < len(layers):
        out.append(("--cpu-moe", speeds.predict(layout(layers))))
    out.append(("CPU only", speeds.predict(Layout(accelerator=False))))
    return tuple(out)


def speed_layout(model: ModelFigures, accelerator: Accelerator, hit_rates: HitRates | None, host, slots: int = 0,
                 misses: str = "split", admit_bytes: int | None = None) -> Layout:
    """How the speed model sees a placement with the experts of `host` in host memory, each with a
    cache of `slots` whose misses are split (and admitted into slots between calls, `admit_bytes`
    at most) or uploaded."""
    rates = {i: cache_hit_rate(hit_rates, i, slots, model.n_expert) for i in host} if slots else {}
    return Layout(tuple(host), slots=slots, hit_rates=rates, misses=misses, admit_bytes=admit_bytes,
                  streams_prompt=accelerator.streams_host_ops, routing=dict(hit_rates.by_layer) if hit_rates else {})


def split_admit_bytes(model: ModelFigures, slot_bytes: list[int], upload_bytes_per_s: float | None) -> int:
    """The bytes of missed experts a split-compute cache admits into slots between two calls: as
    many as upload in `SPLIT_UPLOAD_SECONDS` at the measured speed, else the experts one token
    uses in one block (of the host blocks' `slot_bytes`, the largest)."""
    if upload_bytes_per_s:
        return int(upload_bytes_per_s * SPLIT_UPLOAD_SECONDS)
    return model.n_expert_used * max(slot_bytes)


def spread_layout(shares, n_layer: int) -> dict:
    """The speed model's fields for a plan over several accelerators (`DeviceShare`s): the device
    of each block's other tensors, of the output layer, and of each resident block's experts."""
    return {"layer_devices": tuple(next(s.accelerator.name for s in shares if i in s.layers) for i in range(n_layer)),
            "output_device": next(s.accelerator.name for s in shares if s.output),
            "resident_on": {i: s.accelerator.name for s in shares for i in s.resident}}


# Fewer resident blocks than fit must be predicted this much faster to be planned (noise in a
# busy machine's calibration must not trade resident blocks away).
FEWER_RESIDENT_MARGIN = 0.25


def _describe(use: DeviceUse) -> str:
    labels = {"kv_cache": "KV cache", "recurrent_state": "recurrent state", "runtime_reserve": "runtime reserve",
              "expert_cache": "expert cache"}
    return ", ".join(
        f"{labels.get(k, k)} {human_bytes(v)}" + (" (estimate)" if k in DeviceUse.ESTIMATES else "")
        for k, v in use.parts().items() if v
    )
