"""The expert cache a plan sizes: slot counts (`auto` weighs them against resident blocks by
predicted decode time), hit rates from a routing profile or the field, and the upload budget of
split compute."""

from __future__ import annotations

from dataclasses import dataclass

from ..decode_cost import DEFAULT_CPU_EXPERT_BYTES_PER_S, HostBlock, field_hit_rate, host_expert_seconds, profile_hit_rates
from ..errors import UserError
from ..speed_model import PlanSpeeds
from ..units import human_bytes
from .figures import ModelFigures
from .settings import AUTO_CACHE_MIN_USED_MULTIPLE, EXPERT_CACHE_SETTINGS


@dataclass(frozen=True)
class ExpertCachePlan:
    """The expert cache a plan sizes: `slots` accelerator slots per host block, each holding one
    expert of every expert tensor of that block."""

    slots: int  # per host block
    layers: tuple[int, ...]  # the host blocks
    slot_bytes: tuple[int, ...]  # per host block (as `layers`): the bytes of one slot
    reason: str  # why this size
    split: bool = False  # misses computed by the CPU meanwhile (one more, all-zero slot per block)
    upload_budget: int | None = None  # split: bytes admitted into slots between two decode calls

    @property
    def bytes(self) -> int:
        """Accelerator bytes of all the slots (and split compute's zero slots)."""
        return (self.slots + self.split) * sum(self.slot_bytes)


@dataclass(frozen=True)
class HitRates:
    """Per block, the hit rate of a split-compute cache at each slot count, from a routing profile
    (`decode_cost.profile_hit_rates`); blocks the profile lacks use the field figures."""

    source: str  # the profile's file name
    by_layer: dict[int, tuple[float, ...]]  # layer -> rate at 0..n_expert slots

    @classmethod
    def from_profile(cls, profile) -> "HitRates":
        """From a `profile_io.Profile` (counts per block and expert)."""
        return cls(profile.path.name, {i: profile_hit_rates(lp.counts.tolist()) for i, lp in profile.layers.items()})

    def rate(self, layer: int, slots: int, n_expert: int) -> float:
        curve = self.by_layer.get(layer)
        return curve[min(slots, len(curve) - 1)] if curve else field_hit_rate(slots, n_expert)


def cache_hit_rate(hit_rates: HitRates | None, layer: int, slots: int, n_expert: int) -> float:
    """The share of `layer`'s selections a cache of `slots` serves: the routing profile's where
    there is one, else the field figures; 0 without slots."""
    if not slots:
        return 0.0
    return hit_rates.rate(layer, slots, n_expert) if hit_rates else field_hit_rate(slots, n_expert)


def predicted_host_seconds(model: ModelFigures, host_layers: list[int], slots: int, cpu_bytes_per_s: float,
                           hit_rates: HitRates | None = None) -> float:
    """The decode-time model's seconds a token spends on the experts of `host_layers`, each with a
    split-compute cache of `slots` (0: none) at `hit_rates` (else field figures)."""

    blocks = [HostBlock(model.n_expert_used * sum(n // model.n_expert for n in model.expert_tensors[i]), slots,
                        cache_hit_rate(hit_rates, i, slots, model.n_expert))
              for i in host_layers]
    return host_expert_seconds(blocks, cpu_bytes_per_s)


def cache_slots(model: ModelFigures, setting: str | int, split: bool) -> int:
    """The slots per block an explicit `expert_cache` setting asks for; 0 for "auto" and "off"."""
    if isinstance(setting, str):
        if setting not in EXPERT_CACHE_SETTINGS:
            raise UserError(f"unknown expert cache setting {setting!r} (known: auto, off or a number of slots per block)")
        return 0
    least = 1 if split else model.n_expert_used
    if not least <= setting <= model.n_expert:
        why = ("" if split else f"; a token uses {model.n_expert_used} of its {model.n_expert} experts, and "
               "uploading caches need them all in slots")
        raise UserError(f"{model.name} takes {least} to {model.n_expert} expert cache slots per block{why}, not {setting}")
    return setting


# Split compute admits missed experts into slots between decode calls: at most this long a call at
# the measured upload speed, or (unmeasured) the experts one token uses in one block.
SPLIT_UPLOAD_SECONDS = 2e-3


# Slot counts `auto` weighs for split compute (as fractions of a block's experts), besides none.
SPLIT_SLOT_FRACTIONS = (1 / 64, 1 / 32, 1 / 16, 1 / 8, 3 / 16, 1 / 4, 3 / 8, 1 / 2, 3 / 4)


def fastest_split(model: ModelFigures, n_moe_layers: int, residents_around, decode_seconds,
                   measured_cpu, hit_rates: HitRates | None, speeds: PlanSpeeds | None = None) -> tuple[set[int], int, str]:
    """`auto` for split compute: for each candidate slot count, the resident blocks that fit around
    it, and the predicted host-expert time of a decoded token; the fastest wins, resident blocks
    only (no cache) on ties. Returns (resident blocks, slots, why)."""
    candidates = sorted({max(1, round(f * model.n_expert)) for f in SPLIT_SLOT_FRACTIONS} - {model.n_expert})
    plain = residents_around(0)
    best = (decode_seconds(plain, 0), 0, plain)
    for slots in candidates:
        resident = residents_around(slots)
        if resident is None or len(resident) == n_moe_layers:
            continue  # every block resident: no cache to weigh
        seconds = decode_seconds(resident, slots)
        if seconds < best[0]:
            best = (seconds, slots, resident)
    seconds, slots, resident = best
    cpu = "measured" if measured_cpu else f"assumed {DEFAULT_CPU_EXPERT_BYTES_PER_S / 1e9:.0f} GB/s"
    rates = f"hit rates from {hit_rates.source}" if hit_rates else "field hit rates"
    basis = (f"predicted time per token (speed model, {speeds.source}, {rates})" if speeds
             else f"predicted host-expert time per token (CPU {cpu}, {rates})")
    plain_s = decode_seconds(plain, 0)
    if not slots:
        return plain, 0, (f"auto: no slot count beat {len(plain)} resident blocks alone "
                          f"({plain_s * 1e3:.2f} ms, {basis})")
    return resident, slots, (f"auto: {slots} split slots per block beside {len(resident)} resident blocks, "
                             f"{seconds * 1e3:.2f} ms vs {plain_s * 1e3:.2f} ms with {len(plain)} resident blocks "
                             f"alone ({basis})")


def cache_size(model: ModelFigures, setting: str | int, left: int, n_resident: int, slot_bytes: list[int]) -> tuple[int, str]:
    """Slots per host block (0: no cache) and why, given the bytes `left` by the resident blocks
    and the bytes of one slot of each host block."""
    if setting == "off":
        return 0, "the expert cache is off"
    if not slot_bytes:
        return 0, "every expert block is resident on the accelerator: no host experts to cache"
    if setting != "auto":
        return setting, f"{setting} slots per block were asked for"
    fit = min(left // sum(slot_bytes), model.n_expert)
    after = f"the {human_bytes(left)} left after {n_resident} resident blocks"
    least = min(AUTO_CACHE_MIN_USED_MULTIPLE * model.n_expert_used, model.n_expert)
    if fit < least:
        return 0, (f"{after} holds {fit} slot{'' if fit == 1 else 's'} per block, fewer than the {least} auto needs "
                   f"({AUTO_CACHE_MIN_USED_MULTIPLE}x the {model.n_expert_used} experts a token uses)")
    return fit, f"auto: {fit} slots per block fill {after}"
