"""Routing telemetry on real llama.cpp runs: counts add up, follow the router's skew, survive the
simulated accelerator, and come out in original expert ids for files the converter reordered."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import assert_one_line_error, run_cli
from synthetic_models import hot_experts
from rotary_gguf import native
from rotary_gguf.arch import expert_pattern
from rotary_gguf.convert import convert
from rotary_gguf.engine import Engine
from rotary_gguf.inventory import read_inventory
from rotary_gguf.plan import Placement
from rotary_gguf.profile_io import load_profile
from rotary_gguf.telemetry import RoutingTelemetry, record_profile

PROMPT = "The river bends twice before it reaches the sea, and"
PROMPTS = ["Once upon a time there was a lighthouse.", "def add(a, b):\n    return a + b\n", "2 + 2 = 4, so 3 + 3 ="]


def generate(path, telemetry, *, placement=None, tokens=12) -> list[int]:
    with Engine.load(path, placement, n_ctx=256, n_threads=1, telemetry=telemetry) as engine:
        return engine.greedy(engine.tokenize(PROMPT), tokens)


@pytest.mark.parametrize("arch", ["qwen3moe", "qwen35moe"])
def test_counts_add_up_to_tokens_times_experts_used(test_model, arch):
    path = test_model(arch=arch, router_skew=1.0)
    telemetry = RoutingTelemetry.for_model(path, pairs=True)
    with Engine.load(path, n_ctx=256, n_batch=16, n_threads=1, telemetry=telemetry, all_outputs=True) as engine:
        profile = record_profile(engine, telemetry, PROMPTS, 6)
        prompts = [engine.tokenize(p) for p in PROMPTS]
    # every token is processed but the last one generated for each prompt
    processed = sum(len(p) + 6 - 1 for p in prompts)
    used = telemetry.n_expert_used
    assert profile["tokens"] == telemetry.tokens == processed
    counts, pairs = telemetry.counts(), telemetry.pairs()
    for i in telemetry.layers:
        assert counts[i].sum() == processed * used
        # each token contributes used * (used - 1) ordered pairs of distinct experts
        assert pairs[i].sum() == processed * used * (used - 1)
        assert np.array_equal(pairs[i], pairs[i].T)
    window = min(telemetry.window, processed)
    assert telemetry.recent().sum(axis=1)[telemetry.layers].tolist() == [window * used] * len(telemetry.layers)


def test_without_output_every_token_the_last_qwen3moe_block_sees_only_outputs(test_model):
    """Why profiles make every token an output: qwen3moe runs its last block's FFN only for them."""
    path = test_model()
    telemetry = RoutingTelemetry.for_model(path)
    with Engine.load(path, n_ctx=256, n_threads=1, telemetry=telemetry) as engine:
        prompt = engine.tokenize(PROMPT)
        engine.greedy(prompt, 5)
    tokens = telemetry.layer_tokens()
    assert tokens[telemetry.layers[:-1]].tolist() == [len(prompt) + 4] * (len(telemetry.layers) - 1)
    assert tokens[telemetry.layers[-1]] == 1 + 4
    with pytest.raises(RuntimeError, match="every token"):
        telemetry.profile()


def test_counts_concentrate_on_the_skewed_experts(test_model):
    inv = read_inventory(test_model(router_skew=2.0))
    hot = hot_experts(inv.n_layer, inv.n_expert, inv.n_expert_used, 0)
    skewed, uniform = RoutingTelemetry(inv), RoutingTelemetry.for_model(test_model())
    generate(inv.path, skewed, tokens=24)
    generate(test_model(), uniform, tokens=24)
    for layer in skewed.layers:
        share = skewed.counts()[layer][hot[layer]].sum() / skewed.counts()[layer].sum()
        base = uniform.counts()[layer][hot[layer]].sum() / uniform.counts()[layer].sum()
        assert share > 0.9 > 0.6 > base, (layer, share, base)


