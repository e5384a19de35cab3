"""Budgets and the memory knobs: sizes with units, the display and driver reserve, the margin for
estimated parts, the context's defaults and limits, and --batch/--ubatch/--kv-type/--flash-attn
and one output a batch reaching llama.cpp as the memory model predicts (on the ggml-rpc device)."""

from __future__ import annotations

import dataclasses
import json
import math
from types import SimpleNamespace

import pytest

from conftest import assert_one_line_error, run_cli

from rotary_gguf import native
from rotary_gguf.demo import resolve_model
from rotary_gguf.engine import Engine
from rotary_gguf.errors import UserError
from rotary_gguf.inventory import read_inventory
from rotary_gguf.plan import (CARD_RESERVE, DEFAULT_CTX, ESTIMATE_MARGIN_SHARE, MIN_CTX, Accelerator, ModelFigures,
                              accelerator_compute_bytes, default_ctx, make_plan)
from rotary_gguf.units import parse_size

MiB, GiB = 2**20, 2**30
DEMO = resolve_model(None)  # head size 64 (quantized KV fits), 4096-token vocabulary, trained for 512 tokens
RPC = Accelerator("RPC0", "RPC0[127.0.0.1:1]", None, 64 * GiB, streams_host_ops=False, runtime_reserve=0)


def has_gpu() -> bool:
    return any(d.is_local_gpu for d in native.devices())


