"""`rotary-gguf bench` end to end on a real ggml-rpc device: every candidate and figure in the table
and the JSON, the same greedy output from every placement, and one-line errors for bad arguments."""

from __future__ import annotations

import json

import pytest

from conftest import assert_one_line_error, free_port, run_cli

from rotary_gguf import native
from rotary_gguf.bench import BASELINE, Candidate, Measurement, Result, differing_outputs, recommend
from rotary_gguf.plan import Placement

QUICK = ("--ctx", "256", "--prompt-tokens", "16", "--gen-tokens", "8", "--runs", "2")
FIGURES = ("prompt_tps", "decode_tps", "ttft_seconds", "peak_accelerator_bytes", "peak_rss_bytes", "decode_ratio")


def half_resident_budget(path, endpoint) -> int:
    """A budget that holds the expert tensors of half the blocks, from the planner's own figures."""
    plan = json.loads(run_cli("plan", path, "--rpc", endpoint, "--ctx", "256", "--json").stdout)
    experts = sorted(layer["expert_bytes"] for layer in plan["layers"])
    return plan["minimum_budget"] + sum(experts[len(experts) // 2 :])


def test_json_has_every_candidate_and_figure_and_one_output(test_model, rpc_endpoint):
    path = test_model()
    budget = half_resident_budget(path, rpc_endpoint)
    result = run_cli("bench", path, "--rpc", rpc_endpoint, "--vram", f"{budget}B", *QUICK, "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    by_name = {c["name"]: c for c in doc["candidates"]}
    assert list(by_name) == ["plan cpu", BASELINE, "--n-cpu-moe 2"]  # no room for everything on the accelerator
    for cand in by_name.values():
        assert cand["devices"] == ["RPC0"] and cand["mode"] == "cpu"
        for figure in FIGURES:
            assert len(cand["figures"][figure]["runs"]) == 2, (cand["name"], figure)
            assert cand["figures"][figure]["median"] > 0, (cand["name"], figure)
    assert by_name[BASELINE]["figures"]["decode_ratio"]["runs"] == [1.0, 1.0]
    assert by_name[BASELINE]["overrides"][0][1] == "CPU"
    assert "(0|1)" in by_name["--n-cpu-moe 2"]["overrides"][0][0]  # the first two blocks' experts on host
    placed = {n: c["figures"]["peak_accelerator_bytes"]["median"] for n, c in by_name.items()}
    assert placed[BASELINE] < placed["plan cpu"] <= budget
    assert placed["--n-cpu-moe 2"] == placed["plan cpu"]
    outputs = {n: c["output_tokens"] for n, c in by_name.items()}
    assert len(outputs["plan cpu"]) == 8 and all(o == outputs["plan cpu"] for o in outputs.values())
    assert doc["outputs_identical"] is True and doc["recommended"] in by_name


def test_table_shows_every_candidate_figure_and_a_recommendation(test_model, rpc_endpoint):
    result = run_cli("bench", test_model(), "--rpc", rpc_endpoint, *QUICK, env={"COLUMNS": "160"})
    assert result.returncode == 0, result.stderr
    for text in ("prompt t/s", "decode t/s", "vs --cpu-moe", "TTFT ms", "peak accel", "peak RSS",
                 "plan cpu", BASELINE, "all-accel", "recommended:"):
        assert text in result.stdout, text
    assert "error" not in result.stderr
    assert "--n-cpu-moe 0" not in result.stdout  # the same placement as all-accel: measured once


def test_without_an_accelerator_only_the_cpu_run_is_measured(test_model):
    if any(d.is_local_gpu for d in native.devices()):
        pytest.skip("this machine has a GPU")
    result = run_cli("bench", test_model(), *QUICK, "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert [c["name"] for c in doc["candidates"]] == ["cpu-only"]
    assert "no GPU here and no --rpc" in doc["notes"][0]


def test_a_changed_output_is_reported():
    def result(name, *outputs):
        runs = [Measurement(1.0, 1.0, 0.1, None, 1, list(tokens)) for tokens in outputs]
        return Result(Candidate(name, Placement.all_cpu(), "cpu", ""), runs)

    results = [result("a", [1, 2], [1, 2]), result("b", [1, 2], [1, 3]), result("c", [1, 2], [1, 2])]
    assert differing_outputs(results) == ["b"]


def test_the_recommendation_names_the_first_candidate_with_the_fastest_placement():
    def result(name, placement, decode_tps):
        run = Measurement(100.0, decode_tps, 0.1, None, 1, [1])
        return Result(Candidate(name, placement, "cpu", ""), [run])

    on_host = Placement(devices=("RPC0",), overrides=((r"\.ffn_up_exps\.", "CPU"),), n_gpu_layers=-1)
    all_accel = Placement(devices=("RPC0",), n_gpu_layers=-1)
    plan, same = result("plan cpu", all_accel, 50.0), result("all-accel", all_accel, 60.0)
    assert recommend([plan, result(BASELINE, on_host, 40.0), same]) is plan
    assert recommend([result(BASELINE, on_host, 70.0), plan, same]).candidate.name == BASELINE


@pytest.mark.parametrize(
    "args, fragment",
    [
        (("--runs", "0"), "--runs must be at least 1"),
        (("--gen-tokens", "0"), "--gen-tokens must be at least 1"),
        (("--prompt-tokens", "300"), "do not fit --ctx 256"),
        (("--vram", "1KiB", "--rpc", "{rpc}"), "too small"),
        (("--rpc", "127.0.0.1:{port}"), "cannot reach an RPC device"),
    ],
    ids=["runs-0", "gen-tokens-0", "prompt-too-long", "budget-too-small", "rpc-unreachable"],
)
def test_bad_arguments_give_one_line_errors(test_model, rpc_endpoint, args, fragment):
    args = [a.format(rpc=rpc_endpoint, port=free_port()) for a in args]
    assert_one_line_error(run_cli("bench", test_model(), *QUICK, *args), fragment)
