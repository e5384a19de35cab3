"""Placement end to end: plans loaded into llama.cpp on a real ggml-rpc device (the simulated
accelerator), compared with the all-CPU run, and with what llama.cpp reports allocating.

Bit-exact comparisons hold within one kernel path: llama.cpp's repacked CPU buffer types give
slightly different (still correct) logits for K-quants, and the RPC server's CPU never repacks.
So the quantized model is loaded with repack off in every placement; the f32 models have nothing
to repack and use the plans as they are.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import assert_one_line_error, free_port, run_cli

from rotary_gguf import native
from rotary_gguf.engine import Engine
from rotary_gguf.errors import UserError
from rotary_gguf.inventory import read_inventory
from rotary_gguf.calibration import plan_speeds
from rotary_gguf.engine import default_threads
from rotary_gguf.plan import Placement, ModelFigures, choose_mode, make_plan

MiB, GiB = 2**20, 2**30
CTX, BATCH = 256, 64
PROMPT = "The quick brown fox jumps over"
CASES = {
    "qwen3moe": (dict(arch="qwen3moe"), True),
    "qwen35moe": (dict(arch="qwen35moe"), True),
    "qwen35moe-q4_k_m-fused": (dict(arch="qwen35moe", quant="q4_k_m", fused_gate_up=True), False),
}
LOG_PRECISION = 0.005 * MiB  # llama.cpp logs buffer sizes in MiB with two decimals


def has_cuda() -> bool:
    return any(native.offloads_ops(d) for d in native.devices() if d.type != "cpu")


def plans(path, accelerator) -> dict:
    """all on the accelerator, experts all on host, half of the expert blocks resident."""
    m = ModelFigures.from_inventory(read_inventory(path))
    options = dict(ctx=CTX, n_batch=BATCH)
    minimum = make_plan(m, accelerator, 64 * GiB, **options).minimum_budget
    half = sorted(m.expert_bytes(i) for i in range(m.n_layer))[m.n_layer // 2 :]
    return {
        "rpc": make_plan(m, accelerator, 64 * GiB, **options),
        "host": make_plan(m, accelerator, minimum, **options),
        "half": make_plan(m, accelerator, minimum + sum(half), **options),
    }


def on_accelerator(report, plan) -> int:
    """Bytes llama.cpp put in the accelerator's buffers."""
    return sum(
        n
        for sizes in (report.weight_bytes, report.kv_bytes, report.recurrent_bytes, report.compute_bytes)
        for buft, n in sizes.items()
        if buft == plan.accelerator.buffer_type
    )


