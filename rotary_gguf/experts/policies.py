"""Replacement policies of the expert cache (pure Python, shared by the live cache and the offline
simulator), routing traces (the experts each decode call selected, per block) and their replay.

A policy sees one step per block and decode call: the distinct experts that call's tokens select.
Every one of them must be resident for the call to use an uploading cache; the ones that are not
are uploaded into slots, evicting the experts the policy values least. A call whose tokens could
select more distinct experts than there are slots (tokens x experts used > slots) runs llama.cpp's
own path and leaves the cache as it was.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError

# Decayed LFU's per-step decay (half-life ~13 steps): 0.8..0.99 were within a point of each other
# on the traces tools/simulate_cache.py records; 0.95 was best or within 0.2 points on each.
DEFAULT_DECAY = 0.95


# --- policies -------------------------------------------------------------------------------------
class Policy:
    """Slots of one block: expert -> slot, and the choice of what to evict. Subclasses rank the
    resident experts with `_score` (lowest is evicted first; ties go to the lower expert id, so
    a replay is deterministic) and learn from `_touch`."""

    name = "base"

    def __init__(self, slots: int, n_expert: int):
        if slots < 1:
            raise ValueError("a cache needs at least one slot")
        self.slots, self.n_expert = slots, n_expert
        self.slot_of: dict[int, int] = {}  # resident expert -> slot
        self.step = 0

    def admit(self, experts: Iterable[int]) -> list[tuple[int, int]] | None:
        """Make every expert of `experts` resident; returns the (expert, slot) uploads this needs,
        or None when they do not all fit (the step falls back, the cache is unchanged)."""
        needed = sorted(set(experts))
        self.step += 1  # fallback steps count too: time passes for decay, and Belady's index
        if len(needed) > self.slots:
            return None
        missing = [e for e in needed if e not in self.slot_of]
        free = sorted(set(range(self.slots)) - set(self.slot_of.values()))
        if len(missing) > len(free):
            keep = set(needed)
            victims = sorted((e for e in self.slot_of if e not in keep), key=lambda e: (self._score(e), e))
            for victim in victims[: len(missing) - len(free)]:
                free.append(self.slot_of.pop(victim))
            free.sort()
        uploads = []
        for expert, slot in zip(missing, free):
            self.slot_of[expert] = slot
            uploads.append((expert, slot))
        for e in needed:
            self._touch(e)
        return uploads

    def _score(self, expert: int) -> float:
        raise NotImplementedError

    def _touch(self, expert: int) -> None:
        raise NotImplementedError


class LRU(Policy):
    """Evict the expert used longest ago."""

    name = "lru"

    def __init__(self, slots: int, n_expert: int):
        super().__init__(slots, n_expert)
        self.last_use = np.zeros(n_expert, dtype=np.int64)

    def _score(self, expert: int) -> float:
        return float(self.last_use[expert])

    def _touch(self, expert: int) -> None:
        self.last_use[expert] = self.step


class DecayedLFU(Policy):
    """Evict the expert with the lowest use count, where every count decays by `decay` per step
    (a half-life of log(0.5)/log(decay) steps); ties go to the least recently used. The counts
    of evicted experts are kept, so an expert that comes back often wins its slot back."""

    name = "lfu-decay"

    def __init__(self, slots: int, n_expert: int, decay: float = DEFAULT_DECAY):
        super().__init__(slots, n_expert)
        self.decay = decay
        self.base = 0  # counts are kept scaled by decay**-(step - base), so a touch is O(1)
        self.scaled = np.zeros(n_expert)
        self.last_use = np.zeros(n_expert, dtype=np.int64)

    def count(self, expert: int) -> float:
        """The decayed use count of `expert` now."""
        return float(self.scaled[expert] * self.decay ** (self.step - self.base))

    def _score(self, expert: int) -> tuple:
        return (self.scaled[expert], self.last_use[expert])

    def _touch(self, expert: int) -> None:
        if self.step - self.base >= 512:  # rescale before decay**-(step - base) overflows
            self.scaled *= self.decay ** (self.step - self.base)
            self.base = self.step
        self.scaled[expert] += self.decay ** -(self.step - self.base)
        self.last_use[expert] = self.step


class ProfileSeeded(Policy):
    """Decayed LFU plus a frequency prior from a routing profile: the resident expert with the
    lowest (prior share x weight + decayed use count) is evicted. Starts empty like the others."""

    name = "profile-lfu"

    def __init__(self, slots: int, n_expert: int, prior: Sequence[float], decay: float = DEFAULT_DECAY, weight: float = 8.0):
        super().__init__(slots, n_expert)
        self.inner = DecayedLFU(slots, n_expert, decay)
        selections = float(sum(prior)) or 1.0
        self.prior = np.asarray(prior, dtype=float) / selections * weight

    def _score(self, expert: int) -> tuple:
        return (self.prior[expert] + self.inner.count(expert), self.inner.last_use[expert])

    def _touch(self, expert: int) -> None:
        self.inner.step = self.step
        self.inner._touch(expert)


class Belady(Policy):
    """The offline optimum for a known future (evict the expert needed furthest ahead): an upper
    bound for the simulator, not a policy a live cache can run."""

    name = "belady"

    def __init__(self, slots: int, n_expert: int, future: Sequence[Sequence[int]]):
        super().__init__(slots, n_expert)
        self.next_use: list[dict[int, int]] = []  # per step: expert -> next step it is needed
        upcoming: dict[int, int] = {}
        for i in range(len(future) - 1, -1, -1):
            self.next_use.append(dict(upcoming))
            for e in set(future[i]):
                upcoming[e] = i
        self.next_use.reverse()

    def _score(self, expert: int) -> float:
        return -float(self.next_use[self.step - 1].get(expert, 1 << 60))

    def _touch(self, expert: int) -> None:
        pass


POLICIES = ("lru", "lfu-decay", "profile-lfu")


def make_policy(name: str, slots: int, n_expert: int, *, prior: Sequence[float] | None = None,
                future: Sequence[Sequence[int]] | None = None) -> Policy:
    if name == "lru":
        return LRU(slots, n_expert)
    if name == "lfu-decay":
        return DecayedLFU(slots, n_expert)
    if name == "profile-lfu":
        if prior is None:
            raise UserError("the profile-lfu policy needs a routing profile")
        return ProfileSeeded(slots, n_expert, prior)
    if name == "belady":
        return Belady(slots, n_expert, future or [])
    raise UserError(f"unknown cache policy {name!r} (known: {', '.join(POLICIES)}, belady)")


# --- statistics ---------------------------------------------------------------------------------
@dataclass
class CacheStats:
    """Counts of one block's cache: selections of distinct experts per step, served from a slot
    (hits) or uploaded first (misses); steps that fell back to llama.cpp's path."""

    hits: int = 0
    misses: int = 0
    fallback_steps: int = 0
    steps: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def add(self, other: "CacheStats") -> None:
        self.hits += other.hits
        self.misses += other.misses
        self.fallback_steps += other.fallback_steps
        self.steps += other.steps


