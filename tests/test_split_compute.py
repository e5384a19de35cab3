"""Split compute on the simulated accelerator: hits run in the accelerator's slots while a CPU
worker computes the misses from the host copy, and every logit and greedy token is the uncached
run's, bit for bit (both sides use ggml's CPU kernels on the same bytes: the RPC device's CPU and
the worker's)."""

from __future__ import annotations

import numpy as np
import pytest
from test_expert_cache import FOLLOW_UP, PROMPT, host_experts, session

from rotary_gguf import native
from rotary_gguf.engine import Engine
from rotary_gguf.experts.cache import SPLIT_MAX_TOKENS, ExpertCache
from rotary_gguf.inventory import read_inventory

CASES = {
    "qwen3moe-f32-top4": dict(arch="qwen3moe", router_skew=1.5),
    "qwen3moe-q8_0": dict(arch="qwen3moe", quant="q8_0", router_skew=1.5),
    "qwen35moe-f32-separate": dict(arch="qwen35moe", router_skew=1.5),
    "qwen35moe-q8_0-fused": dict(arch="qwen35moe", quant="q8_0", fused_gate_up=True, router_skew=1.5),
    "qwen35moe-q4_k_m-fused": dict(arch="qwen35moe", quant="q4_k_m", fused_gate_up=True, router_skew=1.5),
    "qwen35moe-q4_k_m-separate": dict(arch="qwen35moe", quant="q4_k_m", router_skew=1.5),
    "qwen3moe-top1": dict(arch="qwen3moe", used=1, router_skew=1.5),
    "qwen35moe-top8": dict(arch="qwen35moe", experts=16, used=8, router_skew=1.5),
}


