"""Plans over several accelerators, on two real ggml-rpc servers (two simulated accelerators):
the planner spreads resident expert blocks over both, llama.cpp loads them where the plan says
(its layer split given as tensor_split), greedy tokens and logits equal the CPU-only run's, and
bad --rpc / --devices input is one line. The f32 test models have nothing to repack, so every
placement computes on the same kernels and the comparison is bit for bit."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from fastapi.testclient import TestClient
from rich.console import Console

from conftest import assert_one_line_error, free_port, run_cli
from test_dashboard import SIZES, assert_laid_out, render
from test_serve import parse_prometheus

from rotary_gguf import native
from rotary_gguf.dashboard import Dashboard, device_budgets
from rotary_gguf.engine import Engine
from rotary_gguf.errors import UserError
from rotary_gguf.inventory import read_inventory
from rotary_gguf.plan import (Accelerator, ModelFigures, Placement, estimate_margin, layer_split, layers_by_device,
                              make_plan, make_spread_plan)
from rotary_gguf.serve import ServeOptions, create_app
from rotary_gguf.speed_model import ANY_TYPE, DeviceSpeeds, Layout, PlanSpeeds, Weights, token_seconds
from rotary_gguf.units import human_bytes

MiB = 2**20
CTX, BATCH = 256, 64
PROMPT = "The quick brown fox jumps over"
LOG_PRECISION = 0.005 * MiB  # llama.cpp logs buffer sizes in MiB with two decimals


@pytest.fixture(scope="module")
def endpoints(rpc_endpoint, second_rpc_endpoint):
    return [rpc_endpoint, second_rpc_endpoint]


def tight_budget(model: ModelFigures, accelerators) -> int:
    """One budget for every device that holds each device's own part and a block and a half of
    experts more: no device can hold every expert block."""
    roomy = make_spread_plan(model, [(a, 1 << 40) for a in accelerators], ctx=CTX, n_batch=BATCH)
    least = max(s.use.total - sum(model.expert_bytes(i) for i in s.resident) + estimate_margin(s.use) for s in roomy.shares)
    return least + 3 * max(model.expert_bytes(i) for i in range(model.n_layer)) // 2


def spread_plan(path, endpoints):
    model = ModelFigures.from_inventory(read_inventory(path))
    accelerators = native.find_accelerators(endpoints)
    budget = tight_budget(model, accelerators)
    return make_spread_plan(model, [(a, budget) for a in accelerators], ctx=CTX, n_batch=BATCH), budget


# --- the planner (pure) ----------------------------------------------------------------------------
def test_layer_split_follows_the_budgets_as_llama_cpp_assigns_layers():
    assert layer_split(5, [1, 1]) == [3, 2]
    assert layer_split(41, [8, 4]) == [27, 14]
    assert layer_split(7, [1, 0, 1]) == [4, 0, 3]
    # llama.cpp: layer il goes to the first device whose cumulative share exceeds il / layers
    blocks, output = layers_by_device([3, 2], n_layer=4)
    assert blocks == [(0, 1, 2), (3,)] and output == 1
    blocks, output = layers_by_device([2, 4], n_layer=4, n_nextn=1)  # the NextN block takes a layer too
    assert blocks == [(0, 1), (2, 3)] and output == 1


def test_crossings_between_devices_cost_a_launch_each_side_and_a_copy():
    weights = Weights(other={"F32": 4 * MiB}, expert={i: {"F32": MiB} for i in range(4)}, n_expert=8, n_expert_used=2)
    fast = DeviceSpeeds("A", "", {ANY_TYPE: 100e9}, {ANY_TYPE: 1e12}, 128, graph_seconds=1e-4, copy_seconds=1e-5)
    slow = DeviceSpeeds("B", "", {ANY_TYPE: 10e9}, {ANY_TYPE: 1e11}, 128, graph_seconds=2e-4, copy_seconds=3e-5)
    cpu = DeviceSpeeds("CPU", "", {ANY_TYPE: 20e9}, {ANY_TYPE: 1e11}, 128, graph_seconds=1e-5)
    devices = {"A": fast, "B": slow}

    def parts(**layout) -> dict:
        return token_seconds(weights, Layout(**layout), cpu, fast, "decode", devices=devices)

    together = parts(layer_devices=("A", "A", "B", "B"), output_device="B")
    crossed = parts(layer_devices=("A", "A", "B", "B"), output_device="B", resident_on={1: "B"})
    one_device = parts(layer_devices=("A",) * 4, output_device="A")
    crossing_ab, crossing_ba = 1e-4 + 2e-4 + 1e-5, 2e-4 + 1e-4 + 3e-5
    assert together["splits"] == pytest.approx(crossing_ab)  # A -> B once, between blocks 1 and 2
    assert crossed["splits"] == pytest.approx(2 * crossing_ab + crossing_ba)  # and to B and back for block 1
    assert one_device["splits"] == 0
    # experts computed on the slow device cost more; the other weights are read where their blocks live
    assert crossed["resident experts"] > together["resident experts"] > one_device["resident experts"]
    assert together["weights"] == pytest.approx(0.5 * 4 * MiB / 100e9 + 0.5 * 4 * MiB / 10e9)


def test_plan_spreads_blocks_over_both_when_neither_holds_them_all(test_model, endpoints):
    path = test_model(arch="qwen35moe")
    plan, budget = spread_plan(path, endpoints)
    first, second = plan.shares
    assert first.resident and second.resident, plan.shares
    n_blocks = plan.model.n_layer
    assert len(first.resident) < n_blocks and len(second.resident) < n_blocks
    alone = make_plan(plan.model, first.accelerator, budget, ctx=CTX, n_batch=BATCH)
    assert len(plan.resident) > len(alone.resident)
    for share in plan.shares:
        assert share.use.total <= share.budget == budget
    # every block's tensors on one device, llama.cpp's split as layer counts, and each device's experts named
    assert sorted(first.layers + second.layers) == list(range(n_blocks))
    assert plan.placement.tensor_split == (first.split, second.split) and sum(plan.placement.tensor_split) == n_blocks + 1
    assert plan.placement.devices == (first.accelerator.name, second.accelerator.name)
    buffer_types = {buft for _, buft in plan.overrides}
    assert {first.accelerator.buffer_type, second.accelerator.buffer_type} <= buffer_types


def test_blocks_cross_to_another_device_only_where_the_speed_model_says_it_pays(test_model):
    inv = read_inventory(test_model(arch="qwen35moe"))
    model = ModelFigures.from_inventory(inv)
    small, large = (Accelerator(name, f"{name}_buffer", None, None, False, 0) for name in ("A", "B"))
    experts = sum(model.expert_bytes(i) for i in range(model.n_layer))

    def budgets(budget: int) -> list:
        return [(small, budget), (large, 2 * budget + experts)]

    def a_holds_blocks_but_no_experts(budget: int) -> bool:
        try:
            plan = make_spread_plan(model, budgets(budget), ctx=CTX, n_batch=BATCH)
        except UserError:
            return False
        return bool(plan.shares[0].layers) and not plan.shares[0].resident

    # A holds its blocks' other tensors and no expert block; B every expert block
    devices = budgets(next(b for b in range(MiB, 64 * MiB, 16 * 1024) if a_holds_blocks_but_no_experts(b)))
    cpu = DeviceSpeeds("CPU", "", {ANY_TYPE: 1e9}, {ANY_TYPE: 1e10}, 128, graph_seconds=1e-5)

    def speeds(b_rate: float) -> PlanSpeeds:
        a = DeviceSpeeds("A", "", {ANY_TYPE: 1e11}, {ANY_TYPE: 1e12}, 128, graph_seconds=1e-5, copy_seconds=1e-5)
        b = DeviceSpeeds("B", "", {ANY_TYPE: b_rate}, {ANY_TYPE: 10 * b_rate}, 128, graph_seconds=1e-5, copy_seconds=1e-5)
        return PlanSpeeds(Weights.from_inventory(inv), cpu, a, "set", devices={"A": a, "B": b})

    fast = make_spread_plan(model, devices, ctx=CTX, n_batch=BATCH, speeds=speeds(1e12))
    assert fast.shares[0].resident == () and fast.shares[1].resident == tuple(range(model.n_layer))
    assert fast.host_layers == []
    slow = make_spread_plan(model, devices, ctx=CTX, n_batch=BATCH, speeds=speeds(1e8))
    assert slow.shares[1].resident == slow.shares[1].layers  # its own blocks, then none of A's
    assert slow.host_layers == list(slow.shares[0].layers) != []
    assert dict(fast.predictions)["this plan"].decode_tps > dict(slow.predictions)["this plan"].decode_tps


@pytest.mark.parametrize("arch", ["qwen35moe", "qwen3moe"])
def test_two_device_placement_gives_the_cpu_output_as_planned(test_model, endpoints, arch):
    path = test_model(arch=arch)
    plan, _ = spread_plan(path, endpoints)
    outputs = {}
    for name, placement in (("cpu", Placement()), ("two devices", plan.placement)):
        with Engine.load(path, placement, n_ctx=CTX, n_batch=BATCH) as engine:
            tokens = engine.tokenize(PROMPT)
            engine.eval(tokens)
            outputs[name] = (engine.logits(), engine.greedy(tokens, 8))
            report = engine.load_report
    (cpu_logits, cpu_tokens), (logits, tokens) = outputs["cpu"], outputs["two devices"]
    assert tokens == cpu_tokens
    assert np.array_equal(logits, cpu_logits), float(np.abs(logits - cpu_logits).max())
    rows = {(device, purpose): (predicted, actual) for device, purpose, predicted, actual in plan.compare(report)}
    for share in plan.shares:
        name = share.accelerator.name
        for purpose in ("weights", "kv_cache", "recurrent_state"):  # exact parts: llama.cpp split the layers as planned
            predicted, actual = rows[name, purpose]
            assert abs(predicted - actual) <= max(0.02 * actual, LOG_PRECISION), (name, purpose, predicted, actual)
        predicted, actual = rows[name, "compute"]
        assert actual <= predicted, (name, predicted, actual)
        on_device = sum(n for sizes in (report.weight_bytes, report.kv_bytes, report.recurrent_bytes, report.compute_bytes)
                        for buft, n in sizes.items() if buft == share.accelerator.buffer_type)
        assert on_device <= share.budget
    for i in plan.resident:
        assert report.overridden[f"blk.{i}.ffn_down_exps.weight"] == plan.device_of(i).buffer_type


def test_two_devices_with_mtp_drafts_give_the_cpu_tokens(test_model, endpoints):
    """The NextN block takes a llama.cpp layer of its own: the split counts it, and drafts still
    give the plain run's tokens."""
    path = test_model(arch="qwen35moe", mtp="mirror")
    plan, _ = spread_plan(path, endpoints)
    assert sum(plan.placement.tensor_split) == plan.model.n_layer + 2
    generated = {}
    for name, placement, draft in (("cpu", Placement(), "off"), ("two devices, drafts", plan.placement, "mtp")):
        with Engine.load(path, placement, n_ctx=CTX, n_batch=BATCH, draft=draft) as engine:
            prompt = engine.tokenize(PROMPT)
            generated[name] = [e.token for e in engine.generate(prompt, max_tokens=12) if e.token is not None]
    assert generated["two devices, drafts"] == generated["cpu"]


