"""The rotary expert cache: policies and their replay, and the live cache on the simulated
accelerator giving the uncached output bit for bit, with its statistics matching a replay."""

from __future__ import annotations

import numpy as np
import pytest

from rotary_gguf import native
from rotary_gguf.arch import expert_pattern
from rotary_gguf.experts import cache as ec
from rotary_gguf.engine import Engine
from rotary_gguf.experts.cache import ExpertCache
from rotary_gguf.experts.policies import POLICIES, CacheStats, Trace, make_policy, play_step, replay, total
from rotary_gguf.inventory import read_inventory
from rotary_gguf.plan import Placement

PROMPT = "The river bends twice before it reaches the sea, and"
FOLLOW_UP = " then the tide comes in over the flats"


# --- policies ---------------------------------------------------------------------------------
def run_policy(name: str, slots: int, steps: list[list[int]], **kwargs) -> tuple[CacheStats, list]:
    policy = make_policy(name, slots, 8, **kwargs)
    stats, uploads = CacheStats(), []
    for needed in steps:
        uploads.append(play_step(policy, needed, stats))
    return stats, uploads


def test_lru_evicts_the_expert_used_longest_ago():
    stats, uploads = run_policy("lru", 2, [[0], [1], [0], [2], [1]])
    assert uploads == [[(0, 0)], [(1, 1)], [], [(2, 1)], [(1, 0)]]  # 2 evicts 1, then 1 evicts 0
    assert (stats.hits, stats.misses) == (1, 4)


def test_decayed_lfu_keeps_the_frequent_expert_through_one_off_experts():
    steps = [[0], [0], [0], [1], [2], [0], [3], [0], [4], [0]]
    lru, _ = run_policy("lru", 2, steps)
    lfu, _ = run_policy("lfu-decay", 2, steps)
    assert (lru.hits, lfu.hits) == (4, 5)  # LRU drops expert 0 for 1 and 2; LFU never does
    assert lfu.hits + lfu.misses == lru.hits + lru.misses == len(steps)


def test_a_step_that_needs_more_experts_than_slots_falls_back_and_keeps_the_cache():
    policy = make_policy("lru", 3, 8)
    stats = CacheStats()
    play_step(policy, [1, 2], stats)
    assert play_step(policy, [0, 1, 2, 3], stats) is None
    assert policy.slot_of == {1: 0, 2: 1}
    assert play_step(policy, [2, 1], stats) == []
    assert (stats.hits, stats.misses, stats.fallback_steps, stats.steps) == (2, 2, 1, 3)


def test_belady_bounds_the_live_policies_on_a_skewed_trace():
    rng = np.random.default_rng(0)
    weights = 1.0 / np.arange(1, 33) ** 1.2
    trace = Trace(32, 4)
    for _ in range(400):
        trace.record(0, [rng.choice(32, size=4, replace=False, p=weights / weights.sum()).tolist()])
    prior = trace.counts()
    for slots in (4, 8, 16):
        best = total(replay(trace, "belady", slots)).hit_rate
        for policy in POLICIES:
            assert total(replay(trace, policy, slots, prior=prior)).hit_rate <= best + 1e-12, (policy, slots)
    assert total(replay(trace, "lru", 32)).misses == len(set().union(*trace.layer_steps(0)))  # only cold misses


def test_trace_round_trips_through_a_file(tmp_path):
    trace = Trace(8, 2, {0: [[[1, 2]], [[3, 4], [1, 5]]], 2: [[[0, 7]]]})
    trace.save(tmp_path / "t.json")
    again = Trace.load(tmp_path / "t.json")
    assert again.steps == trace.steps and again.layer_steps(0) == [{1, 2}, {1, 3, 4, 5}]


# --- the live cache on the simulated accelerator ---------------------------------------------
def host_experts(rpc: native.Device) -> Placement:
    """Everything on the accelerator but the routed experts; host experts in ggml's plain layout."""
    return Placement(devices=(rpc.name,), n_gpu_layers=-1, overrides=((expert_pattern(), "CPU"),), repack=False)


def session(path, placement, cache=None, *, n_batch=64) -> dict:
    """Logits and greedy tokens for a prompt processed in one batch, then token by token, then a
    second turn that reuses the kept context (prefix reuse)."""
    with Engine.load(path, placement, n_ctx=256, n_batch=n_batch, n_threads=1, expert_cache=cache) as engine:
        prompt = engine.tokenize(PROMPT)
        engine.eval(prompt)
        out = {"batch_logits": engine.logits(), "batch_tokens": engine.greedy(prompt, 6)}
        engine.reset()
        for token in prompt:
            engine.eval([token])
        out["stepwise_logits"] = engine.logits()
        first = engine.greedy(prompt, 24)
        second = prompt + first + engine.tokenize(FOLLOW_UP, add_special=False)
        out["turns"] = first + engine.greedy(second, 8)
        out["last_logits"] = engine.logits()
        if cache is not None:
            out["snapshot"] = cache.snapshot()
    return out