def play_step(policy: Policy, experts: Iterable[int], stats: CacheStats) -> list[tuple[int, int]] | None:
    """One step of one block through `policy`, counted in `stats`; the uploads, or None to fall back."""
    needed = set(experts)
    stats.steps += 1
    uploads = policy.admit(needed)
    if uploads is None:
        stats.fallback_steps += 1
        return None
    stats.misses += len(uploads)
    stats.hits += len(needed) - len(uploads)
    return uploads


# --- routing traces -----------------------------------------------------------------------------
@dataclass
class Trace:
    """The experts selected per block and decode call, in the file's expert positions:
    steps[layer] is a list of calls, each a list of token selections (lists of expert ids)."""

    n_expert: int
    n_expert_used: int
    steps: dict[int, list[list[list[int]]]] = field(default_factory=dict)

    def record(self, layer: int, selections: list[list[int]]) -> None:
        self.steps.setdefault(layer, []).append(selections)

    def layer_steps(self, layer: int) -> list[set[int]]:
        """The distinct experts each call of `layer` needs."""
        return [{e for token in call for e in token} for call in self.steps.get(layer, [])]

    def counts(self) -> dict[int, np.ndarray]:
        out = {}
        for layer, calls in self.steps.items():
            c = np.zeros(self.n_expert, dtype=np.int64)
            for call in calls:
                for token in call:
                    np.add.at(c, token, 1)
            out[layer] = c
        return out

    def save(self, path: str | os.PathLike) -> None:
        data = {"n_expert": self.n_expert, "n_expert_used": self.n_expert_used,
                "steps": {str(k): v for k, v in self.steps.items()}}
        Path(path).write_text(json.dumps(data, separators=(",", ":")) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Trace":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(data["n_expert"], data["n_expert_used"], {int(k): v for k, v in data["steps"].items()})
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path}: not a routing trace ({e})") from None


def replay(trace: Trace, policy: str, slots: int, *, prior: dict[int, Sequence[float]] | None = None) -> dict[int, CacheStats]:
    """Per block: the statistics of a cache of `slots` slots run by `policy` over `trace`, with
    the live cache's rule for falling back: a call of more tokens than slots / experts used."""
    out = {}
    for layer in sorted(trace.steps):
        calls = trace.steps[layer]
        cached = [{e for token in call for e in token} for call in calls if fits(len(call), trace.n_expert_used, slots)]
        p = make_policy(policy, slots, trace.n_expert, prior=None if prior is None else prior[layer], future=cached)
        stats = CacheStats(steps=len(calls) - len(cached), fallback_steps=len(calls) - len(cached))
        for needed in cached:
            play_step(p, needed, stats)
        out[layer] = stats
    return out


def fits(n_tokens: int, n_expert_used: int, slots: int) -> bool:
    """Whether a call of `n_tokens` tokens can use the cache: they can select at most
    n_tokens x n_expert_used distinct experts, and the slots must hold them all."""
    return n_tokens * n_expert_used <= slots


def total(stats: dict[int, CacheStats]) -> CacheStats:
    out = CacheStats()
    for s in stats.values():
        out.add(s)
    return out