# --- memory per device: the dashboard and /metrics -------------------------------------------------
def placed_on(report, buffer_type: str) -> int:
    """Bytes llama.cpp's load log puts in buffers of exactly this buffer type."""
    return sum(n for sizes in (report.weight_bytes, report.kv_bytes, report.recurrent_bytes, report.compute_bytes,
                               report.output_bytes)
               for buffer, n in sizes.items() if buffer == buffer_type)


def test_dashboard_and_metrics_show_each_devices_memory(test_model, endpoints):
    path = test_model(arch="qwen35moe")
    plan, budget = spread_plan(path, endpoints)
    names = [s.accelerator.name for s in plan.shares]
    headers = {"Authorization": "Bearer k"}
    with Engine.load(path, plan.placement, n_ctx=CTX, n_batch=BATCH, n_threads=1) as engine:
        report = engine.load_report
        placed = {s.accelerator.name: placed_on(report, s.accelerator.buffer_type) for s in plan.shares}
        dashboard = Dashboard(engine, plan=plan, serving=True)
        screens = {}
        for width, height, rows in SIZES:  # whole terminals, and the part chat gives it
            dashboard.height = rows
            screens[width, rows or height] = render(dashboard, width, height)
        compact = render_compact(dashboard, 80)
        with TestClient(create_app(engine, ServeOptions("two", max_queue=1, api_key="k", budgets=device_budgets(plan)))) as client:
            assert client.post("/v1/completions", headers=headers, json={"prompt": PROMPT, "max_tokens": 4}).status_code == 200
            samples = parse_prometheus(client.get("/metrics", headers=headers).text)
    # both servers name their buffers RPC0[host:port]: each device counts its own endpoint's, none twice
    rpc_total = sum(n for sizes in (report.weight_bytes, report.kv_bytes, report.recurrent_bytes, report.compute_bytes)
                    for buffer, n in sizes.items() if buffer.startswith("RPC"))
    assert all(n > 0 for n in placed.values()) and sum(placed.values()) == rpc_total, (placed, rpc_total)
    assert [(a.name, a.used, a.total, a.source) for a in dashboard.reading.accelerators] == [
        (name, placed[name], budget, "placed") for name in names]
    for (width, height), lines in screens.items():
        assert_laid_out(lines, width, height)
        for name in names:  # one bar each: name, bar, placed / budget
            bar = re.compile(rf"^(?:│ )?{name} +[█·]{{4,20}} {re.escape(human_bytes(placed[name]))} / "
                             rf"{re.escape(human_bytes(budget))}")
            assert sum(bool(bar.match(line)) for line in lines) == 1, (name, "\n".join(lines))
    assert f"2 accelerators {human_bytes(sum(placed.values()))} / {human_bytes(2 * budget)}" in compact
    for name in names:
        assert samples[f'rotary_gguf_accelerator_placed_bytes{{device="{name}"}}'] == placed[name]
        assert samples[f'rotary_gguf_accelerator_budget_bytes{{device="{name}"}}'] == budget
        assert samples[f'rotary_gguf_accelerator_memory_total_bytes{{device="{name}"}}'] > 0
    assert sorted(k for k in samples if "accelerator_placed" in k) == sorted(
        f'rotary_gguf_accelerator_placed_bytes{{device="{name}"}}' for name in names)


