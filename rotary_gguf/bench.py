"""Benchmark placements side by side on this machine: the planner's choice (with and without its
expert cache) and llama.cpp's own flags (`--cpu-moe`, `--n-cpu-moe N`, everything on the
accelerator), each loaded with the engine, run on the same prompt tokens with greedy decoding,
interleaved run by run so drift hits all alike.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import psutil

from . import arch as names
from .dashboard import MemoryProbe
from .draft import verdict as verdicts
from .engine import Engine
from .errors import UserError
from .experts.cache import ExpertCache
from .experts.policies import CacheStats
from .inventory import read_inventory
from .plan import HOST_BUFFER_TYPE, Placement, Plan, make_plan
from .speed_model import Layout, PlanSpeeds, Prediction
from .verify import LOGIT_RTOL, logit_trace, max_logit_difference

BASELINE = "--cpu-moe"
# Allowed logit difference between candidates whose routed experts compute on different kernels:
# llama.cpp's repacked CPU kernels (and an accelerator's) quantize activations and sum in other
# orders than the plain CPU ones (the same kernels agree bit for bit). At least KERNEL_RTOL of the
# reference's largest |logit|, and at least KERNEL_NOISE_FACTOR times what swapping the CPU's own
# kernels moves this model's logits (`kernel_noise`): a model amplifies rounding through its blocks
# by its own measure. Measured: a 2-block q4_k_m test model 0.9-1.5% of the largest logit; 8-block
# ones 12-16%, and placements that mix the two kernel families differ by up to 1.25x that.
KERNEL_RTOL = 0.05
KERNEL_NOISE_FACTOR = 2.0
NOISY_SPREAD = 0.20  # a decode speed whose spread (max - min) over the runs exceeds this share of its median is noisy
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
    layout: Layout = Layout(accelerator=False)  # where its experts run, as the speed model sees it
    draft_max: int = 0  # MTP drafts a round (0: none)

    @property
    def names(self) -> tuple[str, ...]:
        """Every name of a merged candidate ("plan cpu = --n-cpu-moe 3")."""
        return tuple(self.name.split(" = "))

    def setup(self, tensor_names: Sequence[str]) -> tuple:
        """What loading a model of `tensor_names` this way does: candidates with the same setup are
        the same placement, however their overrides are spelled."""
        placement = replace(self.placement, overrides=self.placement.buffers(tensor_names))
        return placement, self.expert_cache_slots, self.split, self.upload_budget, self.draft_max

    def with_drafts(self, draft_max: int) -> "Candidate":
        """The same candidate drafting with the model's MTP block: "... +mtp"."""
        return replace(self, name=f"{self.name} +mtp", draft_max=draft_max,
                       description=f"{self.description}, MTP drafts of up to {draft_max} tokens")


@dataclass
class Measurement:
    """One timed run of one candidate."""

    prompt_tps: float
    decode_tps: float
    ttft_seconds: float
    peak_accelerator_bytes: int | None  # of all accelerators together
    peak_rss_bytes: int
    tokens: list[int]
    cache_hit_rate: float | None = None  # of the expert cache over the run (prompt and decode)
    draft_acceptance: float | None = None  # share of MTP drafts accepted, with drafts on
    mean_accepted: float | None = None  # drafts accepted per round, with drafts on
    peak_accelerator_bytes_by_device: dict[str, int] = field(default_factory=dict)  # each one's own peak