def close(predicted: int, actual: int, rel: float = 0.10) -> bool:
    return abs(predicted - actual) <= max(rel * actual, LOG_PRECISION)


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_placements_give_the_all_cpu_output_within_budget(test_model, rpc_endpoint, case):
    kwargs, repack = CASES[case]
    path = test_model(**kwargs)
    accelerator = native.find_accelerator(rpc_endpoint)
    runs = {"cpu": Placement(repack=repack)} | {name: plan for name, plan in plans(path, accelerator).items()}
    n_layer = read_inventory(path).n_layer
    assert [len(runs[k].resident) for k in ("rpc", "host", "half")] == [n_layer, 0, n_layer // 2]

    outputs = {}
    for name, item in runs.items():
        placement = item if name == "cpu" else dataclasses.replace(item.placement, repack=repack)
        with Engine.load(path, placement, n_ctx=CTX, n_batch=BATCH) as engine:
            tokens = engine.tokenize(PROMPT)
            engine.eval(tokens)
            outputs[name] = (engine.logits(), engine.greedy(tokens, 6))
            report = engine.load_report
        if name == "cpu":
            continue
        plan = item
        rows = {(device, purpose): (p, a) for device, purpose, p, a in plan.compare(report)}
        # the budget holds, predicted and actual
        assert plan.accelerator_use.total <= plan.budget
        assert on_accelerator(report, plan) <= plan.budget, (name, report)
        # weights, KV cache and recurrent state as predicted; compute estimated on the safe side
        for purpose in ("weights", "kv_cache", "recurrent_state"):
            assert close(*rows["accelerator", purpose]), (name, purpose, rows["accelerator", purpose])
        predicted, actual = rows["accelerator", "compute"]
        assert actual <= predicted <= 2 * actual + MiB, (name, predicted, actual)
        assert report.weight_bytes[plan.accelerator.buffer_type] > 0

    ref_logits, ref_tokens = outputs["cpu"]
    for name, (logits, tokens) in outputs.items():
        assert tokens == ref_tokens, name
        assert np.array_equal(logits, ref_logits), (name, float(np.abs(logits - ref_logits).max()))


def test_host_weights_as_predicted_without_mmap(test_model, rpc_endpoint):
    """A mapped host buffer spans a range of the file; allocated host memory is what the plan predicts."""
    path = test_model(arch="qwen35moe", quant="q4_k_m", fused_gate_up=True)
    plan = plans(path, native.find_accelerator(rpc_endpoint))["half"]
    with Engine.load(path, dataclasses.replace(plan.placement, use_mmap=False), n_ctx=CTX, n_batch=BATCH) as engine:
        rows = {(d, p): (pr, a) for d, p, pr, a in plan.compare(engine.load_report)}
    assert close(*rows["host", "weights"]) and close(*rows["accelerator", "weights"]), rows
    predicted, actual = rows["host", "compute"]
    assert actual <= predicted <= 2 * actual + MiB, rows


# --- the CLI ----------------------------------------------------------------------------------------
def test_plan_json_is_the_planners_and_stable(test_model, rpc_endpoint):
    path = test_model(arch="qwen35moe")
    accelerator = native.find_accelerator(rpc_endpoint)
    half = plans(path, accelerator)["half"]
    args = ("plan", path, "--rpc", rpc_endpoint, "--vram", f"{half.budget}B", "--ctx", CTX, "--batch", BATCH,
            "--expert-cache", "off", "--json")
    first, second = run_cli(*args), run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    s = json.loads(first.stdout)
    _, reason = choose_mode("auto", accelerator)
    assert s["reserve"]["bytes"] == 0 and "an RPC device drives no display" in s["reserve"]["reason"]
    # the speeds the CLI predicted from: this machine's calibration, kept by its first run
    speeds, _ = plan_speeds(read_inventory(path), accelerator.name, default_threads())
    expected = make_plan(half.model, accelerator, half.budget, mode="cpu", mode_reason=reason, ctx=CTX, n_batch=BATCH,
                         reserve_reason=s["reserve"]["reason"], speeds=speeds)
    assert s == json.loads(json.dumps(expected.to_json()))
    assert s["host_expert_mode"] == "cpu" and "no CUDA device" in s["mode_reason"]
    assert [layer["experts"] for layer in s["layers"]] == ["host", "host", "accelerator", "accelerator"]
    assert s["overrides"] == [[r"^blk\.(0|1)\.ffn_(gate_up|gate|up|down)_exps\.", "CPU"]]
    assert s["predicted"]["accelerator_bytes"] <= s["vram_budget"] == half.budget


def test_plan_check_loads_and_reports_both(test_model, rpc_endpoint):
    path = test_model(arch="qwen3moe")
    result = run_cli("plan", path, "--rpc", rpc_endpoint, "--vram", "64MiB", "--ctx", CTX, "--check", "--json")
    assert result.returncode == 0, result.stderr
    rows = {(r["device"], r["purpose"]): r for r in json.loads(result.stdout)["check"]}
    weights = rows["accelerator", "weights"]
    assert weights["actual"] > 0 and close(weights["predicted"], weights["actual"])

    table = run_cli("plan", path, "--rpc", rpc_endpoint, "--vram", "64MiB", "--ctx", CTX, "--check")
    assert table.returncode == 0, table.stderr
    for text in ("expert tensors per block", "margin", "predicted vs allocated", "no CUDA device", "RPC0"):
        assert text in table.stdout, text


def test_plan_for_a_gpu_this_machine_lacks(test_model):
    if has_cuda():
        pytest.skip("this machine has a GPU")
    result = run_cli("plan", test_model(arch="qwen35moe"), "--vram", "8GiB", "--mode", "rotary", "--json")
    assert result.returncode == 0, result.stderr
    s = json.loads(result.stdout)
    assert s["accelerator"]["kind"] == "planned" and s["host_expert_mode"] == "rotary"
    assert any("no GPU on this machine" in note for note in s["notes"])
    assert_one_line_error(run_cli("plan", test_model(arch="qwen35moe")), "no GPU here", "--vram")


def test_plan_errors_are_one_line(test_model, rpc_endpoint):
    path = test_model(arch="qwen3moe")
    assert_one_line_error(run_cli("plan", path, "--rpc", rpc_endpoint, "--vram", "1MiB"), "too small", "--vram")
    assert_one_line_error(run_cli("plan", path, "--vram", "1MiB"), "too small", "display and driver reserve", "--reserve")
    assert_one_line_error(run_cli("plan", path, "--vram", "900MiB"), "too small", "at least", "after a 768.0 MiB display")
    dead = f"127.0.0.1:{free_port()}"
    assert_one_line_error(run_cli("plan", path, "--rpc", dead, "--vram", "1GiB"), "cannot reach an RPC device", dead)
    assert_one_line_error(run_cli("plan", path, "--rpc", rpc_endpoint, "--vram", "1GiB", "--mode", "rotary"), "rotary mode needs a CUDA GPU")
    assert_one_line_error(run_cli("plan", path, "--vram", "1GiB", "--mode", "fast"), "unknown --mode")
    assert_one_line_error(run_cli("plan", path, "--vram", "lots"), "bad size")


def test_unknown_device_is_one_line(test_model):
    with pytest.raises(UserError) as err:
        Engine.load(test_model(arch="qwen3moe"), Placement(devices=("CUDA7",), n_gpu_layers=-1))
    assert "unknown device 'CUDA7'" in str(err.value) and "\n" not in str(err.value)


# --- measurements the mode choice uses ----------------------------------------------------------------
def test_measurements_run_on_this_machine(rpc_endpoint):
    rpc = native.add_rpc_device(rpc_endpoint)
    assert not native.offloads_ops(rpc) and not native.offloads_ops(native.cpu_device())
    assert native.upload_bytes_per_s(rpc, nbytes=8 * MiB, repeats=1) > 1e6
    q8_0 = 8
    assert native.cpu_matvec_bytes_per_s(q8_0, 256, n_threads=1, nbytes=4 * MiB, repeats=2) > 1e6


# --- GPU only ---------------------------------------------------------------------------------------
ROTARY_SCRIPT = """
import json, sys
from pathlib import Path
from rotary_gguf.cli import plan_for
from rotary_gguf.engine import Engine
from rotary_gguf.plan import ContextSettings
options = dict(context=ContextSettings(ctx=256, n_batch=64, n_ubatch=64), mode="rotary", rpc=None, reserve="0")
minimum = plan_for(Path(sys.argv[1]), vram="64GiB", **options).minimum_budget
plan = plan_for(Path(sys.argv[1]), vram=f"{minimum}B", **options)  # every expert on the host
with Engine.load(sys.argv[1], plan.placement, n_ctx=256, n_batch=64) as engine:
    tokens = engine.greedy(engine.tokenize("The quick brown fox"), 6)
    print(json.dumps({"weights": engine.load_report.weight_bytes, "tokens": tokens, "host": plan.host_buffer_type}))
"""


def test_rotary_mode_streams_from_pinned_memory(test_model):
    if not has_cuda():
        pytest.skip("rotary streaming needs a CUDA GPU (offload_op); none here")
    path = test_model(arch="qwen35moe", quant="q4_k_m", fused_gate_up=True)
    # a fresh process: the offload threshold is read once, when the CUDA backend loads
    result = subprocess.run([sys.executable, "-c", ROTARY_SCRIPT, str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    s = json.loads(result.stdout.splitlines()[-1])
    assert s["host"] == "CUDA_Host" and s["weights"].get("CUDA_Host", 0) > 0
    # the same kernels as with every expert resident on the GPU
    resident = make_plan(ModelFigures.from_inventory(read_inventory(path)), native.find_accelerator(), 64 * GiB, ctx=256, n_batch=64)
    assert not resident.host_layers
    with Engine.load(path, resident.placement, n_ctx=256, n_batch=64) as engine:
        assert engine.greedy(engine.tokenize("The quick brown fox"), 6) == s["tokens"]


def test_upload_speed_on_a_gpu():
    if not has_cuda():
        pytest.skip("no CUDA device")
    gpu = next(d for d in native.devices() if d.type != "cpu" and native.offloads_ops(d))
    assert native.upload_bytes_per_s(gpu, nbytes=64 * MiB, repeats=2) > 1e9