def test_device_properties_read_as_ggml_writes_them(endpoints):
    """ggml's device properties (the NVML lookup reads a CUDA GPU's PCI bus id from them) agree with
    what the single-field calls say: the struct is laid out as ggml's."""
    native.find_accelerators(endpoints)
    for dev in native.devices():
        props = native.device_props(dev.name)
        assert (props.name.decode(), props.description.decode(), native.DEVICE_TYPES[props.type]) == (
            dev.name, dev.description, dev.type)
        assert (props.memory_free, props.memory_total) == (dev.free, dev.total) and dev.total > 0
        bus = native.pci_bus_id(dev.name)
        if dev.is_local_gpu:
            assert bus is not None and re.fullmatch(r"[0-9a-f]{4,8}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-9a-f](-v\d+)?", bus), bus
        else:  # the CPU and ggml-rpc devices have none
            assert bus is None


def render_compact(dashboard: Dashboard, width: int) -> str:
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(dashboard.compact())
    return console.export_text()


# --- the CLI ----------------------------------------------------------------------------------------
def test_plan_json_shows_each_devices_memory(test_model, endpoints):
    path = test_model(arch="qwen35moe")
    plan, budget = spread_plan(path, endpoints)
    result = run_cli("plan", path, "--rpc", ",".join(endpoints), "--vram", f"{budget}B", "--ctx", CTX, "--batch", BATCH,
                     "--threads", 1, "--json")
    assert result.returncode == 0, result.stderr
    s = json.loads(result.stdout)
    assert [d["device"] for d in s["devices"]] == ["RPC0", "RPC1"]
    assert s["placement"]["devices"] == ["RPC0", "RPC1"] and s["placement"]["tensor_split"] == list(plan.placement.tensor_split)
    assert sum(d["predicted_bytes"] for d in s["devices"]) == s["predicted"]["accelerator_bytes"]
    for d in s["devices"]:
        assert d["budget"] == budget and 0 < d["predicted_bytes"] <= budget
        assert d["predicted_bytes"] == sum(d["predicted"].values())
    assert s["expert_cache"] is None and "one accelerator" in s["expert_cache_reason"]
    names = [c["name"] for c in s["predictions"]["candidates"]]
    assert names[0] == "this plan" and "--cpu-moe" in names and "CPU only" in names
    # one device picked out of two: the single-device plan on it
    single = run_cli("plan", path, "--rpc", ",".join(endpoints), "--devices", "RPC1", "--vram", f"{budget}B",
                     "--ctx", CTX, "--batch", BATCH, "--threads", 1, "--json")
    assert single.returncode == 0, single.stderr
    one = json.loads(single.stdout)
    assert one["accelerator"]["device"] == "RPC1" and one["devices"] == [] and one["placement"]["devices"] == ["RPC1"]
    table = run_cli("plan", path, "--rpc", ",".join(endpoints), "--vram", f"{budget}B,{budget}B", "--ctx", CTX,
                    "--batch", BATCH, "--threads", 1, env={"COLUMNS": "200"})
    assert table.returncode == 0, table.stderr
    for text in ("device RPC0", "device RPC1", "block on", "RPC0[", "this plan"):
        assert text in table.stdout, text