@dataclass
class Result:
    """Every timed run of one candidate, and the figures over them."""

    candidate: Candidate
    runs: list[Measurement] = field(default_factory=list)
    decode_ratios: list[float] = field(default_factory=list)  # per run, against the baseline's same run
    expert_buffers: dict[str, str] = field(default_factory=dict)  # expert tensor -> where it computes
    prediction: Prediction | None = None  # the speed model's, from this machine's calibration

    @property
    def kernel_path(self) -> str:
        """Where its routed experts compute, e.g. "RPC0+CPU_REPACK" (see `expert_buffers`)."""
        where = {part for buffers in self.expert_buffers.values() for part in buffers.split("+")}
        return "+".join(sorted(where, key=lambda b: (b.startswith(HOST_BUFFER_TYPE), b)))

    FIGURES = ("prompt_tps", "decode_tps", "ttft_seconds", "peak_accelerator_bytes", "peak_rss_bytes", "cache_hit_rate",
               "draft_acceptance", "mean_accepted")

    def values(self, figure: str) -> list[float]:
        return [v for v in (getattr(m, figure) for m in self.runs) if v is not None]

    def device_peaks(self) -> dict[str, dict]:
        """Each accelerator's peak memory over the runs (median, spread, runs), by device name."""
        names = dict.fromkeys(name for m in self.runs for name in m.peak_accelerator_bytes_by_device)
        out = {}
        for name in names:
            values = [m.peak_accelerator_bytes_by_device[name] for m in self.runs if name in m.peak_accelerator_bytes_by_device]
            out[name] = {"median": statistics.median(values), "spread": max(values) - min(values), "runs": values}
        return out

    def summary(self, figure: str) -> dict | None:
        """Median and spread (max - min) of a figure over the runs; None where it was not measured."""
        values = self.values(figure) if figure != "decode_ratio" else self.decode_ratios
        if not values:
            return None
        return {"median": statistics.median(values), "spread": max(values) - min(values), "runs": values}

    def prediction_error(self, figure: str) -> float | None:
        """Measured median over predicted, minus one (+0.1: 10% faster than predicted)."""
        measured = self.summary(figure)
        if self.prediction is None or measured is None:
            return None
        return measured["median"] / getattr(self.prediction, figure) - 1.0

    def to_json(self) -> dict:
        c = self.candidate
        return {
            "name": c.name,
            "description": c.description,
            "mode": c.mode,
            "kernel_path": self.kernel_path,
            "expert_cache_slots": c.expert_cache_slots,
            "draft_max": c.draft_max,
            "cache_misses": None if c.expert_cache_slots is None else "split" if c.split else "upload",
            "devices": list(c.placement.devices),
            "overrides": [list(o) for o in c.placement.overrides],
            "figures": {f: self.summary(f) for f in (*self.FIGURES, "decode_ratio")},
            "peak_accelerator_bytes_by_device": self.device_peaks(),
            "predicted": self.prediction.to_json() if self.prediction else None,
            "decode_prediction_error": self.prediction_error("decode_tps"),
            "output_tokens": self.runs[0].tokens if self.runs else [],
        }


def without_expert_cache(plan: Plan) -> Plan:
    """The same plan with no expert cache (its residency re-planned for the whole budget)."""
    return make_plan(plan.model, plan.accelerator, plan.budget, budget_source=plan.budget_source, mode=plan.mode,
                     mode_reason=plan.mode_reason, ctx=plan.ctx, n_batch=plan.n_batch, kv_type=plan.kv_type,
                     notes=plan.notes, draft_max=plan.draft.draft_max if plan.draft else 0)


def plan_candidates(p: Plan) -> list[Candidate]:
    """The plan as planned; a split-compute plan also with the same slots uploading every miss
    first (when a token's experts fit them), the policy for fast links."""
    blocks = f"{len(p.resident)} of {len(p.resident) + len(p.host_layers)} expert blocks resident"
    cache = p.expert_cache
    host = p.host_layers
    if cache is None:
        return [Candidate(f"plan {p.mode}", p.placement, p.mode, blocks, layout=p.speed_layout(host))]
    uploading = p.speed_layout(host, cache.slots, "upload")
    if not cache.split:
        return [Candidate(f"plan {p.mode}+cache {cache.slots}", p.placement, p.mode,
                          f"{blocks}, {cache.slots} expert cache slots per host block, misses uploaded first",
                          expert_cache_slots=cache.slots, layout=uploading)]
    out = [Candidate(f"plan {p.mode}+split {cache.slots}", p.placement, p.mode,
                     f"{blocks}, {cache.slots} slots per host block, misses computed on the CPU meanwhile",
                     expert_cache_slots=cache.slots, split=True, upload_budget=cache.upload_budget,
                     layout=p.speed_layout(host, cache.slots))]
    if cache.slots >= p.model.n_expert_used:
        out.append(Candidate(f"plan {p.mode}+cache {cache.slots}", p.placement, p.mode,
                             f"{blocks}, the same {cache.slots} slots uploading every miss first",
                             expert_cache_slots=cache.slots, layout=uploading))
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

    layers = [i for i in range(model.n_layer) if model.expert_bytes(i)]
    out.append(Candidate(BASELINE, host_experts(None), "cpu", "llama.cpp --cpu-moe: every expert in host memory",
                         layout=base.speed_layout(layers)))
    resident_bytes = sum(model.expert_bytes(i) for i in base.resident)
    n = next(k for k in range(len(layers) + 1) if sum(model.expert_bytes(i) for i in layers[k:]) <= resident_bytes)
    if n > 0:  # --n-cpu-moe 0 is the all-accelerator candidate below
        out.append(Candidate(f"--n-cpu-moe {n}", host_experts(layers[:n]), "cpu",
                             f"llama.cpp --n-cpu-moe {n}: the first {n} blocks' experts in host memory",
                             layout=base.speed_layout(layers[:n])))
    if not base.host_layers:
        out.append(Candidate("all-accel", Placement(devices=(device,), n_gpu_layers=-1, repack=repack),
                             "accelerator", "every layer on the accelerator, no overrides", layout=base.speed_layout([])))
    return merged(out, [t for t, _ in model.tensors])


