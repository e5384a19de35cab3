"""Benchmark placements side by side on this machine: the planner's choice (with and without its
expert cache) and llama.cpp's own flags (`--cpu-moe`, `--n-cpu-moe N`, everything on the
accelerator), each loaded with the engine, run on the same prompt tokens with greedy decoding,
interleaved run by run so drift hits all alike.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import psutil

from . import arch as names
from .dashboard import MemoryProbe
from .engine import Engine
from .errors import UserError
from .experts.cache import ExpertCache
from .inventory import read_inventory
from .plan import HOST_BUFFER_TYPE, Placement, Plan, make_plan

BASELINE = "--cpu-moe"
FILLER_TEXT = (
    "The river bends past the old mill, where the miller counts sacks of grain and the children "
    "race paper boats under the stone bridge while the bells of the town ring noon. "
)


@dataclass(frozen=True)
class Candidate:
    """One way to load the model: its name, what llama.cpp is told, and the host-expert mode."""

    name: str
    placement: Placement
    mode: str  # "cpu", "rotary", "accelerator" (no host experts) or "cpu-only" (no accelerator)
    description: str
    expert_cache_slots: int | None = None  # the rotary expert cache's slots per host block, if any
    split: bool = False  # the cache's misses computed by the CPU meanwhile (else uploaded first)
    upload_budget: int | None = None  # split: bytes admitted into slots between decode calls


@dataclass
class Measurement:
    """One timed run of one candidate."""

    prompt_tps: float
    decode_tps: float
    ttft_seconds: float
    peak_accelerator_bytes: int | None
    peak_rss_bytes: int
    tokens: list[int]
    cache_hit_rate: float | None = None  # of the expert cache over the run (prompt and decode)


@dataclass
class Result:
    """Every timed run of one candidate, and the figures over them."""

    candidate: Candidate
    runs: list[Measurement] = field(default_factory=list)
    decode_ratios: list[float] = field(default_factory=list)  # per run, against the baseline's same run

    FIGURES = ("prompt_tps", "decode_tps", "ttft_seconds", "peak_accelerator_bytes", "peak_rss_bytes", "cache_hit_rate")

    def values(self, figure: str) -> list[float]:
        return [v for v in (getattr(m, figure) for m in self.runs) if v is not None]

    def summary(self, figure: str) -> dict | None:
        """Median and spread (max - min) of a figure over the runs; None where it was not measured."""
        values = self.values(figure) if figure != "decode_ratio" else self.decode_ratios
        if not values:
            return None
        return {"median": statistics.median(values), "spread": max(values) - min(values), "runs": values}

    def to_json(self) -> dict:
        c = self.candidate
        return {
            "name": c.name,
            "description": c.description,
            "mode": c.mode,
            "expert_cache_slots": c.expert_cache_slots,
            "cache_misses": None if c.expert_cache_slots is None else "split" if c.split else "upload",
            "devices": list(c.placement.devices),
            "overrides": [list(o) for o in c.placement.overrides],
            "figures": {f: self.summary(f) for f in (*self.FIGURES, "decode_ratio")},
            "output_tokens": self.runs[0].tokens if self.runs else [],
        }


def without_expert_cache(plan: Plan) -> Plan:
    """The same plan with no expert cache (its residency re-planned for the whole budget)."""
    return make_plan(plan.model, plan.accelerator, plan.budget, budget_source=plan.budget_source, mode=plan.mode,
                     mode_reason=plan.mode_reason, ctx=plan.ctx, n_batch=plan.n_batch, kv_type=plan.kv_type,
                     notes=plan.notes)


def plan_candidates(p: Plan) -> list[Candidate]:
    """The plan as planned; a split-compute plan also with the same slots uploading every miss
    first (when a token's experts fit them), the policy for fast links."""
    blocks = f"{len(p.resident)} of {len(p.resident) + len(p.host_layers)} expert blocks resident"
    cache = p.expert_cache
    if cache is None:
        return [Candidate(f"plan {p.mode}", p.placement, p.mode, blocks)]
    if not cache.split:
        return [Candidate(f"plan {p.mode}+cache {cache.slots}", p.placement, p.mode,
                          f"{blocks}, {cache.slots} expert cache slots per host block, misses uploaded first",
                          expert_cache_slots=cache.slots)]
    out = [Candidate(f"plan {p.mode}+split {cache.slots}", p.placement, p.mode,
                     f"{blocks}, {cache.slots} slots per host block, misses computed on the CPU meanwhile",
                     expert_cache_slots=cache.slots, split=True, upload_budget=cache.upload_budget)]
    if cache.slots >= p.model.n_expert_used:
        out.append(Candidate(f"plan {p.mode}+cache {cache.slots}", p.placement, p.mode,
                             f"{blocks}, the same {cache.slots} slots uploading every miss first",
                             expert_cache_slots=cache.slots))
    return out


def candidates(plans: Sequence[Plan]) -> list[Candidate]:
    """The planner's choice in each mode, then llama.cpp's own behaviours as baselines: every
    expert on host (`--cpu-moe`), the first N blocks' experts on host with the plan's memory use
    (`--n-cpu-moe N`), and everything on the accelerator when the budget holds it. `plans` share
    the model, accelerator and budget; the first is a cpu-mode plan without an expert cache
    (resident blocks only)."""
    base = plans[0]
    model, device = base.model, base.accelerator.name
    repack = base.placement.repack
    out = [c for p in plans for c in plan_candidates(p)]

    def host_experts(layers: list[int] | None) -> Placement:
        overrides = ((names.expert_pattern(layers), HOST_BUFFER_TYPE),) if layers != [] else ()
        return Placement(devices=(device,), overrides=overrides, n_gpu_layers=-1, repack=repack)

    out.append(Candidate(BASELINE, host_experts(None), "cpu", "llama.cpp --cpu-moe: every expert in host memory"))
    layers = [i for i in range(model.n_layer) if model.expert_bytes(i)]
    resident_bytes = sum(model.expert_bytes(i) for i in base.resident)
    n = next(k for k in range(len(layers) + 1) if sum(model.expert_bytes(i) for i in layers[k:]) <= resident_bytes)
    if n > 0:  # --n-cpu-moe 0 is the all-accelerator candidate below
        out.append(Candidate(f"--n-cpu-moe {n}", host_experts(layers[:n]), "cpu",
                             f"llama.cpp --n-cpu-moe {n}: the first {n} blocks' experts in host memory"))
    if not base.host_layers:
        out.append(Candidate("all-accel", Placement(devices=(device,), n_gpu_layers=-1, repack=repack),
                             "accelerator", "every layer on the accelerator, no overrides"))
    return out


def prompt_tokens(engine: Engine, n: int) -> list[int]:
    """`n` tokens of plain prose (the same for every candidate)."""
    tokens: list[int] = []
    while len(tokens) < n:
        tokens += engine.tokenize(FILLER_TEXT, add_special=not tokens)
    return tokens[:n]


def measure(engine: Engine, prompt: Sequence[int], gen_tokens: int) -> Measurement:
    """One greedy generation, with peak RSS and accelerator memory sampled at every token, and
    the expert cache's hit rate when the engine has one."""
    probe = MemoryProbe(engine)
    process = psutil.Process()
    peak_rss, peak_acc, stats, tokens = process.memory_info().rss, None, None, []

    def sample() -> None:
        nonlocal peak_rss, peak_acc
        peak_rss = max(peak_rss, process.memory_info().rss)
        acc = probe.accelerator()
        if acc is not None:
            peak_acc = max(peak_acc or 0, acc.used)

    sample()
    for event in engine.generate(prompt, max_tokens=gen_tokens):
        sample()
        stats = event.stats
        if event.token is not None:
            tokens.append(event.token)
    cache = engine.expert_cache
    hit_rate = cache.summary().hit_rate if cache is not None and cache.enabled else None
    return Measurement(stats.prompt_tps, stats.decode_tps, stats.ttft_seconds, peak_acc, peak_rss, tokens, hit_rate)


def run_bench(
    model,
    cands: Sequence[Candidate],
    *,
    n_ctx: int,
    n_batch: int,
    prompt_len: int,
    gen_tokens: int,
    runs: int,
    n_threads: int | None = None,
    on_run: Callable[[int, Candidate, Measurement], None] | None = None,
    load_options: dict | None = None,
) -> list[Result]:
    """Run 0 warms every candidate up (not counted); runs 1..`runs` are timed. Each run loads
    every candidate in turn and closes it before the next (an RPC server serves one client).
    `load_options` are more Engine.load arguments, the same for every candidate (n_ubatch, kv_type, ...)."""
    if prompt_len + gen_tokens > n_ctx:
        raise UserError(f"--prompt-tokens {prompt_len} plus --gen-tokens {gen_tokens} do not fit --ctx {n_ctx}")
    results = [Result(c) for c in cands]
    inv = read_inventory(model)
    prompt: list[int] | None = None
    for run in range(runs + 1):
        for result in results:
            cand = result.candidate
            cache = None
            if cand.expert_cache_slots is not None:
                cache = ExpertCache.on_device(inv, cand.expert_cache_slots, cand.placement.devices[0], split=cand.split,
                                              upload_budget=cand.upload_budget, n_threads=n_threads or 0)
            with Engine.load(model, cand.placement, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads,
                             expert_cache=cache, **(load_options or {})) as engine:
                prompt = prompt or prompt_tokens(engine, prompt_len)
                m = measure(engine, prompt, gen_tokens)
            if run:
                result.runs.append(m)
            if on_run:
                on_run(run, result.candidate, m)
        baseline = next((r for r in results if r.candidate.name == BASELINE), None)
        if run and baseline is not None and baseline.runs[-1].decode_tps > 0:
            for result in results:
                result.decode_ratios.append(result.runs[-1].decode_tps / baseline.runs[-1].decode_tps)
    return results


def differing_outputs(results: Sequence[Result]) -> list[str]:
    """Names of the candidates whose greedy tokens differ from the first run of the first
    candidate with the same CPU kernel layout (llama.cpp's repacked CPU kernels round differently
    from its plain ones), or from their own earlier runs."""
    out = []
    for r in results:
        first = next(f for f in results if f.candidate.placement.repack == r.candidate.placement.repack)
        if any(m.tokens != first.runs[0].tokens for m in r.runs):
            out.append(r.candidate.name)
    return out


def recommend(results: Sequence[Result]) -> Result:
    """The candidate with the fastest median decode (prompt speed breaks ties); where candidates
    share its placement (e.g. `--n-cpu-moe N` equal to the plan), the first of them."""
    best = max(results, key=lambda r: (r.summary("decode_tps")["median"], r.summary("prompt_tps")["median"]))
    return next(r for r in results if r.candidate.placement == best.candidate.placement)