def plan_json(*args) -> dict:
    result = run_cli("plan", *map(str, args), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def check_rows(s: dict) -> dict:
    return {(r["device"], r["purpose"]): (r["predicted"], r["actual"]) for r in s["check"]}


# --- sizes -------------------------------------------------------------------------------------------
def test_a_size_needs_a_unit():
    assert parse_size("8GiB") == 8 * GiB and parse_size("7.5GB") == 7_500_000_000 and parse_size("0") == 0
    with pytest.raises(UserError, match="--vram 8: give a unit, e.g. 8GiB or 7.5GB"):
        parse_size("8", "--vram")
    result = run_cli("plan", str(DEMO), "--vram", "8")
    assert_one_line_error(result, "--vram 8: give a unit, e.g. 8GiB or 7.5GB")
    assert_one_line_error(run_cli("serve", "--checkpoint-memory", "512", "--port", "0"), "--checkpoint-memory 512: give a unit")


# --- reserve and margin ------------------------------------------------------------------------------
def test_a_vram_size_keeps_the_display_and_driver_reserve():
    if has_gpu():
        pytest.skip("this machine has a GPU: --vram plans for it")
    s = plan_json(DEMO, "--vram", "8GiB")
    assert s["reserve"]["bytes"] == CARD_RESERVE and "display and driver reserve" in s["reserve"]["reason"]
    assert s["vram_budget"] == 8 * GiB - CARD_RESERVE
    assert plan_json(DEMO, "--vram", "8GiB", "--reserve", "1GiB")["vram_budget"] == 7 * GiB
    assert plan_json(DEMO, "--vram", "8GiB", "--reserve", "0")["vram_budget"] == 8 * GiB
    table = run_cli("plan", str(DEMO), "--vram", "8GiB")
    assert "less 768.0 MiB display and driver reserve" in " ".join(table.stdout.split()), table.stdout


def test_an_rpc_device_keeps_no_reserve_unless_asked(rpc_endpoint):
    s = plan_json(DEMO, "--rpc", rpc_endpoint, "--vram", "64MiB")
    assert s["reserve"]["bytes"] == 0 and s["vram_budget"] == 64 * MiB
    assert plan_json(DEMO, "--rpc", rpc_endpoint, "--vram", "64MiB", "--reserve", "16MiB")["vram_budget"] == 48 * MiB


def test_the_margin_covers_a_share_of_the_estimates():
    m = ModelFigures.from_inventory(read_inventory(DEMO))
    cuda = Accelerator.planned_cuda()
    plan = make_plan(m, cuda, 1 * GiB, ctx=512)
    estimated = plan.accelerator_use.compute + plan.accelerator_use.runtime_reserve
    assert plan.estimate_margin == math.ceil(ESTIMATE_MARGIN_SHARE * estimated) > 0
    assert plan.accelerator_use.total + plan.estimate_margin <= plan.budget
    # the least budget holds the margin too: one byte less is refused, naming what would shrink the need
    assert make_plan(m, cuda, plan.minimum_budget, ctx=512).resident == frozenset()
    with pytest.raises(UserError) as err:
        make_plan(m, cuda, plan.minimum_budget - 1, ctx=512)
    message = str(err.value)
    assert "too small" in message and "--batch 128 saves" in message and "--ctx 256 saves" in message
    assert "--kv-type q8_0 saves" in message and "\n" not in message


# --- the context -------------------------------------------------------------------------------------
def test_ctx_defaults_to_the_catalog_within_the_trained_context(test_model):
    qwen36 = SimpleNamespace(arch="qwen35moe", n_layer=40, n_expert=256, n_expert_used=8, n_embd=2048, n_ff_exp=512,
                             hparam=lambda name, default=0: 262144 if name == "context_length" else default)
    assert default_ctx(qwen36) == 8192  # models.toml's default_ctx for Qwen3.6-35B-A3B
    assert default_ctx(read_inventory(test_model())) == DEFAULT_CTX  # not in the catalog
    assert plan_json(test_model(), "--vram", "8GiB", "--reserve", "0")["ctx"] == DEFAULT_CTX
    assert plan_json(DEMO, "--vram", "8GiB", "--reserve", "0")["ctx"] == 512  # never beyond the trained context


def test_ctx_limits_are_the_same_everywhere():
    for command in ("plan", "generate", "chat", "serve", "bench", "profile"):
        args = [command, str(DEMO)] + (["-o", "/dev/null"] if command == "profile" else [])
        assert_one_line_error(run_cli(*args, "--ctx", "1024"), "--ctx 1024", "trained for 512 tokens")
    # one shared option: the parser checks the least context alike in every command
    assert_one_line_error(run_cli("serve", str(DEMO), "--ctx", str(MIN_CTX - 1)), "--ctx", f"greater than or equal to {MIN_CTX}")


def test_kv_and_flash_settings_are_checked_before_llama_cpp(test_model):
    assert_one_line_error(run_cli("generate", str(DEMO), "--kv-type", "q8_0", "--flash-attn", "off"),
                          "quantizes the V cache", "--flash-attn on")
    assert_one_line_error(run_cli("plan", str(DEMO), "--vram", "1GiB", "--kv-type", "q5_1"), "--kv-type q5_1")
    assert_one_line_error(run_cli("plan", str(DEMO), "--vram", "1GiB", "--flash-attn", "maybe"), "--flash-attn maybe")
    assert_one_line_error(run_cli("plan", str(DEMO), "--vram", "1GiB", "--batch", "64", "--ubatch", "128"),
                          "--ubatch 128 is more than --batch 64")
    # the test models' attention heads have 16 values: no block of 32 fits
    assert_one_line_error(run_cli("generate", str(test_model()), "--kv-type", "q4_0"), "--kv-type q4_0", "use --kv-type f16")


def test_largest_context_that_fits():
    m = ModelFigures.from_inventory(read_inventory(DEMO))
    m = dataclasses.replace(m, n_ctx_train=1 << 20)  # room to search beyond the demo's 512
    budget = 40 * MiB
    plan = make_plan(m, RPC, budget, ctx=512)
    largest = plan.largest_ctx
    assert 512 < largest < 1 << 20
    assert make_plan(m, RPC, budget, ctx=largest).resident == frozenset()  # it fits, every expert on the host
    with pytest.raises(UserError, match="too small"):
        make_plan(m, RPC, budget, ctx=largest + 1)
    # a smaller KV cache type fits a longer context
    assert make_plan(m, RPC, budget, ctx=512, kv_type="q8_0").largest_ctx > largest


# --- the knobs reach llama.cpp, as predicted -----------------------------------------------------------
def test_batch_ubatch_kv_type_and_flash_attn_reach_llama_cpp(rpc_endpoint):
    base = ("--rpc", rpc_endpoint, "--vram", "64MiB", "--ctx", "512", "--check")
    runs = {
        "default": plan_json(DEMO, *base),
        "ubatch": plan_json(DEMO, *base, "--batch", "256", "--ubatch", "64"),
        "q8_0": plan_json(DEMO, *base, "--kv-type", "q8_0", "--flash-attn", "on"),
        "q4_0": plan_json(DEMO, *base, "--kv-type", "q4_0"),
        "no-fa": plan_json(DEMO, *base, "--flash-attn", "off"),
    }
    assert (runs["ubatch"]["n_batch"], runs["ubatch"]["n_ubatch"]) == (256, 64)
    assert runs["q8_0"]["kv_type"] == "q8_0" and runs["no-fa"]["flash_attn"] == "off"
    actual = {}
    for name, s in runs.items():
        rows = check_rows(s)
        kv_predicted, kv_actual = rows["accelerator", "kv_cache"]
        assert abs(kv_predicted - kv_actual) <= 0.005 * MiB, (name, rows)
        predicted, allocated = rows["accelerator", "compute"]
        assert allocated <= predicted <= 2 * allocated + MiB, (name, predicted, allocated)
        actual[name] = (kv_actual, allocated)
    kv = {name: a[0] for name, a in actual.items()}
    compute = {name: a[1] for name, a in actual.items()}
    assert kv["q4_0"] < kv["q8_0"] < kv["default"] and kv["q8_0"] <= 0.55 * kv["default"]
    assert compute["ubatch"] < compute["default"] / 3  # 64 tokens a micro-batch instead of 512
    assert compute["no-fa"] > compute["default"]  # every head's scores over the context


def test_one_output_a_batch_shrinks_the_compute_buffer_with_the_same_output(rpc_endpoint):
    m = ModelFigures.from_inventory(read_inventory(DEMO))
    accelerator = native.find_accelerator(rpc_endpoint)
    results = {}
    for all_outputs in (True, False):
        plan = make_plan(m, accelerator, 64 * GiB, ctx=512, n_batch=512, all_outputs=all_outputs)
        with Engine.load(DEMO, plan.placement, n_ctx=512, n_batch=512, all_outputs=all_outputs) as engine:
            prompt = engine.tokenize("Once upon a time there was a little robot who wanted to see the sea. " * 3)
            tokens = engine.greedy(prompt, 8)
            engine.reset()
            engine.eval(prompt)
            logits = engine.logits()
            rows = {(d, p): (pr, a) for d, p, pr, a in plan.compare(engine.load_report)}
        results[all_outputs] = (tokens, logits, rows["accelerator", "compute"])
    (tokens_all, logits_all, (predicted_all, actual_all)), (tokens_one, logits_one, (predicted_one, actual_one)) = (
        results[True], results[False])
    assert tokens_one == tokens_all and (logits_one == logits_all).all()
    logits_of_a_batch = 511 * m.n_vocab * 4
    assert actual_all - actual_one >= 0.4 * logits_of_a_batch, (actual_all, actual_one)
    assert actual_one <= predicted_one <= 2 * actual_one + MiB
    assert predicted_one == accelerator_compute_bytes(m, 512, 512) < predicted_all