def test_bad_rpc_and_devices_input_is_one_line(test_model, endpoints):
    path = test_model(arch="qwen35moe")
    both = ",".join(endpoints)
    dead = f"127.0.0.1:{free_port()}"
    assert_one_line_error(run_cli("plan", path, "--rpc", f"{endpoints[0]},{endpoints[0]}"), "--rpc names", "twice")
    assert_one_line_error(run_cli("plan", path, "--rpc", f"{endpoints[0]},{dead}"), "cannot reach an RPC device", dead)
    assert_one_line_error(run_cli("plan", path, "--rpc", f"{endpoints[0]},nowhere"), "bad RPC endpoint", "nowhere")
    assert_one_line_error(run_cli("plan", path, "--rpc", both, "--devices", "RPC0,RPC7"), "unknown device 'RPC7'",
                          "RPC0, RPC1")
    assert_one_line_error(run_cli("plan", path, "--rpc", both, "--devices", "RPC1,RPC1"), "--devices names RPC1 twice")
    assert_one_line_error(run_cli("plan", path, "--rpc", both, "--vram", "1GiB,1GiB,1GiB"), "3 sizes for 2 devices")
    assert_one_line_error(run_cli("plan", path, "--rpc", both, "--vram", "1MiB"), "too small", "RPC0")
    assert_one_line_error(run_cli("plan", path, "--rpc", both, "--mode", "rotary"), "rotary mode", "--devices")
    assert_one_line_error(run_cli("plan", path, "--rpc", both, "--expert-cache", "4"), "expert cache", "one device")
    assert_one_line_error(run_cli("bench", path, "--rpc", both, "--devices", "CUDA3"), "unknown device 'CUDA3'")
    assert_one_line_error(run_cli("devices", "--rpc", f"{endpoints[1]},{endpoints[1]}"), "twice")


