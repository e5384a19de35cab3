"""The planner on its own: budget math, the policy, the minimum-budget error, modes, JSON.

Pure: no llama.cpp is loaded. Figures come from generated GGUF files (through the inventory) or
are built by hand with the real model's widths (Qwen3.6-35B-A3B, DESIGN facts).
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
from predict_split import qwen36_figures  # Qwen3.6-35B-A3B's figures, shared with the speed predictor

from rotary_gguf import arch as names
from rotary_gguf.errors import UserError
from rotary_gguf.inventory import read_inventory
from rotary_gguf.plan import (
    Accelerator,
    LinkFigures,
    ModelFigures,
    accelerator_compute_bytes,
    choose_mode,
    kv_cache_bytes,
    make_plan,
    predicted_token_seconds,
    recurrent_state_bytes,
)

MiB, GiB = 2**20, 2**30
RPC = Accelerator("RPC0", "RPC0[127.0.0.1:1]", None, 64 * GiB, streams_host_ops=False, runtime_reserve=0)
CUDA = Accelerator.planned_cuda()


@pytest.fixture(scope="module")
def tiny(test_model):
    return {a: ModelFigures.from_inventory(read_inventory(test_model(arch=a))) for a in ("qwen3moe", "qwen35moe")}


# --- memory model -----------------------------------------------------------------------------------
def test_kv_cache_and_recurrent_state_for_the_real_widths():
    m = qwen36_figures()
    # 10 full-attention blocks x (K + V) x 2 KV heads x 256 dims x 2 bytes (F16) = 20 KiB a token
    assert kv_cache_bytes(m, 1024) == 1024 * 20 * 1024
    assert kv_cache_bytes(m, 1000) == kv_cache_bytes(m, 1024)  # llama.cpp pads the context to 256
    assert kv_cache_bytes(m, 1024, "q8_0") == 1024 * 10 * 2 * (512 // 32 * 34)
    # 30 Gated DeltaNet blocks x (conv 3 x 8192 + ssm 128 x 4096) f32: ~63 MiB a sequence
    assert recurrent_state_bytes(m) == 30 * (3 * 8192 + 128 * 4096) * 4
    assert 62 * MiB < recurrent_state_bytes(m) < 64 * MiB


def test_compute_estimate_grows_with_batch_and_context():
    m = qwen36_figures()
    small, big_batch, big_ctx = (accelerator_compute_bytes(m, c, b) for c, b in ((4096, 64), (4096, 512), (65536, 512)))
    assert small < big_batch < big_ctx
    # with every token an output, llama.cpp reserves logits for the whole batch: vocab x batch x 4 bytes
    every = accelerator_compute_bytes(m, 4096, 512, all_outputs=True)
    assert every >= 248320 * 512 * 4
    # with one output a batch (n_outputs_max = 1) the widest block sizes it: the logits no longer do
    assert every - big_batch >= 248320 * 511 * 4 - 100 * MiB and big_batch < 100 * MiB
    # without flash attention every head's f32 scores over the context: 16 heads x 4096 x 512 x 4 bytes more
    assert accelerator_compute_bytes(m, 4096, 512, flash_attn=False) >= big_batch + 16 * 4096 * 512 * 4
    # and never reserves for more tokens than the context holds
    assert accelerator_compute_bytes(m, 256, 512) == accelerator_compute_bytes(m, 256, 256)


def test_unknown_kv_type_is_one_line():
    with pytest.raises(UserError, match="unknown KV cache type 'q3_x'"):
        kv_cache_bytes(qwen36_figures(), 1024, "q3_x")


def test_figures_from_a_generated_model(tiny):
    m = tiny["qwen35moe"]
    assert m.attention == ("linear", "linear", "linear", "full")
    assert all(m.expert_bytes(i) > 0 for i in range(m.n_layer))
    total = sum(n for _, n in m.tensors)
    experts = sum(m.expert_bytes(i) for i in range(m.n_layer))
    assert m.base_weight_bytes == total - experts - m.embedding_bytes  # the model has its own output tensor
    assert recurrent_state_bytes(m) > 0 and recurrent_state_bytes(tiny["qwen3moe"]) == 0


def test_dense_model_is_refused(test_model):
    with pytest.raises(UserError, match="not a Mixture-of-Experts model"):
        ModelFigures.from_inventory(read_inventory(test_model(arch="qwen3")))


# --- policy -----------------------------------------------------------------------------------------
def test_real_model_on_an_8_gib_gpu():
    m = qwen36_figures()
    plan = make_plan(m, CUDA, 8 * GiB, ctx=32768)
    use = plan.accelerator_use
    assert use.total <= 8 * GiB and plan.margin >= 0
    assert use.kv_cache == 32768 * 20 * 1024 and use.runtime_reserve > 0
    assert 0 < len(plan.resident) < m.n_layer
    # the blocks are all the same size: one block's bytes more budget keeps exactly one more resident
    more = make_plan(m, CUDA, 8 * GiB + m.expert_bytes(0), ctx=32768)
    assert len(more.resident) == len(plan.resident) + 1
    assert use.staging == 210 * MiB  # the largest host expert tensor (Q6_K down)
    assert plan.host_use.weights == m.embedding_bytes + sum(m.expert_bytes(i) for i in plan.host_layers)


def test_budget_too_small_states_the_minimum():
    m = qwen36_figures()
    minimum = make_plan(m, CUDA, 64 * GiB).minimum_budget
    assert make_plan(m, CUDA, minimum).resident == frozenset()
    with pytest.raises(UserError) as err:
        make_plan(m, CUDA, minimum - 1)
    message = str(err.value)
    assert "\n" not in message and "too small" in message
    assert f"--vram {-(-minimum // MiB)}MiB" in message


def test_largest_blocks_stay_resident_first_and_ties_prefer_later_blocks(tiny):
    m = tiny["qwen3moe"]
    minimum = make_plan(m, RPC, 10 * GiB).minimum_budget
    layer = m.expert_bytes(0)
    two = make_plan(m, RPC, minimum + 2 * layer)
    assert sorted(two.resident) == [2, 3] and two.host_layers == [0, 1]
    assert sorted(make_plan(m, RPC, 10 * GiB).resident) == [0, 1, 2, 3]

    uneven = qwen36_figures(n_layer=4)
    big = dict(uneven.tensors) | {"blk.1.ffn_down_exps.weight": 400 * MiB}
    uneven = dataclasses.replace(uneven, tensors=tuple(big.items()))
    base = make_plan(uneven, RPC, 64 * GiB).minimum_budget
    assert make_plan(uneven, RPC, base + uneven.expert_bytes(1)).resident == {1}


def test_overrides_match_exactly_the_host_expert_tensors():
    for fused in (False, True):
        m = qwen36_figures(n_layer=8, fused=fused)
        plan = make_plan(m, RPC, make_plan(m, RPC, 64 * GiB).minimum_budget + 3 * m.expert_bytes(0))
        ((pattern, buft),) = plan.overrides
        assert buft == "CPU"
        matched = {name for name, _ in m.tensors if re.search(pattern, name)}
        expected = {name for name, _ in m.tensors if names.expert_kind(name) and names.block_index(name) in plan.host_layers}
        assert matched == expected and len(expected) == len(plan.host_layers) * (2 if fused else 3)
        for name, _ in m.tensors:
            assert plan.location(name) == ("CPU" if name in expected or name == "token_embd.weight" else RPC.buffer_type)


def test_placement_for_each_mode():
    m = qwen36_figures()
    cpu = make_plan(m, CUDA, 8 * GiB).placement
    assert cpu.devices == ("CUDA0",) and cpu.n_gpu_layers == -1
    assert cpu.offload_min_batch is None and cpu.use_mmap and cpu.repack
    rotary = make_plan(m, CUDA, 8 * GiB, mode="rotary")
    assert rotary.placement.offload_min_batch == 1
    assert not rotary.placement.use_mmap and not rotary.placement.repack  # pinned memory, plain layout
    assert {buft for _, buft in rotary.overrides} == {"CUDA_Host"}
    everything = make_plan(m, CUDA, 64 * GiB)
    assert everything.overrides == () and everything.accelerator_use.staging == 0


def test_staging_copy_only_where_llama_cpp_makes_one():
    m = qwen36_figures()
    budget = 8 * GiB
    assert make_plan(m, RPC, budget).accelerator_use.staging == 0  # RPC has no offload_op
    assert make_plan(m, CUDA, budget, n_batch=16).accelerator_use.staging == 0  # decode and small batches stay on the CPU
    assert make_plan(m, CUDA, budget, n_batch=16, mode="rotary").accelerator_use.staging == 210 * MiB
    assert make_plan(m, CUDA, budget, n_batch=512).accelerator_use.staging == 210 * MiB  # prompt batches are offloaded


# --- modes ------------------------------------------------------------------------------------------
def test_rotary_needs_a_gpu():
    with pytest.raises(UserError, match="rotary mode needs a CUDA GPU"):
        make_plan(qwen36_figures(), RPC, 8 * GiB, mode="rotary")
    with pytest.raises(UserError, match="unknown host-expert mode"):
        make_plan(qwen36_figures(), RPC, 8 * GiB, mode="fast")


def test_auto_mode_without_a_gpu_says_why():
    mode, reason = choose_mode("auto", RPC)
    assert mode == "cpu" and "no CUDA device" in reason and "offload_op" in reason
    mode, reason = choose_mode("auto", CUDA)
    assert mode == "cpu" and "not on this machine" in reason
    assert choose_mode("rotary", RPC)[0] == "rotary"  # an explicit choice is make_plan's to refuse


def test_auto_mode_picks_the_faster_predicted_token():
    gpu = Accelerator("CUDA0", "CUDA0", "CUDA_Host", 8 * GiB, streams_host_ops=True, runtime_reserve=256 * MiB)
    plan = make_plan(qwen36_figures(), gpu, 8 * GiB)
    slow_link = LinkFigures(upload_bytes_per_s=3e9, cpu_expert_bytes_per_s=40e9)
    fast_link = LinkFigures(upload_bytes_per_s=50e9, cpu_expert_bytes_per_s=5e9)
    assert choose_mode("auto", gpu, plan, slow_link)[0] == "cpu"
    mode, reason = choose_mode("auto", gpu, plan, fast_link)
    assert mode == "rotary" and "ms" in reason
    cpu_s, rotary_s = predicted_token_seconds(plan, slow_link)
    # 8 of 256 experts of each host block: the bytes a token reads, over the measured speed
    per_token = plan.host_expert_bytes_per_token
    assert per_token == pytest.approx(sum(plan.model.expert_bytes(i) for i in plan.host_layers) * 8 / 256)
    assert cpu_s == pytest.approx(per_token / 40e9, rel=0.5) and rotary_s > per_token / 3e9
    everything = make_plan(qwen36_figures(), gpu, 64 * GiB)
    assert choose_mode("auto", gpu, everything, fast_link) == ("cpu", "every expert block fits on the accelerator: no host experts to run")


# --- JSON -------------------------------------------------------------------------------------------
def test_json_is_stable_and_complete(tiny):
    m = tiny["qwen35moe"]
    budget = make_plan(m, RPC, 10 * GiB).minimum_budget + 2 * m.expert_bytes(0)
    first = json.dumps(make_plan(m, RPC, budget).to_json())
    assert first == json.dumps(make_plan(m, RPC, budget).to_json())
    s = json.loads(first)
    assert s["vram_budget"] == budget and s["host_expert_mode"] == "cpu"
    assert s["predicted"]["accelerator_bytes"] <= budget and s["predicted"]["host_bytes"] > 0
    assert [(layer["index"], layer["experts"]) for layer in s["layers"]] == [(0, "host"), (1, "host"), (2, "accelerator"), (3, "accelerator")]
    assert s["overrides"] == [[names.expert_pattern([0, 1]), "CPU"]]
    assert s["margin_bytes"] == budget - s["predicted"]["accelerator_bytes"]


# --- expert cache -----------------------------------------------------------------------------------
def one_slot(m: ModelFigures, layers) -> int:
    """The bytes of one slot in each of `layers`: one expert of each of their expert tensors."""
    return sum(n // m.n_expert for i in layers for n in m.expert_tensors[i])


def test_auto_cache_fills_the_budget_left_after_the_resident_blocks(tiny):
    m = tiny["qwen3moe"]
    minimum = make_plan(m, RPC, 10 * GiB).minimum_budget
    budget = minimum + m.expert_bytes(3) + 10 * one_slot(m, [0, 1, 2]) + 5
    plan = make_plan(m, RPC, budget, expert_cache="auto", cache_misses="upload")
    assert plan.resident == make_plan(m, RPC, budget).resident == {3}  # residency as without the cache
    cache = plan.expert_cache
    assert cache.slots == 10 and cache.layers == (0, 1, 2) and plan.expert_cache_reason == ""
    assert cache.slot_bytes == tuple(m.expert_bytes(i) // m.n_expert for i in (0, 1, 2))
    assert cache.bytes == plan.accelerator_use.expert_cache == 10 * one_slot(m, [0, 1, 2])
    assert plan.accelerator_use.total <= budget - plan.estimate_margin  # the margin for the estimates stays free
    assert plan.margin - plan.estimate_margin < one_slot(m, [0, 1, 2])  # one more slot would not fit
    assert cache.reason.startswith("auto: 10 slots per block")


def test_auto_cache_needs_a_tokens_experts_and_host_blocks(tiny):
    m = tiny["qwen3moe"]
    minimum = make_plan(m, RPC, 10 * GiB).minimum_budget
    short = make_plan(m, RPC, minimum + m.expert_bytes(3) + 7 * one_slot(m, [0, 1, 2]), expert_cache="auto", cache_misses="upload")
    assert short.expert_cache is None and short.accelerator_use.expert_cache == 0
    assert "holds 7 slots per block, fewer than the 8 auto needs (2x the 4 experts a token uses)" in short.expert_cache_reason
    assert make_plan(m, RPC, minimum + m.expert_bytes(3) + 8 * one_slot(m, [0, 1, 2]), expert_cache="auto", cache_misses="upload").expert_cache.slots == 8
    everything = make_plan(m, RPC, 10 * GiB, expert_cache="auto", cache_misses="upload")
    assert everything.expert_cache is None and "every expert block is resident" in everything.expert_cache_reason
    assert make_plan(m, RPC, 10 * GiB).expert_cache_reason == "the expert cache is off"


def test_explicit_slots_make_room_by_keeping_fewer_blocks_resident(tiny):
    m = tiny["qwen3moe"]
    budget = make_plan(m, RPC, 10 * GiB).minimum_budget + 2 * m.expert_bytes(0)
    assert len(make_plan(m, RPC, budget).resident) == 2
    plan = make_plan(m, RPC, budget, expert_cache=8, cache_misses="upload")
    assert plan.resident == {3} and plan.expert_cache.slots == 8 and plan.expert_cache.layers == (0, 1, 2)
    assert plan.accelerator_use.expert_cache == 8 * one_slot(m, [0, 1, 2]) and plan.accelerator_use.total <= budget

    real = qwen36_figures()
    off, cached = (make_plan(real, CUDA, 8 * GiB, ctx=32768, expert_cache=s, cache_misses="upload") for s in ("off", 64))
    assert len(cached.resident) < len(off.resident) and cached.accelerator_use.total <= 8 * GiB
    assert cached.accelerator_use.expert_cache == 64 * one_slot(real, cached.host_layers)


def test_bad_cache_settings_are_one_line_errors(tiny):
    m = tiny["qwen3moe"]
    for slots in (3, 33):
        with pytest.raises(UserError, match="takes 4 to 32 expert cache slots per block"):
            make_plan(m, RPC, 10 * GiB, expert_cache=slots, cache_misses="upload")
    with pytest.raises(UserError, match="unknown expert cache setting 'lots'"):
        make_plan(m, RPC, 10 * GiB, expert_cache="lots")
    minimum = make_plan(m, RPC, 10 * GiB).minimum_budget
    every_block = range(m.n_layer)
    with pytest.raises(UserError) as err:
        make_plan(m, RPC, minimum + 10 * one_slot(m, every_block) - 1, expert_cache=10, cache_misses="upload")
    message = str(err.value)
    assert "\n" not in message and "too small for 10 expert cache slots" in message and "9 slots per block fit" in message
    with pytest.raises(UserError, match="not even 4 slots per block fit"):
        make_plan(m, RPC, minimum + 3 * one_slot(m, every_block), expert_cache=4, cache_misses="upload")


def test_placement_with_a_cache_keeps_host_experts_in_the_plain_layout(tiny):
    real = qwen36_figures()
    off, cached = (make_plan(real, CUDA, 8 * GiB, expert_cache=s, cache_misses="upload") for s in ("off", 16))
    assert off.placement.repack and off.placement.use_mmap and {b for _, b in off.overrides} == {"CPU"}
    assert cached.expert_cache is not None and cached.placement.offload_min_batch is None
    assert not cached.placement.repack and not cached.placement.use_mmap  # pinned memory, plain layout
    assert {b for _, b in cached.overrides} == {"CUDA_Host"} == {cached.location(f"blk.{cached.host_layers[0]}.ffn_up_exps.weight")}

    m = tiny["qwen3moe"]
    rpc = make_plan(m, RPC, make_plan(m, RPC, 10 * GiB).minimum_budget + 2 * m.expert_bytes(0), expert_cache=4, cache_misses="upload")
    assert not rpc.placement.repack and rpc.placement.use_mmap  # RPC has no pinned host memory
    assert {b for _, b in rpc.overrides} == {"CPU"}


def test_json_has_the_expert_cache(tiny):
    m = tiny["qwen3moe"]
    budget = make_plan(m, RPC, 10 * GiB).minimum_budget + 2 * m.expert_bytes(0)
    first = json.dumps(make_plan(m, RPC, budget, expert_cache=6, cache_misses="upload").to_json())
    assert first == json.dumps(make_plan(m, RPC, budget, expert_cache=6, cache_misses="upload").to_json())
    s = json.loads(first)
    slot = {str(i): m.expert_bytes(i) // m.n_expert for i in (0, 1, 2)}
    assert s["expert_cache"] == {
        "slots": 6, "slots_per_layer": {"0": 6, "1": 6, "2": 6}, "layers": [0, 1, 2], "slot_bytes": slot,
        "bytes": 6 * sum(slot.values()), "misses": "upload", "upload_budget": None,
        "reason": "6 slots per block were asked for",
    }
    assert s["predicted"]["accelerator"]["expert_cache"] == s["expert_cache"]["bytes"]
    assert s["predicted"]["accelerator_bytes"] <= budget and "expert_cache_reason" not in s
    assert s["placement"]["repack"] is False
    off = make_plan(m, RPC, budget).to_json()
    assert off["expert_cache"] is None and off["expert_cache_reason"] == "the expert cache is off"


# --- split compute ----------------------------------------------------------------------------------
def test_split_auto_is_never_predicted_slower_than_resident_blocks_alone(tiny):
    """At every budget, auto weighs slot counts against the resident blocks the same memory holds:
    the chosen plan's predicted host-expert time is at most that of resident blocks alone."""
    real = qwen36_figures()
    for m, device in ((tiny["qwen35moe"], RPC), (real, CUDA)):
        minimum = make_plan(m, device, 100 * GiB).minimum_budget
        full = minimum + sum(m.expert_bytes(i) for i in range(m.n_layer))
        chosen = []
        for k in range(0, 21):
            budget = minimum + (full - minimum) * k // 20
            split = make_plan(m, device, budget, expert_cache="auto")
            plain = make_plan(m, device, budget)
            assert split.accelerator_use.total <= budget
            assert split.predicted_host_expert_seconds() <= plain.predicted_host_expert_seconds()
            if split.expert_cache is not None:
                cache = split.expert_cache
                assert cache.split and 0 < cache.slots < m.n_expert
                assert cache.bytes == (cache.slots + 1) * sum(cache.slot_bytes)  # and the zero slot
                assert split.accelerator_use.expert_cache == cache.bytes and "split slots per block" in cache.reason
                chosen.append(cache.slots)
        if m is real:  # a tiny model's experts cost less than the syncs split compute adds
            assert chosen, "split compute never won at any budget on Qwen3.6"