def with_drafting(cands: Sequence[Candidate], drafting: Sequence[Candidate]) -> list[Candidate]:
    """`cands` with each of the `drafting` candidates ("X +mtp") right after the one it drafts on (X)."""
    out: list[Candidate] = []
    for c in cands:
        out += [c] + [d for d in drafting if d.name.removesuffix(" +mtp") == c.names[0]]
    return out + [d for d in drafting if d not in out]


def draft_verdicts(model, results: Sequence[Result], threads: int) -> list[tuple[str, verdicts.Verdict]]:
    """For every drafting candidate ("X +mtp") measured beside X: whether its median decode beat
    X's, recorded for `--draft auto` (`draft.verdict`). Returns (candidate name, verdict) pairs."""
    plain = {r.candidate.names[0]: r for r in results if not r.candidate.draft_max}
    out = []
    for r in results:
        c, twin = r.candidate, plain.get(r.candidate.name.removesuffix(" +mtp"))
        if not c.draft_max or twin is None or not r.runs:
            continue
        draft_tps, plain_tps = r.summary("decode_tps")["median"], twin.summary("decode_tps")["median"]
        acceptance, mean = r.summary("draft_acceptance"), r.summary("mean_accepted")
        verdict = verdicts.Verdict(draft_tps > plain_tps, plain_tps, draft_tps,
                                   acceptance["median"] if acceptance else None, mean["median"] if mean else 0.0,
                                   len(r.runs), verdicts.now())
        key = verdicts.setup_key(model, c.placement, c.expert_cache_slots, c.split, c.draft_max, threads)
        verdicts.record(key, verdict)
        out.append((c.name, verdict))
    return out


def spread_candidates(p: Plan) -> list[Candidate]:
    """A plan over several devices (`Plan.shares`), then the first device alone: its own plan within
    its budget and llama.cpp's baselines on it (`candidates`), where its budget holds every
    block's other tensors (else the plan alone)."""
    names = [s.accelerator.name for s in p.shares]
    blocks = f"{len(p.resident)} of {len(p.resident) + len(p.host_layers)} expert blocks resident over {', '.join(names)}"
    out = [Candidate(f"plan {'+'.join(names)}", p.placement, p.mode, blocks, layout=p.speed_layout(p.host_layers))]
    first = p.shares[0]
    try:
        alone = make_plan(p.model, first.accelerator, first.budget, mode="cpu", ctx=p.ctx, n_batch=p.n_batch,
                          n_ubatch=p.n_ubatch, kv_type=p.kv_type, flash_attn=p.flash_attn)
    except UserError:  # its budget is too small for every block's other tensors
        return out
    own = f"plan {alone.mode}"
    return out + [replace(c, name=" = ".join(f"plan {first.accelerator.name} alone" if n == own else n for n in c.names))
                  for c in candidates([alone])]


def add_predictions(results: Sequence[Result], speeds: PlanSpeeds, prompt_batch: int | None = None) -> None:
    """The speed model's prompt and decode t/s for every candidate, beside what was measured (the
    prompt at the tokens per graph the runs evaluated)."""
    for r in results:
        r.prediction = speeds.predict(r.candidate.layout, prompt_batch)


def merged(cands: Sequence[Candidate], tensor_names: Sequence[str]) -> list[Candidate]:
    """Candidates that load a model of `tensor_names` the same way as one, the first's spelling
    named after all of them ("plan cpu = --n-cpu-moe 3"): measured once, so a recommendation never
    picks one of two identical placements over the other."""
    by_setup: dict[tuple, Candidate] = {}
    for c in cands:
        setup = c.setup(tensor_names)
        first = by_setup.get(setup)
        by_setup[setup] = c if first is None else replace(first, name=f"{first.name} = {c.name}")
    return list(by_setup.values())


