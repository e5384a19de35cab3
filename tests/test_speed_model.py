"""Calibration (measured with ggml, kept per machine) and the speed model built on it."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from rotary_gguf import calibration, native
from rotary_gguf.decode_cost import profile_hit_rates
from rotary_gguf.errors import UserError
from rotary_gguf.inventory import read_inventory
from rotary_gguf.speed_model import (STATE_COPIES, DeviceSpeeds, Layout, Weights, estimated_nodes, kv_cells_read,
                                     ffn_key, ffn_parts, predict, token_seconds)

Q4_K, Q6_K, Q8_0, F32 = 12, 14, 8, 0


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path


def _speeds(name: str, rate: float, graph: float = 1e-4) -> DeviceSpeeds:
    return DeviceSpeeds(name, name, {"Q4_K": rate, "F32": rate}, {"Q4_K": 4 * rate, "F32": 4 * rate}, 128, graph)


def _weights(n_layer: int = 4) -> Weights:
    tensors = [("output.weight", "Q4_K", 1_000_000), ("token_embd.weight", "Q4_K", 1_000_000)]
    for i in range(n_layer):
        tensors += [(f"blk.{i}.attn_q.weight", "F32", 100_000), (f"blk.{i}.ffn_gate_exps.weight", "Q4_K", 32 * 40_000),
                    (f"blk.{i}.ffn_up_exps.weight", "Q4_K", 32 * 30_000), (f"blk.{i}.ffn_down_exps.weight", "Q4_K", 32 * 30_000)]
    return Weights.from_tensors(tensors, 32, 4, ["full"] * n_layer, 1000, (256, 256))


FFN = "Q4_K 256x256"  # `_weights`'s experts: one type, n_embd 256, n_ff 256 (a Q4_K row holds 256 values)


def test_the_weights_a_token_reads():
    w = _weights()
    assert w.other == {"Q4_K": 1_000_000, "F32": 400_000}  # the embedding table is looked up, not read
    assert w.expert[0] == {"Q4_K": 100_000}  # one expert's gate, up and down
    assert w.expert_ffn == {i: FFN for i in range(4)}
    # Q4_K_M's mixed blocks: a prompt's FFN is measured for its types together (gate/up/down) and widths; a fused gate_up
    mixed = Weights.from_tensors([("blk.0.ffn_gate_exps.weight", "Q4_K", 3200), ("blk.0.ffn_up_exps.weight", "Q4_K", 3200),
                                  ("blk.0.ffn_down_exps.weight", "Q6_K", 4800), ("blk.1.ffn_gate_up_exps.weight", "Q8_0", 6400),
                                  ("blk.1.ffn_down_exps.weight", "Q8_0", 3200)], 32, 4, ["full"] * 2, 10, (1024, 512))
    assert mixed.expert_ffn == {0: "Q4_K/Q4_K/Q6_K 1024x512", 1: "Q8_0 1024x512"}
    assert ffn_parts("Q4_K/Q4_K/Q6_K 1024x512") == (("Q4_K", "Q4_K", "Q6_K"), 1024, 512)
    assert ffn_parts(ffn_key("Q8_0", "Q8_0", "Q8_0", 2048, 768)) == (("Q8_0",) * 3, 2048, 768)
    assert mixed.expert[0] == {"Q4_K": 200, "Q6_K": 150}
    assert w.graph_nodes == estimated_nodes(["full"] * 4)
    assert Weights.from_tensors([("blk.4.ffn_up_exps.weight", "Q4_K", 3200)], 32, 4, ["full"] * 4, 10).expert == {}


def test_a_slower_cpu_makes_host_blocks_cost_more_and_splits_add_up():
    w, cpu, acc = _weights(), _speeds("CPU", 1e9), _speeds("GPU", 1e10)
    resident = predict(w, Layout(), cpu, acc)
    half = predict(w, Layout(host=(0, 1)), cpu, acc)
    every = predict(w, Layout(host=(0, 1, 2, 3)), cpu, acc)
    assert resident.decode_tps > half.decode_tps > every.decode_tps
    # each host block: its 4 experts' bytes at the CPU's speed instead of the GPU's, and two splits
    per_block = 4 * 100_000 * (1 / 1e9 - 1 / 1e10) + 2 * 1e-4
    assert 1 / half.decode_tps - 1 / resident.decode_tps == pytest.approx(2 * per_block, rel=1e-6)
    # a split-compute cache that always hits costs no CPU time, only its syncs: the block's two
    # splits and the three graph syncs split compute adds
    cached = predict(w, Layout(host=(0, 1), slots=8, hit_rates={0: 1.0, 1: 1.0}), cpu, acc)
    assert 1 / cached.decode_tps == pytest.approx(1 / resident.decode_tps + 2 * (2 + 3) * 1e-4, rel=1e-6)
    # without an accelerator everything runs at the CPU's speed
    assert predict(w, Layout(accelerator=False), cpu, acc).decode_tps < every.decode_tps
    assert resident.prompt_tps > resident.decode_tps  # batches read each weight once for many tokens


def test_measured_host_blocks_cost_what_was_measured():
    w, cpu = _weights(), _speeds("CPU", 1e9)
    acc = replace(_speeds("RPC0", 1e10), host_block_seconds=5e-4)
    resident = predict(w, Layout(), cpu, acc)
    two = predict(w, Layout(host=(0, 1)), cpu, acc)
    per_block = 4 * 100_000 * (1 / 1e9 - 1 / 1e10) + 5e-4
    assert 1 / two.decode_tps - 1 / resident.decode_tps == pytest.approx(2 * per_block, rel=1e-6)
    assert two.decode_parts["splits"] == pytest.approx(2 * 5e-4, rel=1e-6)


def test_a_caches_missed_experts_upload_at_the_speed_measured_for_their_copies():
    """An uploading cache copies each missed expert's projections one at a time: they cross the link
    at the speed measured for copies of that size (interpolated on a log scale), not at the speed
    of one bulk copy, which some links (ggml-rpc: 0.5 GB/s for 64 MiB, 1-3 GB/s for 1 MiB) differ from."""
    w, cpu = _weights(), _speeds("CPU", 1e9)
    acc = replace(_speeds("GPU", 1e10), upload_pageable=1e8, expert_uploads={2**15: 1e9, 2**17: 4e9})
    assert acc.expert_upload_rate(2**16) == pytest.approx(1 / ((1 / 1e9 + 1 / 4e9) / 2))
    assert acc.expert_upload_rate(2**10) == pytest.approx(1e9) and acc.expert_upload_rate(2**20) == pytest.approx(4e9)  # the nearest
    assert replace(acc, expert_uploads={}).expert_upload_rate(2**16) == 1e8  # not measured: the bulk speed
    layout = Layout(host=(0,), slots=8, hit_rates={0: 0.75}, misses="upload")
    host = predict(w, layout, cpu, acc).decode_parts["host experts"]
    on_gpu = predict(w, Layout(), cpu, acc).decode_parts["resident experts"] / 4  # one block's experts on the GPU
    missed = 0.25 * 4 * 100_000  # a quarter of a token's 4 experts of 100 kB, in copies of a third of one
    assert host == pytest.approx(missed / acc.expert_upload_rate(100_000 / 3) + on_gpu, rel=1e-6)
    bulk = predict(w, layout, cpu, replace(acc, expert_uploads={})).decode_parts["host experts"]
    assert bulk == pytest.approx(missed / 1e8 + on_gpu, rel=1e-6)


def test_split_compute_uploads_its_misses_into_slots_between_calls_up_to_its_budget():
    """A split-compute cache computes a token's misses on the CPU, then admits them into slots
    before the next call: their upload is part of the token's time, up to the cache's budget a call."""
    w, cpu = _weights(), _speeds("CPU", 1e9)
    acc = replace(_speeds("GPU", 1e10), expert_uploads={2**15: 1e9})
    layout = Layout(host=(0, 1), slots=8, hit_rates={0: 0.75, 1: 0.5}, misses="split")
    missed = (0.25 + 0.5) * 4 * 100_000  # a token's missed experts in both blocks
    unbounded = predict(w, layout, cpu, acc).decode_parts["host experts"]
    without = predict(w, layout, cpu, replace(acc, expert_uploads={}, upload_pageable=1e30)).decode_parts["host experts"]
    assert unbounded - without == pytest.approx(missed / 1e9, rel=1e-6)
    bounded = predict(w, replace(layout, admit_bytes=int(missed / 3)), cpu, acc).decode_parts["host experts"]
    assert bounded - without == pytest.approx(missed / 3 / 1e9, rel=1e-3)
    assert predict(w, replace(layout, hit_rates={0: 1.0, 1: 1.0}), cpu, acc).decode_parts["host experts"] < without


def test_an_unmeasured_type_takes_the_slowest_rate():
    s = DeviceSpeeds("CPU", "", {"Q4_K": 2e9, "F32": 8e9}, {}, 128, 0.0, prompt_experts={FFN: {1: 1e9, 64: 3e9}},
                     expert_uploads={2**20: 2e9})
    assert s.rate("decode", "Q6_K") == 2e9
    assert DeviceSpeeds.from_json(json.loads(json.dumps(s.to_json()))) == s


def test_calibration_measures_in_seconds_and_is_kept(cache_home):
    steps: list[str] = []
    first = calibration.calibrate({"Q4_K": Q4_K, "F32": F32}, 256, 1, expert_ffns={FFN}, on_step=steps.append)
    assert first.path is not None and first.path.is_relative_to(cache_home)
    assert first.seconds < 30
    demo_types, demo_ffns = calibration.demo_weight_types()  # the demo model's decode is explained too
    for rates in (first.cpu.decode, first.cpu.prompt):
        assert set(rates) == {"Q4_K", "F32"} | set(demo_types) and all(v > 1e6 for v in rates.values())
    # the expert op only for experts' types at decode, their FFN at each share of tokens per expert in a prompt
    assert set(first.cpu.prompt_experts) == {FFN} | demo_ffns
    assert set(first.cpu.experts) == {t for key in first.cpu.prompt_experts for t in ffn_parts(key)[0]}
    assert first.cpu.experts["Q4_K"] > 1e6
    # a real decode graph's ops cost more than a chain of additions: the demo model decoded on the CPU
    assert first.cpu.op_seconds > 0 and any("demo model" in s for s in steps)
    # decode's figures in passes spread over the calibration, the rest once
    assert sum("Q4_K experts (" in s for s in steps) == calibration.DECODE_PASSES
    assert sum(f"{FFN} expert FFN at batch" in s for s in steps) == 1
    for by_share in first.cpu.prompt_experts.values():
        assert tuple(by_share) == calibration.PROMPT_EXPERT_SHARES and all(v > 1e6 for v in by_share.values())
    assert first.cpu.graph_seconds > 0 and first.accelerator is None
    assert first.cpu.recurrent > 1e6 and first.cpu.prompt_recurrent > 1e6  # the state update at decode, in a prompt
    assert set(first.cpu_decode_by_threads["Q4_K"]) == {1}
    # the second call reads the file; a new type measures only that type
    steps.clear()
    assert calibration.calibrate({"Q4_K": Q4_K}, 256, 1, expert_ffns={FFN}, on_step=steps.append) == first
    assert steps == []
    more = calibration.calibrate({"Q4_K": Q4_K, "Q6_K": Q6_K}, 256, 1, expert_ffns={FFN, "Q6_K 256x256"},
                                 on_step=steps.append)
    assert steps and all("Q6_K" in s for s in steps)
    assert more.cpu.decode["Q4_K"] == first.cpu.decode["Q4_K"] and "Q6_K" in more.cpu.decode
    # that completed the one measurement; a refresh is a new one, kept beside the last ones, and each
    # figure planned with is the median of those that measured it
    assert len(more.measurements) == 1
    doc = json.loads(more.path.read_text())
    slow = json.loads(json.dumps(doc["measurements"][0]))
    slow["cpu"]["decode"]["Q4_K"] = 1.0
    doc["measurements"] = [slow, slow, doc["measurements"][0]]  # oldest first
    more.path.write_text(json.dumps(doc))
    again = calibration.calibrate({"Q4_K": Q4_K}, 256, 1, expert_ffns={FFN}, refresh=True)
    assert len(again.measurements) == calibration.CALIBRATIONS_KEPT == 3  # the oldest one dropped
    newest = again.measurements[-1][0]
    assert again.measurements[0][0].decode["Q4_K"] == 1.0 and "Q6_K" not in newest.decode
    assert again.cpu.decode["Q4_K"] == min(more.cpu.decode["Q4_K"], newest.decode["Q4_K"])  # median of 1.0 and those
    assert again.cpu.decode["Q6_K"] == more.cpu.decode["Q6_K"]  # measured by the older two alike
    assert calibration.load(again.path) == again
    # a damaged file is measured again, not trusted
    first.path.write_text("{not json")
    assert calibration.load(first.path) is None
    assert calibration.calibrate({"Q4_K": Q4_K}, 256, 1).cpu.decode["Q4_K"] > 0


def test_weights_a_device_cannot_hold_are_one_line_not_a_crash():
    """A timed graph whose weights do not fit (an accelerator already nearly full) stops with a
    UserError before ggml computes over tensors without memory."""
    from rotary_gguf.native import measure

    with pytest.raises(UserError, match="could not allocate test tensors on CPU"):  # 2**46 bytes a projection: past any machine
        measure.prompt_ffn_bytes_per_s(native.cpu_device(), (Q4_K,) * 3, 2048, 512, 8, 1, nbytes=2**46)


def test_an_unwritable_cache_folder_is_one_line(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    with pytest.raises(UserError, match="cannot write the calibration"):
        calibration.calibrate({"F32": F32}, 64, 1)


def test_an_rpc_accelerator_is_calibrated_too(cache_home, rpc_endpoint, test_model):
    dev = native.add_rpc_device(rpc_endpoint)
    inv = read_inventory(test_model(quant="q4_k_m"))
    types = {t.type_name: t.ggml_type for t in inv.tensors}
    cal = calibration.calibrate(types, inv.n_embd, 1, dev.name)
    acc = cal.accelerator
    assert acc is not None and acc.name == dev.name
    assert set(acc.decode) == set(types) | set(calibration.demo_weight_types()[0]) and acc.upload_pageable > 0 and acc.upload_pinned is None  # RPC has no pinned memory
    assert set(acc.expert_uploads) == set(calibration.EXPERT_UPLOAD_SIZES) and min(acc.expert_uploads.values()) > 0
    assert calibration.calibrate(types, inv.n_embd, 1, dev.name).accelerator.expert_uploads == acc.expert_uploads  # kept
    assert acc.graph_seconds > cal.cpu.graph_seconds  # a round trip over a socket
    # a host block's splits: round trips and graphs both ways, more than one graph's round trip
    assert acc.host_block_seconds > acc.graph_seconds and cal.cpu.host_block_seconds is None
    # each op of a real decode graph costs something over a socket (found by decoding the demo model)
    assert acc.op_seconds > 0
    w = Weights.from_tensors([(t.name, t.type_name, t.nbytes) for t in inv.tensors], inv.n_expert, inv.n_expert_used,
                             inv.attention_layout(), inv.by_name["token_embd.weight"].shape[1])
    host = predict(w, Layout(host=tuple(w.expert)), cal.cpu, acc)
    assert 0 < host.decode_tps < predict(w, Layout(), cal.cpu, acc).decode_tps


def test_gated_deltanet_blocks_pay_for_their_recurrent_state(test_model):
    """A qwen35moe token updates every linear-attention block's state, and llama.cpp gathers and
    stores it whole besides: the speed model counts those bytes; a qwen3moe model has none."""
    inv = read_inventory(test_model(arch="qwen35moe", layers=4))
    w = Weights.from_inventory(inv)
    per_block = 4 * inv.hparam("ssm.state_size") * inv.hparam("ssm.inner_size")
    assert w.recurrent_state == inv.attention_layout().count("linear") * per_block > 0
    cpu = replace(_speeds("CPU", 1e9), recurrent=5e8)
    parts = predict(w, Layout(accelerator=False), cpu, None).decode_parts
    assert parts["recurrent"] == pytest.approx(w.recurrent_state * (1 / 5e8 + STATE_COPIES / 1e9))
    plain = predict(replace(w, recurrent_state=0), Layout(accelerator=False), cpu, None)
    assert plain.decode_tps > 1 / sum(parts.values())
    assert Weights.from_inventory(read_inventory(test_model())).recurrent_state == 0


UNIFORM = profile_hit_rates([1] * 32)  # 32 experts, each a token's choice as often
NARROW = profile_hit_rates([1] * 4 + [0] * 28)  # every token selects the same four


def test_a_prompts_experts_run_at_the_speed_measured_for_their_share():
    """In a prompt, the expert op's speed depends on how many tokens of the batch share each
    expert: each token-expert pair costs what the op was measured at for that share (interpolated
    on a log scale, the nearest beyond the shares measured); the shares come from the routing, each
    token drawing its experts independently. One token costs what decode does."""
    w = _weights()  # 32 experts, 4 used, 100 kB each
    cpu = replace(_speeds("CPU", 1e9), prompt_experts={FFN: {1: 1e9, 64: 4e9}})
    decode = w.used_seconds(0, cpu, "decode")
    assert decode == pytest.approx(4 * 100_000 / 1e9)
    assert w.used_seconds(0, cpu, "prompt", batch=1, routing=UNIFORM) == pytest.approx(decode)
    # every token on the same four experts: 64 tokens share each, 128 beyond the shares measured
    assert w.used_seconds(0, cpu, "prompt", batch=64, routing=NARROW) == pytest.approx(4 * 100_000 / 4e9)
    assert w.used_seconds(0, cpu, "prompt", batch=128, routing=NARROW) == pytest.approx(4 * 100_000 / 4e9)
    # two tokens, uniform routing: of their 8 pairs, 32 x 2p(1-p) = 7 have an expert to themselves and
    # 32 x 2p^2 = 1 shares one with the other token (p = 4/32), at 1/6 of the way from 1 to 64 on a log scale
    shared = 5 / 6 * 1e-9 + 1 / 6 * 0.25e-9
    assert w.used_seconds(0, cpu, "prompt", batch=2, routing=UNIFORM) == pytest.approx(
        100_000 * (7 * 1e-9 + 1 * shared) / 2)
    # skewed routing shares experts among more tokens than uniform routing does: faster
    skewed = w.used_seconds(0, cpu, "prompt", batch=64, routing=profile_hit_rates([0.15] * 4 + [0.4 / 28] * 28))
    uniform = w.used_seconds(0, cpu, "prompt", batch=64, routing=UNIFORM)
    assert w.used_seconds(0, cpu, "prompt", batch=64, routing=NARROW) < skewed < uniform < decode
    # a block of mixed types runs at its FFN's speed, all its bytes together
    mixed = replace(w, expert={0: {"Q4_K": 60_000, "Q6_K": 40_000}}, expert_ffn={0: "Q4_K/Q4_K/Q6_K 256x256"})
    # (not measured: not the Q4_K FFN's speed, but every pair at the batched rate and the 4 experts read once)
    assert mixed.used_seconds(0, cpu, "prompt", batch=64, routing=NARROW) == pytest.approx(
        4 * 100_000 / 4e9 + 4 * 100_000 * (1 / 1e9 - 1 / 4e9) / 64)
    measured = replace(cpu, prompt_experts={"Q4_K/Q4_K/Q6_K 256x256": {1: 1e9, 64: 4e9}})
    assert mixed.used_seconds(0, measured, "prompt", batch=64, routing=NARROW) == pytest.approx(4 * 100_000 / 4e9)
    # the blocks' routing reaches the prediction through the layout; without it, the field figures'
    layouts = [Layout(accelerator=False, routing={i: curve for i in range(4)}) for curve in (NARROW, UNIFORM)]
    narrow, spread = (token_seconds(w, layout, cpu, None, "prompt", 64)["resident experts"] for layout in layouts)
    field = token_seconds(w, Layout(accelerator=False), cpu, None, "prompt", 64)["resident experts"]
    assert narrow == pytest.approx(4 * w.used_seconds(0, cpu, "prompt", batch=64, routing=NARROW))
    assert narrow < field < spread


def test_an_unmeasured_prompt_expert_op_computes_at_the_batched_rate_and_reads_each_expert_once():
    """Without the op measured in a prompt: every token's experts at the batched dense rate, and
    each expert the batch selects read from memory once for the tokens that chose it."""
    w = _weights()
    cpu = _speeds("CPU", 1e9)  # batched: 4e9
    many = w.used_seconds(0, cpu, "prompt", batch=512, routing=UNIFORM)  # every expert read once for 512 tokens
    assert many == pytest.approx(4 * 100_000 / 4e9 + 32 * (100_000 / 1e9 - 100_000 / 4e9) / 512, rel=1e-6)
    few = w.used_seconds(0, cpu, "prompt", batch=2, routing=UNIFORM)  # up to 8 distinct experts for 2 tokens
    distinct = 32 * (1 - (1 - 4 / 32) ** 2)
    assert few == pytest.approx(4 * 100_000 / 4e9 + distinct * (100_000 / 1e9 - 100_000 / 4e9) / 2)
    assert many < few < w.used_seconds(0, cpu, "decode")


def test_a_prompt_carries_the_recurrent_state_through_its_batch(test_model):
    """A prompt's Gated DeltaNet update runs at its own measured rate per token, and the state is
    gathered and stored whole once per batch, not once per token."""
    w = Weights.from_inventory(read_inventory(test_model(arch="qwen35moe", layers=4)))
    cpu = replace(_speeds("CPU", 1e9), recurrent=5e8, prompt_recurrent=2e9)
    prompt = token_seconds(w, Layout(accelerator=False), cpu, None, "prompt", 64)
    assert prompt["recurrent"] == pytest.approx(w.recurrent_state * (1 / 2e9 + STATE_COPIES / (64 * 1e9)))
    unmeasured = token_seconds(w, Layout(accelerator=False), replace(cpu, prompt_recurrent=None), None, "prompt", 64)
    assert unmeasured["recurrent"] == pytest.approx(w.recurrent_state * (1 / 5e8 + STATE_COPIES / (64 * 1e9)))

def test_attention_reads_the_kv_cache_of_its_full_attention_blocks(test_model):
    """A decoded token's attention reads K and V of every cell in use (flash attention skips the
    masked ones; without it, llama.cpp's whole window: at least 256 cells, in steps of 256) of
    every full-attention block, at the rate of the cache's type on the device that holds it: more
    with a longer context, less with a quantized cache; a Gated DeltaNet block has no KV cache."""
    inv = read_inventory(test_model(arch="qwen35moe", layers=4))
    n_full = inv.attention_layout().count("full")
    assert 0 < n_full < inv.n_layer
    n_head = inv.hparam("attention.head_count")
    head_k = inv.hparam("attention.key_length") or inv.n_embd // n_head
    row = inv.hparam("attention.head_count_kv", n_head) * (head_k + inv.hparam("attention.value_length", head_k))
    assert [kv_cells_read(n, flash_attn=False) for n in (1, 256, 257, 3000)] == [256, 256, 512, 3072]
    assert [kv_cells_read(n) for n in (1, 256, 257, 3000)] == [1, 256, 257, 3000]
    short = Weights.from_inventory(inv)
    assert short.kv_cache == {"F16": n_full * 256 * row * 2}
    long = Weights.from_inventory(inv, kv_cells=kv_cells_read(3000, flash_attn=False))
    assert long.kv_cache == {"F16": short.kv_cache["F16"] * 12}
    assert Weights.from_inventory(inv, "q8_0").kv_cache == {"Q8_0": n_full * 256 * row // 32 * 34}
    cpu = replace(_speeds("CPU", 1e9), decode={"Q4_K": 1e9, "F32": 1e9, "F16": 2e9})
    gpu = replace(_speeds("GPU", 1e10), decode={"Q4_K": 1e10, "F32": 1e10, "F16": 4e10})
    for layout, device_rate in ((Layout(accelerator=False), 2e9), (Layout(), 4e10)):
        a, b = (token_seconds(w, layout, cpu, gpu, "decode") for w in (short, long))
        assert a["kv cache"] == pytest.approx(short.kv_cache["F16"] / device_rate)
        assert b["kv cache"] - a["kv cache"] == pytest.approx(11 * short.kv_cache["F16"] / device_rate)
        assert {k: v for k, v in a.items() if k != "kv cache"} == {k: v for k, v in b.items() if k != "kv cache"}
