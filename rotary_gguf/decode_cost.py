"""The decode-time model the planner weighs placements with: predicted seconds a decoded token
spends on its host experts, for blocks whose experts are resident on the accelerator, computed by
the CPU, or split (a cache's hits on the accelerator while the CPU computes the misses). Pure
arithmetic: every figure it assumes is named here, and `plan` says which it used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# The CPU reading expert weights for a matrix-vector product when nothing was measured: a laptop
# with dual-channel DDR5 (an assumption; `plan` measures it on a GPU machine).
DEFAULT_CPU_EXPERT_BYTES_PER_S = 30e9
# Per host-expert block and token when the CPU computes its experts: the activations go to the CPU
# and back (two syncs).
CPU_HOP_LATENCY_S = 20e-6
# Per cached block and token in split compute: three more graph syncs (topk, weights, weighted),
# ~10-30 us each on CUDA (an assumption until a GPU measures it).
SPLIT_SYNC_S = 60e-6
# Hit rates of a per-block expert cache holding a fraction of a block's experts, without a routing
# profile: published per-layer LRU figures for a Qwen-class router (67% at 1/8 of the experts, 81%
# at 1/4), joined by straight lines through (0, 0) and (1, 1). Linear below 1/8 is pessimistic:
# skewed routers hit more there, but nothing was measured to say how much.
FIELD_HIT_RATES = ((0.0, 0.0), (0.125, 0.67), (0.25, 0.81), (1.0, 1.0))


def field_hit_rate(slots: int, n_expert: int) -> float:
    """The share of selections a cache of `slots` of `n_expert` experts serves (FIELD_HIT_RATES)."""
    f = min(max(slots / n_expert, 0.0), 1.0)
    for (f0, h0), (f1, h1) in zip(FIELD_HIT_RATES, FIELD_HIT_RATES[1:]):
        if f <= f1:
            return h0 + (h1 - h0) * (f - f0) / (f1 - f0)
    return 1.0


def profile_hit_rates(counts: Sequence[int]) -> tuple[float, ...]:
    """From one block's routing profile (selections per expert): the share of selections the S most
    used experts take, for S = 0..n_expert. A cache whose policy keeps the frequent experts (decayed
    LFU) holds about that set, so this is its hit rate at S slots, ignoring bursts."""
    total = sum(counts) or 1
    shares, running = [0.0], 0
    for n in sorted(counts, reverse=True):
        running += n
        shares.append(running / total)
    return tuple(shares)


@dataclass(frozen=True)
class HostBlock:
    """One block whose experts live in host memory, as the model sees it."""

    used_bytes: int  # the bytes of the experts one token selects in it (n_used x one expert)
    slots: int = 0  # accelerator slots of a split-compute cache (0: the CPU computes every expert)
    hit_rate: float = 0.0


def block_seconds(block: HostBlock, cpu_bytes_per_s: float, gpu_bytes_per_s: float | None = None) -> float:
    """Seconds a token spends on one host block: the CPU's share of its experts (the misses) and,
    at the same time, the accelerator's (the hits; taken as the shorter unless `gpu_bytes_per_s`
    says otherwise), plus the syncs."""
    seconds = (1.0 - block.hit_rate) * block.used_bytes / cpu_bytes_per_s
    if gpu_bytes_per_s:
        seconds = max(seconds, block.hit_rate * block.used_bytes / gpu_bytes_per_s)
    return seconds + CPU_HOP_LATENCY_S + (SPLIT_SYNC_S if block.slots else 0.0)


def host_expert_seconds(blocks: list[HostBlock], cpu_bytes_per_s: float = DEFAULT_CPU_EXPERT_BYTES_PER_S) -> float:
    """Seconds a decoded token spends on the experts of all host blocks."""
    return sum(block_seconds(b, cpu_bytes_per_s) for b in blocks)