def prompt_tokens(engine: Engine, n: int) -> list[int]:
    """`n` tokens of plain prose (the same for every candidate)."""
    tokens: list[int] = []
    while len(tokens) < n:
        tokens += engine.tokenize(FILLER_TEXT, add_special=not tokens)
    return tokens[:n]


def measure(engine: Engine, prompt: Sequence[int], gen_tokens: int) -> Measurement:
    """One greedy generation, with peak RSS and accelerator memory (all accelerators together, and
    each one's) sampled at every token, and the expert cache's hit rate over it when the engine
    has one. A freshly loaded engine's first prompt also pays for first touching the weights (page
    faults of the mapped file, the first graph's allocations; a ggml-rpc server's first graph):
    10-25% of a 64-token prompt on a 2-core machine. So the prompt runs once first, untimed, and is
    forgotten: the figures are those of a loaded engine, as a server or a chat sees them."""
    for _ in engine.generate(prompt, max_tokens=1):
        pass
    engine.reset()
    cache = engine.expert_cache
    counted = cache.summary() if cache is not None and cache.enabled else None
    probe = MemoryProbe(engine)
    process = psutil.Process()
    peak_rss, peak_acc, stats, tokens = process.memory_info().rss, None, None, []
    by_device: dict[str, int] = {}

    def sample() -> None:
        nonlocal peak_rss, peak_acc
        peak_rss = max(peak_rss, process.memory_info().rss)
        accs = probe.accelerators()
        if accs:
            peak_acc = max(peak_acc or 0, sum(acc.used for acc in accs))
        for acc in accs:
            by_device[acc.name] = max(by_device.get(acc.name, 0), acc.used)

    sample()
    for event in engine.generate(prompt, max_tokens=gen_tokens):
        sample()
        stats = event.stats
        if event.token is not None:
            tokens.append(event.token)
    hit_rate = None
    if counted is not None and cache.enabled:
        now = cache.summary()
        hit_rate = CacheStats(now.hits - counted.hits, now.misses - counted.misses).hit_rate
    drafting = engine.drafter is not None
    acceptance = stats.draft_accepted / stats.drafted_tokens if stats.drafted_tokens else None
    return Measurement(stats.prompt_tps, stats.decode_tps, stats.ttft_seconds, peak_acc, peak_rss, tokens, hit_rate,
                       acceptance, stats.mean_accepted if drafting else None, by_device)


@contextmanager
def loaded(model, cand: Candidate, *, n_ctx: int, n_batch: int, n_threads: int | None,
           load_options: dict | None = None) -> Iterator[Engine]:
    """The model loaded the candidate's way (with its expert cache, if any); `load_options` are
    more Engine.load arguments."""
    cache = None
    if cand.expert_cache_slots is not None:
        cache = ExpertCache.on_device(read_inventory(model), cand.expert_cache_slots, cand.placement.devices[0],
                                      split=cand.split, upload_budget=cand.upload_budget, n_threads=n_threads or 0)
    drafts = dict(draft="mtp", draft_max=cand.draft_max) if cand.draft_max else {}
    with Engine.load(model, cand.placement, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads,
                     expert_cache=cache, **drafts, **(load_options or {})) as engine:
        yield engine