def test_recent_window_and_switching_off(test_model):
    path = test_model(router_skew=1.0)
    telemetry = RoutingTelemetry.for_model(path, window=8)
    with Engine.load(path, n_ctx=256, n_threads=1, telemetry=telemetry) as engine:
        prompt = engine.tokenize(PROMPT)
        engine.greedy(prompt, 4)
        first = telemetry.counts()
        used = telemetry.n_expert_used
        assert telemetry.recent()[0].sum() == 8 * used
        assert (telemetry.recent() <= first).all()
        # the window holds the last tokens: decoding 8 tokens one by one replaces all of it
        telemetry.reset()
        engine.reset()
        engine.eval(prompt)
        for token in prompt[1:9]:
            engine.eval([token])
        assert np.array_equal(telemetry.recent(), telemetry.counts() - _counts_of_prefix(path, prompt))
        telemetry.enabled = False
        before = telemetry.counts()
        engine.greedy(prompt, 4)
        assert np.array_equal(telemetry.counts(), before)


def _counts_of_prefix(path, prompt) -> np.ndarray:
    telemetry = RoutingTelemetry.for_model(path)
    with Engine.load(path, n_ctx=256, n_threads=1, telemetry=telemetry) as engine:
        engine.eval(prompt)
    return telemetry.counts()


def test_counts_on_the_simulated_accelerator_match_the_cpu(test_model, rpc_endpoint):
    """On RPC the selections live in device memory: the tap copies them out."""
    path = test_model(router_skew=1.0)
    device = native.add_rpc_device(rpc_endpoint)
    placement = Placement(devices=(device.name,), n_gpu_layers=-1, overrides=((expert_pattern(), "CPU"),))
    on_cpu, on_rpc = RoutingTelemetry.for_model(path), RoutingTelemetry.for_model(path)
    assert generate(path, on_cpu) == generate(path, on_rpc, placement=placement)
    assert on_rpc.tokens > 0 and np.array_equal(on_cpu.counts(), on_rpc.counts())


def test_a_reordered_model_reports_original_expert_ids(test_model, tmp_path):
    path = test_model(router_skew=2.0)
    profile = tmp_path / "profile.json"
    result = run_cli("profile", path, "-o", profile, "--tokens", "8", "--threads", "1")
    assert result.returncode == 0, result.stderr
    reordered = convert(path, tmp_path / "reordered.gguf", profile=profile, show_progress=False).output
    inv = read_inventory(reordered)
    assert any(inv.expert_order(i) != list(range(inv.n_expert)) for i in range(inv.n_layer))

    original, moved = RoutingTelemetry.for_model(path, pairs=True), RoutingTelemetry(inv, pairs=True)
    assert generate(path, original, tokens=16) == generate(reordered, moved, tokens=16)
    assert np.array_equal(original.counts(), moved.counts())
    assert np.array_equal(original.recent(), moved.recent())
    assert np.array_equal(original.pairs(), moved.pairs())


def test_profile_command_writes_what_convert_reads(test_model, tmp_path):
    path = test_model(router_skew=1.0)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    out = tmp_path / "p.json"
    result = run_cli("profile", path, "--prompts", prompts, "--tokens", "5", "-o", out, "--threads", "1")
    assert result.returncode == 0, result.stderr
    doc = json.loads(out.read_text())
    inv = read_inventory(path)
    assert doc["model"] == {"arch": inv.arch, "n_expert": inv.n_expert, "n_expert_used": inv.n_expert_used,
                            "file": path.name, "bytes": inv.file_bytes, "layout": "original"}
    assert [layer["index"] for layer in doc["layers"]] == list(range(inv.n_layer))
    for layer in doc["layers"]:
        assert sum(layer["counts"]) == doc["tokens"] * inv.n_expert_used
    assert load_profile(out, inv).tokens == doc["tokens"]
    assert not list(tmp_path.glob(".p.json*")), "the temporary file was left behind"


def test_profile_command_bad_input_is_one_line(test_model, tmp_path):
    path = test_model()
    assert_one_line_error(run_cli("profile", path, "--prompts", tmp_path / "none.txt", "-o", tmp_path / "p.json"),
                          "no such prompts file")
    assert_one_line_error(run_cli("profile", path, "-o", tmp_path / "missing" / "p.json", "--tokens", "1"),
                          "does not exist")
    assert_one_line_error(run_cli("profile", test_model(arch="qwen3"), "-o", tmp_path / "p.json"),
                          "not a Mixture-of-Experts model")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert_one_line_error(run_cli("profile", path, "--prompts", empty, "-o", tmp_path / "p.json"), "no prompts")