def split_cache(inv, slots: int, rpc, **kwargs) -> ExpertCache:
    return ExpertCache(inv.n_layer, inv.n_expert, inv.n_expert_used, slots, rpc.buffer_type, split=True,
                       n_threads=1, **kwargs)


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_split_runs_give_the_uncached_output_bit_for_bit(test_model, rpc_endpoint, case):
    path = test_model(**CASES[case])
    inv = read_inventory(path)
    rpc = native.add_rpc_device(rpc_endpoint)
    reference = session(path, host_experts(rpc))
    for slots in sorted({0, inv.n_expert_used // 2, inv.n_expert // 2, inv.n_expert - 1, inv.n_expert}):
        cache = split_cache(inv, slots, rpc)
        got = session(path, host_experts(rpc), cache)
        snap = got.pop("snapshot")
        assert snap["enabled"], snap["disabled_reason"]
        for key, value in reference.items():
            assert np.array_equal(np.asarray(got[key]), np.asarray(value)), (slots, key)
        if slots == inv.n_expert:  # a slot for every expert: nothing is left for the CPU
            assert not snap["split"]
            continue
        assert snap["split"] and snap["cpu_seconds"] > 0
        if slots == 0:  # everything ran on the CPU worker
            assert snap["hits"] == 0 and snap["misses"] > 0 and snap["uploaded_bytes"] == 0
        else:
            assert snap["hits"] > 0 and snap["misses"] > 0 and snap["uploaded_bytes"] > 0
            assert all(len(r) <= slots for r in snap["resident"].values())


def test_two_hundred_tokens_under_heavy_eviction_stay_exact(test_model, rpc_endpoint):
    path = test_model(arch="qwen35moe", quant="q4_k_m", fused_gate_up=True, router_skew=0.5)
    inv = read_inventory(path)
    rpc = native.add_rpc_device(rpc_endpoint)
    cache = split_cache(inv, 2, rpc)
    outputs = []
    for c in (None, cache):
        with Engine.load(path, host_experts(rpc), n_ctx=512, n_threads=1, expert_cache=c) as engine:
            tokens = engine.greedy(engine.tokenize(PROMPT), 200)
            outputs.append((tokens, engine.logits()))
    assert len(outputs[0][0]) == 200 and outputs[0][0] == outputs[1][0]
    assert np.array_equal(outputs[0][1], outputs[1][1])
    snap = cache.snapshot()
    # two slots for a top-4 router: most selections miss, and the slots churn
    assert snap["misses"] > snap["hits"] > 0
    assert snap["uploaded_bytes"] > 20 * inv.n_layer * _expert_bytes(inv)


def _expert_bytes(inv) -> int:
    return sum(t.nbytes for t in inv.tensors if t.layer == 0 and t.expert_kind) // inv.n_expert


def test_the_upload_budget_bounds_what_each_call_moves(test_model, rpc_endpoint):
    path = test_model(arch="qwen3moe", router_skew=1.5)
    inv = read_inventory(path)
    rpc = native.add_rpc_device(rpc_endpoint)
    reference = session(path, host_experts(rpc))
    expert = _expert_bytes(inv)
    for budget in (0, expert):
        cache = split_cache(inv, inv.n_expert // 2, rpc, upload_budget=budget)
        got = session(path, host_experts(rpc), cache)
        snap = got.pop("snapshot")
        for key, value in reference.items():
            assert np.array_equal(np.asarray(got[key]), np.asarray(value)), (budget, key)
        calls = snap["hits"] + snap["misses"]  # at most one expert uploaded per decode call
        assert snap["uploaded_bytes"] <= budget * calls
        if budget == 0:
            assert snap["hits"] == 0 and snap["uploaded_bytes"] == 0
        else:
            assert snap["hits"] > 0


def test_short_batches_split_and_long_prompts_leave_the_slots_alone(test_model, rpc_endpoint):
    """A batch of up to SPLIT_MAX_TOKENS tokens is split like a decode step; a longer prompt
    takes llama.cpp's own path and evicts nothing decode put in the slots."""
    path = test_model(arch="qwen35moe", quant="q8_0", fused_gate_up=True, router_skew=1.5)
    inv = read_inventory(path)
    rpc = native.add_rpc_device(rpc_endpoint)
    cache = split_cache(inv, inv.n_expert // 2, rpc)
    logits = []
    for c in (None, cache):
        with Engine.load(path, host_experts(rpc), n_ctx=256, n_threads=1, expert_cache=c) as engine:
            prompt = engine.tokenize(PROMPT + FOLLOW_UP)
            assert len(prompt) > 2 * SPLIT_MAX_TOKENS
            engine.eval(prompt[:SPLIT_MAX_TOKENS])  # one batch, split
            got = [engine.logits()]
            if c is not None:
                assert c.fallback_calls == 0 and c.summary().misses > 0
            for token in prompt[SPLIT_MAX_TOKENS:SPLIT_MAX_TOKENS + 6]:
                engine.eval([token])
            if c is not None:
                resident = c.resident()
                assert any(resident.values())
            engine.eval(prompt[SPLIT_MAX_TOKENS + 6:])  # a long batch: llama.cpp's path
            got.append(engine.logits())
            if c is not None:
                assert c.fallback_calls == 1 and c.resident() == resident
            logits.append(got)
    assert all(np.array_equal(a, b) for a, b in zip(*logits))


def test_slot_counts_outside_the_model_are_refused_for_split(test_model):
    inv = read_inventory(test_model(arch="qwen3moe"))
    with pytest.raises(native.UserError, match="slots per block"):
        ExpertCache(inv.n_layer, inv.n_expert, inv.n_expert_used, -1, 0, split=True)


def test_the_dashboard_and_metrics_show_the_split(test_model, rpc_endpoint):
    """Per block and overall, the share of expert computations on the accelerator vs the CPU, the
    CPU worker's time per token and the bytes uploaded per token: on the dashboard and /metrics."""
    from test_dashboard import render
    from test_serve import parse_prometheus

    from rotary_gguf.dashboard import Dashboard
    from rotary_gguf.metrics import prometheus_text
    from rotary_gguf.telemetry import RoutingTelemetry

    path = test_model(arch="qwen35moe", quant="q8_0", fused_gate_up=True, router_skew=1.5)
    inv = read_inventory(path)
    rpc = native.add_rpc_device(rpc_endpoint)
    telemetry = RoutingTelemetry.for_model(path)
    cache = split_cache(inv, inv.n_expert // 4, rpc)
    with Engine.load(path, host_experts(rpc), n_ctx=256, n_threads=1, telemetry=telemetry, expert_cache=cache) as engine:
        engine.greedy(engine.tokenize(PROMPT), 24)
        dashboard = Dashboard(engine, telemetry=telemetry)
        lines = render(dashboard, 120, 30)
        snap = dashboard.reading.cache
        samples = parse_prometheus(prometheus_text(engine.live.snapshot(), engine.accelerator_memory(), snap))
    text = "\n".join(lines)
    assert snap["split"] and 0 < snap["hit_rate"] < 1 and snap["split_tokens"] == 23  # the prompt batch ran llama.cpp's path
    assert snap["cpu_seconds_per_token"] > 0 and snap["uploaded_bytes_per_token"] > 0 and snap["hot_seconds_per_token"] > 0
    assert f"on accel {snap['hit_rate']:.1%} · CPU {1 - snap['hit_rate']:.1%}" in text
    assert f"CPU worker {snap['cpu_seconds_per_token'] * 1e3:.2f} ms/token" in text and "/token" in text
    assert "split compute" in text
    assert samples["rotary_gguf_expert_accelerator_share"] == snap["hit_rate"]
    for layer, share in snap["layer_hit_rate"].items():
        assert samples[f'rotary_gguf_expert_accelerator_share_layer{{layer="{layer}"}}'] == share
    assert samples["rotary_gguf_expert_cpu_seconds_per_token"] == snap["cpu_seconds_per_token"] > 0
    assert samples["rotary_gguf_expert_cache_upload_bytes_per_token"] == snap["uploaded_bytes_per_token"]


def test_bench_measures_split_beside_upload_resident_only_and_llama_cpp_flags(test_model, rpc_endpoint):
    import json

    from conftest import run_cli

    path = test_model(arch="qwen3moe", router_skew=1.5)
    plan = json.loads(run_cli("plan", path, "--rpc", rpc_endpoint, "--ctx", "256", "--json", "--expert-cache", "off").stdout)
    budget = plan["minimum_budget"] + plan["layers"][0]["expert_bytes"] + 9 * sum(l["expert_bytes"] for l in plan["layers"]) // 32
    result = run_cli("bench", path, "--rpc", rpc_endpoint, "--vram", f"{budget}B", "--expert-cache", "8", "--ctx", "256",
                     "--prompt-tokens", "16", "--gen-tokens", "16", "--runs", "1", "--threads", "1", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    by_name = {c["name"]: c for c in doc["candidates"]}
    assert {"plan cpu+split 8", "plan cpu+cache 8", "--cpu-moe"} <= by_name.keys()
    plain = next(c for n, c in by_name.items() if "plan cpu" in n.split(" = "))  # may be merged with --n-cpu-moe N
    assert any(name.startswith("--n-cpu-moe") for n in by_name for name in n.split(" = "))
    split, upload = by_name["plan cpu+split 8"], by_name["plan cpu+cache 8"]
    assert (split["cache_misses"], upload["cache_misses"], plain["cache_misses"]) == ("split", "upload", None)
    assert 0 < split["figures"]["cache_hit_rate"]["median"] < 1
    assert doc["outputs_identical"] and split["output_tokens"] == by_name["--cpu-moe"]["output_tokens"]


def test_plan_takes_split_computes_hit_rates_from_a_routing_profile(test_model, rpc_endpoint, tmp_path):
    import json

    from conftest import assert_one_line_error, run_cli

    path = test_model(arch="qwen3moe", router_skew=1.5)
    profile = tmp_path / "routing.json"
    recorded = run_cli("profile", path, "--tokens", "8", "-o", profile)
    assert recorded.returncode == 0, recorded.stderr
    result = run_cli("plan", path, "--rpc", rpc_endpoint, "--ctx", "256", "--json", "--profile", profile)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    reason = plan["expert_cache"]["reason"] if plan["expert_cache"] else plan["expert_cache_reason"]
    assert "hit rates from routing.json" in reason
    other = test_model(arch="qwen35moe", experts=16)
    assert_one_line_error(run_cli("plan", other, "--rpc", rpc_endpoint, "--profile", profile), "routing.json")