def test_split_takes_fewer_slots_than_a_token_uses(tiny):
    m = tiny["qwen3moe"]
    budget = make_plan(m, RPC, 10 * GiB).minimum_budget + 2 * m.expert_bytes(0)
    plan = make_plan(m, RPC, budget, expert_cache=2)
    cache = plan.expert_cache
    assert cache.split and cache.slots == 2 and cache.upload_budget == m.n_expert_used * max(cache.slot_bytes)
    assert plan.to_json()["expert_cache"]["misses"] == "split"
    with pytest.raises(UserError, match="takes 1 to 32 expert cache slots per block, not 0"):
        make_plan(m, RPC, budget, expert_cache=0)
    every = make_plan(m, RPC, 10 * GiB, expert_cache=m.n_expert)  # a slot for every expert: nothing to split
    assert every.expert_cache is None or not every.expert_cache.split
    with pytest.raises(UserError, match="unknown cache-miss handling 'later'"):
        make_plan(m, RPC, budget, cache_misses="later")


def test_a_routing_profile_sets_split_computes_hit_rates():
    """Uniform routing: a cache holds its share of the experts, no more, and resident blocks win;
    a router whose few experts take most selections makes split compute win by more than the
    field figures say."""
    from rotary_gguf.decode_cost import profile_hit_rates
    from rotary_gguf.plan import HitRates

    real = qwen36_figures()
    assert profile_hit_rates([5, 1, 3, 1]) == (0.0, 0.5, 0.8, 0.9, 1.0)
    uniform = HitRates("uniform.json", {i: profile_hit_rates([10] * real.n_expert) for i in range(real.n_layer)})
    peaked = HitRates("peaked.json", {i: profile_hit_rates([1000] * 16 + [1] * (real.n_expert - 16))
                                      for i in range(real.n_layer)})
    budget = int(6.3 * 10**9)
    plain = make_plan(real, CUDA, budget)
    field = make_plan(real, CUDA, budget, expert_cache="auto")
    flat = make_plan(real, CUDA, budget, expert_cache="auto", hit_rates=uniform)
    sharp = make_plan(real, CUDA, budget, expert_cache="auto", hit_rates=peaked)
    assert field.expert_cache is not None and "field hit rates" in field.expert_cache.reason
    assert flat.expert_cache is None and flat.resident == plain.resident
    assert "no slot count beat" in flat.expert_cache_reason and "hit rates from uniform.json" in flat.expert_cache_reason
    assert sharp.expert_cache is not None and "hit rates from peaked.json" in sharp.expert_cache.reason
    assert sharp.predicted_host_expert_seconds() < field.predicted_host_expert_seconds() < plain.predicted_host_expert_seconds()


def test_a_routing_profile_reaches_the_speed_models_prompt_shares():
    """The speed model takes how many of a prompt's tokens share each expert from the plan's
    routing profile (its hit-rate curves), every block's, resident or not; without one, from the
    field figures (no routing in the layout)."""
    from rotary_gguf.decode_cost import profile_hit_rates
    from rotary_gguf.plan import HitRates

    real = qwen36_figures()
    peaked = HitRates("peaked.json", {i: profile_hit_rates([1000] * 16 + [1] * (real.n_expert - 16))
                                      for i in range(real.n_layer)})
    budget = int(6.3 * 10**9)
    with_profile = make_plan(real, CUDA, budget, hit_rates=peaked)
    layout = with_profile.speed_layout(with_profile.host_layers)
    assert layout.routing == peaked.by_layer and layout.routing[0][16] > 0.9
    assert make_plan(real, CUDA, budget).speed_layout([]).routing == {}