def expert_buffers(engine: Engine, cand: Candidate) -> dict[str, str]:
    """Where each routed-expert tensor computes, as the buffer type llama.cpp put it in: CPU_REPACK
    (the CPU's repacked kernels), CPU (its plain ones) or an accelerator (RPC0, CUDA0). Under an
    expert cache, a host tensor also computes in the cache's accelerator slots. The trunk's tensors
    only: an MTP block drafts, and its experts are loaded only then."""
    report, placement = engine.load_report, cand.placement
    device = placement.devices[0] if placement.devices and placement.n_gpu_layers else None
    cpu = "CPU_REPACK" if "CPU_REPACK" in report.weight_bytes else HOST_BUFFER_TYPE
    inv = engine.inventory
    trunk = inv.n_layer - inv.hparam("nextn_predict_layers")
    out = {}
    for t in (t for t in inv.expert_tensors if t.layer < trunk):
        where = report.overridden.get(t.name, device or cpu)
        cached = cand.expert_cache_slots is not None and device and where != device
        out[t.name] = f"{device}+{where}" if cached else where
    return out


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
) -> tuple[list[Result], list[int]]:
    """Run 0 warms every candidate up (not counted); runs 1..`runs` are timed. Each run loads
    every candidate in turn and closes it before the next (an RPC server serves one client).
    `load_options` are more Engine.load arguments, the same for every candidate (n_ubatch,
    kv_type, ...). Returns the results and the prompt's tokens."""
    if prompt_len + gen_tokens > n_ctx:
        raise UserError(f"--prompt-tokens {prompt_len} plus --gen-tokens {gen_tokens} do not fit --ctx {n_ctx}")
    results = [Result(c) for c in cands]
    prompt: list[int] = []
    for run in range(runs + 1):
        for result in results:
            cand = result.candidate
            with loaded(model, cand, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads, load_options=load_options) as engine:
                prompt = prompt or prompt_tokens(engine, prompt_len)
                result.expert_buffers = result.expert_buffers or expert_buffers(engine, cand)
                m = measure(engine, prompt, gen_tokens)
            if run:
                result.runs.append(m)
            if on_run:
                on_run(run, result.candidate, m)
        baseline = next((r for r in results if BASELINE in r.candidate.names), None)
        if run and baseline is not None and baseline.runs[-1].decode_tps > 0:
            for result in results:
                result.decode_ratios.append(result.runs[-1].decode_tps / baseline.runs[-1].decode_tps)
    return results, prompt


@dataclass
class OutputCheck:
    """A candidate whose greedy tokens differ from the reference's (the first candidate's first run),
    with the reference's tokens fed through both and their logits compared position by position."""

    name: str
    kernel_path: str
    reference: str
    reference_path: str
    first_step: int  # the first generated token that differs, over the candidate's runs (0-based)
    steps: int  # generated tokens compared
    max_abs_diff: float  # the largest |logit difference| at any position
    # at each run's first differing step, the reference's logit of its token minus that of the
    # candidate's token (the largest over the runs): how near a tie the tokens parted at
    tie_gap: float
    tolerance: float  # LOGIT_RTOL of the reference's largest |logit| on the same kernels, else see KERNEL_RTOL
    same_kernels: bool  # every expert tensor computes on the same kernels in both
    kernel_noise: float = 0.0  # what swapping the CPU's kernels alone changes (compared on other kernels)

    @property
    def legitimate(self) -> bool:
        """Logits within the tolerance everywhere, and the tokens flipped only at near ties."""
        return self.max_abs_diff <= self.tolerance and self.tie_gap <= self.tolerance

    def describe(self) -> str:
        where = f"{self.name} ({self.kernel_path}) vs {self.reference} ({self.reference_path})"
        if self.same_kernels:
            basis = f"{LOGIT_RTOL:g} of the largest logit"
        elif self.tolerance > self.kernel_noise * KERNEL_NOISE_FACTOR:
            basis = f"{KERNEL_RTOL:g} of the largest logit: other kernels for some experts"
        else:
            basis = (f"other kernels for some experts: {KERNEL_NOISE_FACTOR:g}x the {self.kernel_noise:.3g} that the "
                     f"CPU's repacked kernels alone move this model's logits from its plain ones")
        figures = (f"max |logit difference| {self.max_abs_diff:.3g} with the same tokens fed, "
                   f"top two logits {self.tie_gap:.3g} apart where the tokens part, "
                   f"tolerance {self.tolerance:.3g} ({basis})")
        if self.legitimate:
            return (f"greedy tokens part at generated token {self.first_step + 1} of {self.steps} in {where}: "
                    f"a near tie that the kernels' rounding differences flip; {figures}")
        return f"greedy outputs differ in {where} from generated token {self.first_step + 1} of {self.steps}: {figures}"

    def to_json(self) -> dict:
        return {"candidate": self.name, "kernel_path": self.kernel_path, "reference": self.reference,
                "reference_kernel_path": self.reference_path, "first_differing_token": self.first_step,
                "tokens_compared": self.steps, "max_abs_diff": self.max_abs_diff, "tie_gap": self.tie_gap,
                "tolerance": self.tolerance, "same_kernels": self.same_kernels, "kernel_noise": self.kernel_noise,
                "within_tolerance": self.legitimate}