def test_bench_compares_two_devices_with_the_first_alone_and_cpu_moe(test_model, endpoints):
    path = test_model(arch="qwen35moe")
    _, budget = spread_plan(path, endpoints)
    result = run_cli("bench", path, "--rpc", ",".join(endpoints), "--vram", f"{budget}B", "--ctx", CTX, "--batch", BATCH,
                     "--threads", 1, "--prompt-tokens", 16, "--gen-tokens", 8, "--runs", 1, "--json", timeout=180)
    assert result.returncode == 0, result.stderr
    s = json.loads(result.stdout)
    names = [name for c in s["candidates"] for name in c["name"].split(" = ")]
    assert names[0] == "plan RPC0+RPC1" and "plan RPC0 alone" in names and "--cpu-moe" in names
    first = s["candidates"][0]
    assert first["devices"] == ["RPC0", "RPC1"] and first["predicted"] is not None
    # the peak is both devices' together, each one's own in the breakdown
    peaks = {name: p["median"] for name, p in first["peak_accelerator_bytes_by_device"].items()}
    assert list(peaks) == ["RPC0", "RPC1"] and all(p > 0 for p in peaks.values())
    assert first["figures"]["peak_accelerator_bytes"]["median"] == sum(peaks.values())
    alone = next(c for c in s["candidates"] if "plan RPC0 alone" in c["name"])
    assert list(alone["peak_accelerator_bytes_by_device"]) == ["RPC0"]
    assert s["outputs_identical"], s["output_checks"]