CASES = {
    "qwen3moe-f32": dict(arch="qwen3moe", router_skew=1.5),
    "qwen3moe-q8_0": dict(arch="qwen3moe", quant="q8_0", router_skew=1.5),
    "qwen35moe-f32": dict(arch="qwen35moe", router_skew=1.5),
    "qwen35moe-q4_k_m-fused": dict(arch="qwen35moe", quant="q4_k_m", fused_gate_up=True, router_skew=1.5),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_cached_runs_give_the_uncached_output_bit_for_bit(test_model, rpc_endpoint, case):
    path = test_model(**CASES[case])
    inv = read_inventory(path)
    rpc = native.add_rpc_device(rpc_endpoint)
    placement = host_experts(rpc)
    reference = session(path, placement)
    for slots in sorted({inv.n_expert_used, inv.n_expert_used + 2, inv.n_expert // 2, inv.n_expert}):
        caches = {path_: ExpertCache(inv.n_layer, inv.n_expert, inv.n_expert_used, slots, rpc.buffer_type, hot_path=path_)
                  for path_ in ("python", "native")}
        caches["python"].trace = Trace(inv.n_expert, inv.n_expert_used)
        for hot_path, cache in caches.items():
            got = session(path, placement, cache)
            snap = got.pop("snapshot")
            assert snap["enabled"], snap["disabled_reason"]
            for key, value in reference.items():
                assert np.array_equal(np.asarray(got[key]), np.asarray(value)), (hot_path, slots, key)
            # the prompt batches fell back (more experts than slots could need), the decodes did not
            assert snap["fallback_calls"] > 0 and snap["uploaded_bytes"] > 0
            assert 0 < snap["hit_rate"] < 1
            assert all(len(r) <= slots for r in snap["resident"].values())
        # the live statistics are those of replaying what the cache saw through the same policy,
        # and the native hot path's are the same as the Python one's
        python, native_cache = caches["python"], caches["native"]
        native_cache.summary()  # reads the native counters into its stats
        replayed = replay(python.trace, python.policy_name, slots)
        counts = lambda stats: {layer: (s.hits, s.misses) for layer, s in stats.items()}  # noqa: E731
        assert counts(replayed) == counts(python.stats) == counts(native_cache.stats), slots
        assert python.uploaded_bytes == native_cache.uploaded_bytes
        assert python.resident() == native_cache.resident()


def test_without_uploads_the_self_check_turns_the_cache_off(test_model, rpc_endpoint, monkeypatch):
    """The cached path really computes on the accelerator's slots: skipping the uploads breaks
    it, the startup check notices, and llama.cpp's own path gives the reference output."""
    path = test_model(arch="qwen3moe", router_skew=1.5)
    inv = read_inventory(path)
    rpc = native.add_rpc_device(rpc_endpoint)
    reference = session(path, host_experts(rpc))
    monkeypatch.setattr(native, "tensor_set", lambda *args: None)
    cache = ExpertCache(inv.n_layer, inv.n_expert, inv.n_expert_used, inv.n_expert_used, rpc.buffer_type, hot_path="python")
    got = session(path, host_experts(rpc), cache)
    assert not got["snapshot"]["enabled"]
    assert "did not reproduce" in got["snapshot"]["disabled_reason"]
    assert got["turns"] == reference["turns"]
    assert np.array_equal(got["last_logits"], reference["last_logits"])


def test_startup_checks_turn_the_cache_off_with_a_reason(test_model, rpc_endpoint, monkeypatch):
    path = test_model(arch="qwen3moe")
    inv = read_inventory(path)
    rpc = native.add_rpc_device(rpc_endpoint)
    # every expert on the accelerator: nothing to cache
    resident = Placement(devices=(rpc.name,), n_gpu_layers=-1, repack=False)
    cache = ExpertCache(inv.n_layer, inv.n_expert, inv.n_expert_used, inv.n_expert_used, rpc.buffer_type)
    session(path, resident, cache)
    assert cache.disabled_reason == "no host-resident expert tensors in this placement"
    # a llama-cpp-python the cache was not verified with
    monkeypatch.setattr(ec, "VERIFIED_LLAMA_CPP_PYTHON", ("0.0.1",))
    cache = ExpertCache(inv.n_layer, inv.n_expert, inv.n_expert_used, inv.n_expert_used, rpc.buffer_type)
    session(path, host_experts(rpc), cache)
    assert "is not one the cache was verified with" in cache.disabled_reason


def test_slot_counts_outside_the_model_are_refused(test_model):
    inv = read_inventory(test_model(arch="qwen3moe"))
    for slots in (inv.n_expert_used - 1, inv.n_expert + 1):
        with pytest.raises(ec.UserError, match="slots per block"):
            ExpertCache(inv.n_layer, inv.n_expert, inv.n_expert_used, slots, 0)


def test_a_long_run_with_eviction_at_every_step_stays_exact(test_model, rpc_endpoint):
    """As few slots as experts used: nearly every decode step evicts and uploads."""
    path = test_model(arch="qwen35moe", router_skew=1.5)
    inv = read_inventory(path)
    rpc = native.add_rpc_device(rpc_endpoint)
    outputs = []
    for cache in (None, ExpertCache(inv.n_layer, inv.n_expert, inv.n_expert_used, inv.n_expert_used, rpc.buffer_type)):
        with Engine.load(path, host_experts(rpc), n_ctx=256, n_threads=1, expert_cache=cache) as engine:
            tokens = engine.greedy(engine.tokenize(PROMPT), 96)
            outputs.append((tokens, engine.logits()))
    assert outputs[0][0] == outputs[1][0] and len(outputs[0][0]) == 96
    assert np.array_equal(outputs[0][1], outputs[1][1])
    stats = cache.summary()
    assert stats.misses > stats.hits  # the cache really churned


def test_routing_telemetry_counts_the_same_with_the_cache(test_model, rpc_endpoint):
    """One eval callback serves both: with the cache live, the telemetry sees every selection
    (in the file's expert ids, not the slots they were remapped to), as it does without it."""
    from rotary_gguf.telemetry import RoutingTelemetry

    path = test_model(arch="qwen35moe", router_skew=1.5)
    inv = read_inventory(path)
    rpc = native.add_rpc_device(rpc_endpoint)
    runs = []
    for slots in (None, inv.n_expert_used + 2):
        telemetry = RoutingTelemetry(inv)
        cache = None if slots is None else ExpertCache(inv.n_layer, inv.n_expert, inv.n_expert_used, slots, rpc.buffer_type)
        with Engine.load(path, host_experts(rpc), n_ctx=256, n_threads=1, telemetry=telemetry, expert_cache=cache) as engine:
            tokens = engine.greedy(engine.tokenize(PROMPT), 24)
            runs.append((tokens, telemetry.counts(), telemetry.layer_tokens()))
            if cache is not None:
                assert cache.enabled and cache.summary().hits > 0
    (plain_tokens, plain_counts, plain_layer_tokens), (tokens, counts, layer_tokens) = runs
    assert tokens == plain_tokens
    assert np.array_equal(layer_tokens, plain_layer_tokens) and plain_layer_tokens.max() > 0
    assert np.array_equal(counts, plain_counts)


def test_a_batch_too_big_for_the_slots_falls_back_and_keeps_the_cache(test_model, rpc_endpoint):
    """A batch whose tokens could select more distinct experts than the slots hold runs
    llama.cpp's own path: the residents and counts stay as they were, the output is the uncached
    one, and the next single-token call is served from the same slots."""
    path = test_model(arch="qwen3moe", router_skew=1.5)
    inv = read_inventory(path)
    rpc = native.add_rpc_device(rpc_endpoint)
    slots = inv.n_expert_used * 3  # a batch of 4 tokens could need 4 x used distinct experts
    outputs = []
    for cache in (None, ExpertCache(inv.n_layer, inv.n_expert, inv.n_expert_used, slots, rpc.buffer_type)):
        with Engine.load(path, host_experts(rpc), n_ctx=256, n_threads=1, expert_cache=cache) as engine:
            prompt = engine.tokenize(PROMPT)
            assert len(prompt) >= 8
            for token in prompt[:3]:
                engine.eval([token])
            if cache is not None:
                before = (cache.resident(), cache.summary().hits, cache.summary().misses, cache.fallback_calls)
            engine.eval(prompt[3:7])  # 4 tokens: the fallback
            logits = [engine.logits()]
            if cache is not None:
                after = (cache.resident(), cache.summary().hits, cache.summary().misses, cache.fallback_calls)
                assert after[:3] == before[:3] and after[3] == before[3] + 1
            engine.eval(prompt[7:8])
            logits.append(engine.logits())
            if cache is not None:
                assert cache.summary().hits + cache.summary().misses > before[1] + before[2]
            outputs.append(logits)
    assert all(np.array_equal(a, b) for a, b in zip(*outputs))
