"""The expert cache from the command line, on the simulated accelerator: `--expert-cache` on plan,
serve and bench; the planned slots fit the budget and are what gets allocated; served answers are
the uncached ones; bad settings are one-line errors."""

from __future__ import annotations

import json

import pytest
from test_serve import API_KEY, MESSAGES, Server

from conftest import assert_one_line_error, run_cli

SLOTS = 6


@pytest.fixture(scope="module")
def model(test_model):
    return test_model(arch="qwen3moe", router_skew=1.5)


def plan_json(model, endpoint, *args) -> dict:
    result = run_cli("plan", model, "--rpc", endpoint, "--ctx", "256", "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def host_budget(model, endpoint, slots: int) -> int:
    """The least budget that holds the model with every expert on host and `slots` cache slots
    per block, from the planner's own figures."""
    plan = plan_json(model, endpoint, "--expert-cache", "off")
    n_expert = 32  # make_model's default
    return plan["minimum_budget"] + sum(layer["expert_bytes"] * slots // n_expert for layer in plan["layers"])


def test_auto_fills_the_budget_left_after_the_resident_blocks(model, rpc_endpoint):
    off = plan_json(model, rpc_endpoint, "--expert-cache", "off")
    block = off["layers"][0]["expert_bytes"]  # every block of the test model is alike
    budget = off["minimum_budget"] + block + 9 * 3 * block // 32 + 1000  # one block resident, 9 slots in the others
    plan = plan_json(model, rpc_endpoint, "--vram", f"{budget}B", "--cache-misses", "upload")
    cache = plan["expert_cache"]
    assert cache["slots"] == 9 and cache["layers"] == [0, 1, 2] and cache["bytes"] == 9 * 3 * block // 32
    assert plan["predicted"]["accelerator"]["expert_cache"] == cache["bytes"]
    assert plan["predicted"]["accelerator_bytes"] <= budget and plan["margin_bytes"] >= 0
    assert plan["placement"]["repack"] is False  # the cache uploads host experts in ggml's plain layout
    off = plan_json(model, rpc_endpoint, "--vram", f"{budget}B", "--expert-cache", "off")
    assert off["expert_cache"] is None and off["predicted"]["accelerator"]["expert_cache"] == 0


def test_check_allocates_the_planned_slots(model, rpc_endpoint):
    budget = host_budget(model, rpc_endpoint, SLOTS)
    plan = plan_json(model, rpc_endpoint, "--vram", f"{budget}B", "--expert-cache", str(SLOTS), "--cache-misses", "upload",
                     "--check")
    assert plan["expert_cache"]["slots"] == SLOTS
    rows = {(r["device"], r["purpose"]): r for r in plan["check"]}
    row = rows[("accelerator", "expert_cache")]
    assert row["actual"] == row["predicted"] == plan["expert_cache"]["bytes"] > 0


@pytest.mark.parametrize("misses", ["split", "upload"])
def test_served_answers_are_the_uncached_ones(model, rpc_endpoint, tmp_path, misses):
    """A server with the cache and one without, on the same budget: the same greedy replies over
    two turns, and the cache's figures on /metrics."""
    budget = f"{host_budget(model, rpc_endpoint, SLOTS + 1)}B"  # split keeps a zero slot too
    replies = {}
    for setting in ("off", str(SLOTS)):
        server = Server(tmp_path, model, "--rpc", rpc_endpoint, "--vram", budget, "--ctx", "256",
                        "--expert-cache", setting, "--cache-misses", misses, "--api-key", API_KEY)
        try:
            client = server.client()
            first = client.chat.completions.create(model="m", messages=MESSAGES, temperature=0, max_tokens=24)
            turn = [*MESSAGES, {"role": "assistant", "content": first.choices[0].message.content},
                    {"role": "user", "content": "And then?"}]
            second = client.chat.completions.create(model="m", messages=turn, temperature=0, max_tokens=24)
            replies[setting] = (first.choices[0].message.content, second.choices[0].message.content)
            metrics = server.metrics()
        finally:
            server.stop()
        log = server.log.read_text()
        assert "Traceback" not in log and "expert cache off" not in log, log
    assert replies["off"] == replies[str(SLOTS)] and all(replies["off"])
    assert metrics.get("rotary_gguf_expert_cache_enabled") == 1
    assert 0 < metrics["rotary_gguf_expert_cache_hit_rate"] < 1


def test_bench_measures_the_plan_with_and_without_its_cache(model, rpc_endpoint):
    budget = f"{host_budget(model, rpc_endpoint, SLOTS)}B"
    result = run_cli("bench", model, "--rpc", rpc_endpoint, "--vram", budget, "--expert-cache", str(SLOTS),
                     "--cache-misses", "upload", "--ctx", "256",
                     "--prompt-tokens", "16", "--gen-tokens", "16", "--runs", "1", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    by_name = {c["name"]: c for c in doc["candidates"]}
    cached = by_name[f"plan cpu+cache {SLOTS}"]
    assert cached["expert_cache_slots"] == SLOTS
    assert 0 < cached["figures"]["cache_hit_rate"]["median"] < 1
    plain = next(c for n, c in by_name.items() if "plan cpu" in n.split(" = "))  # may be merged with --n-cpu-moe N
    assert plain["figures"]["cache_hit_rate"] is None
    assert doc["outputs_identical"] and cached["output_tokens"] == plain["output_tokens"]


@pytest.mark.parametrize("command", ["plan", "serve", "bench", "chat"])
def test_a_bad_setting_is_a_one_line_error(model, command):
    assert_one_line_error(run_cli(command, model, "--expert-cache", "lots"), "--expert-cache takes auto, off or a number")


def test_slots_outside_the_model_are_a_one_line_error(model, rpc_endpoint):
    assert_one_line_error(run_cli("plan", model, "--rpc", rpc_endpoint, "--expert-cache", "33"), "takes 1 to 32 expert cache slots")
    assert_one_line_error(run_cli("plan", model, "--rpc", rpc_endpoint, "--expert-cache", "3", "--cache-misses", "upload"),
                          "takes 4 to 32 expert cache slots")


@pytest.mark.parametrize("command", ["plan", "serve", "bench", "chat"])
def test_a_bad_miss_setting_is_a_one_line_error(model, command):
    assert_one_line_error(run_cli(command, model, "--cache-misses", "later"), "--cache-misses takes split or upload")