def check_outputs(model, results: Sequence[Result], prompt: Sequence[int], *, n_ctx: int, n_batch: int,
                  n_threads: int | None = None, load_options: dict | None = None) -> list[OutputCheck]:
    """Every candidate whose greedy tokens differ from the reference's, checked the way `verify`
    does: the reference's tokens fed through the reference and through the candidate, and the
    logits compared at every position. Loads the reference and each differing candidate once more,
    and where kernels differ, the model on the CPU alone twice (`kernel_noise`)."""
    reference = results[0]
    tokens = reference.runs[0].tokens
    differing = [r for r in results if any(m.tokens != tokens for m in r.runs)]
    if not differing:
        return []

    def trace(cand: Candidate) -> list:
        """Logits after the prompt and after each of the reference's tokens."""
        with loaded(model, cand, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads, load_options=load_options) as engine:
            return logit_trace(engine, list(prompt), len(tokens), feed=tokens).logits

    expected = trace(reference.candidate)
    noise = 0.0
    if any(r.expert_buffers != reference.expert_buffers for r in differing):
        repacked, plain = (trace(Candidate(f"cpu-only {kind}", Placement(repack=kind == "repacked"), "cpu-only", ""))
                           for kind in ("repacked", "plain"))
        noise = max(max_logit_difference(x, y) for x, y in zip(repacked, plain))
    return [compare_outputs(reference, result, expected, trace(result.candidate), noise) for result in differing]


def compare_outputs(reference: Result, result: Result, expected: Sequence[np.ndarray],
                    got: Sequence[np.ndarray], kernel_noise: float = 0.0) -> OutputCheck:
    """`result`'s runs against the reference's first, from the logits of both with the reference's
    tokens fed (`expected`, `got`: after the prompt and after each token); `kernel_noise` is what
    swapping the CPU's kernels alone moves the logits (see KERNEL_RTOL)."""
    tokens = reference.runs[0].tokens
    same_kernels = result.expert_buffers == reference.expert_buffers
    largest = max(float(np.abs(v).max()) for v in expected)
    tolerance = (LOGIT_RTOL * largest if same_kernels
                 else max(KERNEL_RTOL * largest, KERNEL_NOISE_FACTOR * kernel_noise))
    parts = {_first_difference(m.tokens, tokens) for m in result.runs if m.tokens != tokens}

    def gap(i: int) -> float:
        """How far below the reference's choice at step i the candidate's is, in the reference's logits."""
        chosen = tokens[i] if i < len(tokens) else int(expected[i].argmax())
        return float(expected[i][chosen] - expected[i][int(got[i].argmax())])

    return OutputCheck(result.candidate.name, result.kernel_path, reference.candidate.name, reference.kernel_path,
                       first_step=min(parts), steps=len(tokens),
                       max_abs_diff=max(max_logit_difference(x, y) for x, y in zip(expected, got)),
                       tie_gap=max(gap(i) for i in parts), tolerance=tolerance, same_kernels=same_kernels,
                       kernel_noise=0.0 if same_kernels else kernel_noise)


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def recommend(results: Sequence[Result]) -> Result:
    """The candidate with the fastest median decode (prompt speed breaks ties)."""
    return max(results, key=lambda r: (r.summary("decode_tps")["median"], r.summary("prompt_tps")["median"]))


def noise_warnings(results: Sequence[Result], best: Result, runs: int) -> list[str]:
    """Where the decode speeds are too noisy to trust: a candidate's spread beyond NOISY_SPREAD of
    its median, or the recommendation's lead over the runner-up within their spread."""
    if runs == 1:
        return ["one timed run per candidate shows no spread, so the noise is unknown: run with more --runs"]
    out = []
    for r in results:
        s = r.summary("decode_tps")
        if s["median"] and s["spread"] > NOISY_SPREAD * s["median"]:
            out.append(f"{r.candidate.name}: decode speed spread ±{s['spread'] / s['median']:.0%} over {runs} runs, "
                       f"more than {NOISY_SPREAD:.0%} of its median (a busy machine?)")
    others = [r for r in results if r is not best]
    if others:
        runner_up = recommend(others)
        a, b = best.summary("decode_tps"), runner_up.summary("decode_tps")
        if a["median"] - b["median"] <= max(a["spread"], b["spread"]):
            out.append(f"too noisy to tell {best.candidate.name} and {runner_up.candidate.name} apart: decode "
                       f"{a['median']:.1f} vs {b['median']:.1f} t/s, a lead within the runs' spread "
                       f"({max(a['spread'], b['spread']):.1f} t/s): run with more --runs")
    return out
