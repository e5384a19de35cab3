"""The planner weighs candidates by predicted speed (the speed model over a calibration) and shows
the predictions: pure checks with set speeds, then `plan --calibrate` on a real ggml-rpc device."""

from __future__ import annotations

import json
from dataclasses import replace

from predict_split import qwen36_figures

from conftest import run_cli
from rotary_gguf.inventory import read_inventory
from rotary_gguf.plan import Accelerator, make_plan
from rotary_gguf.speed_model import ANY_TYPE, REFERENCE_GPU, DeviceSpeeds, PlanSpeeds, Weights

GiB = 2**30
CUDA = Accelerator.planned_cuda()


def _qwen36_speeds(cpu_bytes_per_s: float) -> PlanSpeeds:
    m = qwen36_figures()
    weights = Weights.from_tensors([(t, "Q4_K", n) for t, n in m.tensors], m.n_expert, m.n_expert_used,
                                   list(m.attention), m.n_vocab)
    cpu = DeviceSpeeds("CPU", "laptop", {ANY_TYPE: cpu_bytes_per_s}, {ANY_TYPE: 20 * cpu_bytes_per_s}, 128, 10e-6, 1e-6)
    return PlanSpeeds(weights, cpu, REFERENCE_GPU, "set by the test")


def test_the_plan_is_the_fastest_candidate_it_weighed():
    m = qwen36_figures()
    for cpu in (20e9, 60e9):
        speeds = _qwen36_speeds(cpu)
        for budget in (6 * GiB, 8 * GiB, 12 * GiB):
            plan = make_plan(m, CUDA, budget, ctx=8192, expert_cache="auto", speeds=speeds)
            predicted = dict(plan.predictions)
            assert list(predicted)[0] == "this plan" and "CPU only" in predicted
            assert ("--cpu-moe" in predicted) == bool(plan.resident)  # no resident block: the plan is --cpu-moe
            best = predicted["this plan"].decode_tps
            assert all(best >= p.decode_tps - 1e-9 for p in predicted.values()), (cpu, budget, predicted)
            if plan.expert_cache is not None:
                assert "speed model" in plan.expert_cache.reason and "resident blocks only" in predicted
            doc = plan.to_json()["predictions"]
            assert doc["speeds"] == "set by the test" and doc["candidates"][0]["name"] == "this plan"


def test_an_accelerator_slower_than_the_cpu_at_experts_keeps_them_on_the_host():
    """A simulated accelerator (ggml-rpc on a CPU without repacked kernels) can run experts slower
    than the CPU: the plan then keeps fewer resident blocks than fit, and says why."""
    m = qwen36_figures()
    speeds = _qwen36_speeds(40e9)
    slow = DeviceSpeeds("RPC0", "simulated", {ANY_TYPE: 200e9}, {ANY_TYPE: 4e12}, 128, 20e-6, 1e-6,
                        experts={"Q4_K": 5e9}, host_block_seconds=20e-6)
    on_slow = make_plan(m, CUDA, 12 * GiB, ctx=8192, speeds=replace(speeds, accelerator=slow))
    on_gpu = make_plan(m, CUDA, 12 * GiB, ctx=8192, speeds=speeds)
    assert on_gpu.resident and not on_slow.resident
    assert any(f"0 of the {len(on_gpu.resident)} expert blocks that fit kept resident" in n for n in on_slow.notes)


def test_a_faster_cpu_predicts_faster_host_experts():
    m = qwen36_figures()
    slow, fast = (make_plan(m, CUDA, 8 * GiB, ctx=8192, speeds=_qwen36_speeds(bps)) for bps in (20e9, 60e9))
    assert slow.resident == fast.resident  # memory decides residency; speed only the figures
    assert dict(fast.predictions)["this plan"].decode_tps > dict(slow.predictions)["this plan"].decode_tps
    assert not make_plan(m, CUDA, 8 * GiB, ctx=8192).predictions  # no speeds: no predictions


def test_plan_calibrates_on_first_use_and_shows_the_predictions(test_model, rpc_endpoint, tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    path = test_model(quant="q4_k_m")
    result = run_cli("plan", path, "--rpc", rpc_endpoint, "--ctx", "256", "--threads", "1", "--json", env=env)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    names_seen = [c["name"] for c in doc["predictions"]["candidates"]]
    assert names_seen[0] == "this plan" and "CPU only" in names_seen
    assert "RPC0" in doc["predictions"]["speeds"] and "calibration" not in doc
    assert all(c["decode_tps"] > 0 and c["prompt_tps"] > 0 for c in doc["predictions"]["candidates"])
    assert list((tmp_path / "rotary-gguf" / "calibration").glob("*.json")), "the calibration is kept"
    again = run_cli("plan", path, "--rpc", rpc_endpoint, "--ctx", "256", "--threads", "1", "--calibrate", "--json", env=env)
    cal = json.loads(again.stdout)["calibration"]
    assert cal["accelerator"]["name"] == "RPC0" and cal["threads"] == 1
    assert "Q4_K" in cal["cpu"]["decode"] and "Q4_K" in cal["accelerator"]["decode"]  # the model's expert type
    # a prompt's expert FFN for each combination of types the model's blocks have (Q4_K_M: some downs in Q6_K)
    ffns = set(Weights.from_inventory(read_inventory(path)).expert_ffn.values())
    assert any(k.startswith("Q4_K/Q4_K/Q6_K ") for k in ffns) and all(ffns <= set(cal[dev]["prompt_experts"]) for dev in ("cpu", "accelerator"))
    table = run_cli("plan", path, "--rpc", rpc_endpoint, "--ctx", "256", "--threads", "1", "--calibrate", env={**env, "COLUMNS": "160"})
    assert table.returncode == 0, table.stderr
    for text in ("calibration (", "x1", "x64", "Q4_K/Q4_K/Q6_K", "fixed costs", "host block us", "predicted speed (calibrated: CPU at 1 thread, RPC0)",
                 "this plan", "--cpu-moe"):
        assert text in table.stdout, text


def test_a_gpu_not_here_is_predicted_from_published_figures(test_model, tmp_path):
    result = run_cli("plan", test_model(quant="q4_k_m"), "--vram", "2GiB", "--ctx", "256", "--threads", "1", "--json",
                     env={"XDG_CACHE_HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["accelerator"]["kind"] == "planned" and REFERENCE_GPU.name in doc["predictions"]["speeds"]
