"""MTP drafts in the planner and in bench: the memory drafting adds, predicted and checked against
what llama.cpp allocates on the ggml-rpc device; where the MTP block's experts go; `--draft auto`
following the verdict a real bench recorded; one-line errors."""

from __future__ import annotations

import json
import re

from conftest import assert_one_line_error, run_cli

from rotary_gguf.inventory import read_inventory
from rotary_gguf.plan import ModelFigures, recurrent_state_bytes
from test_budgets import check_rows, plan_json
from test_draft import MIRROR

MiB = 2**20
PROMPT = "The river bends past the old mill"


def drafting_plan(path, rpc_endpoint, vram: str, *more: str) -> dict:
    return plan_json(path, "--rpc", rpc_endpoint, "--vram", vram, "--ctx", "256", "--draft", "mtp", "--draft-max", "3",
                     "--check", *more)


def assert_checked(s: dict) -> None:
    """Weights, KV cache and recurrent state as llama.cpp allocates them (its log has 0.01 MiB
    steps); the compute estimates at or above what it allocates, within 2x."""
    rows = check_rows(s)
    for purpose in ("weights", "kv_cache", "recurrent_state"):
        predicted, actual = rows["accelerator", purpose]
        assert abs(predicted - actual) <= 0.01 * MiB, (purpose, rows)
    predicted, actual = rows["accelerator", "compute"]
    assert actual <= predicted <= 2 * actual + MiB, rows


def test_the_plan_counts_what_drafting_allocates(test_model, rpc_endpoint):
    path = test_model(**MIRROR)
    figures = ModelFigures.from_inventory(read_inventory(path))
    plain = plan_json(path, "--rpc", rpc_endpoint, "--vram", "64MiB", "--ctx", "256", "--draft", "off", "--check")
    resident = drafting_plan(path, rpc_endpoint, "64MiB")
    assert plain["draft"] is None
    assert_checked(plain)
    assert_checked(resident)
    draft = resident["draft"]
    assert draft["draft_max"] == 3 and draft["experts"] == "accelerator"
    grown = {part: resident["predicted"]["accelerator"][part] - plain["predicted"]["accelerator"][part]
             for part in ("weights", "kv_cache", "recurrent_state")}
    assert grown == {"weights": figures.mtp_base_bytes + figures.mtp_expert_bytes,
                     "kv_cache": draft["accelerator"]["kv_cache"],
                     "recurrent_state": 3 * recurrent_state_bytes(figures)}
    one_block = plain["predicted"]["accelerator"]["kv_cache"] // figures.attention.count("full")
    assert draft["accelerator"]["kv_cache"] == one_block

    # a budget that holds every trunk block but not the MTP block's experts: those go to the host
    short = (resident["predicted"]["accelerator_bytes"] + resident["estimate_margin_bytes"]
             - figures.mtp_expert_bytes // 2)
    on_host = drafting_plan(path, rpc_endpoint, f"{short}B")
    assert on_host["draft"]["experts"] == "host"
    assert "left after the trunk's blocks" in on_host["draft"]["experts_reason"]
    assert len([layer for layer in on_host["layers"] if layer["experts"] == "accelerator"]) == figures.n_layer
    assert_checked(on_host)
    assert (resident["predicted"]["accelerator"]["weights"] - on_host["predicted"]["accelerator"]["weights"]
            == figures.mtp_expert_bytes)


def test_the_plan_table_shows_the_mtp_lines(test_model, rpc_endpoint):
    path = test_model(**MIRROR)
    table = run_cli("plan", path, "--rpc", rpc_endpoint, "--vram", "64MiB", "--ctx", "256", "--draft", "mtp")
    assert table.returncode == 0, table.stderr
    text = " ".join(table.stdout.split())
    for line in ("MTP drafts up to 3 a round", "of which MTP drafts:", "MTP block weights", "MTP KV cache",
                 "recurrent snapshots (3)", "verify outputs (4)"):
        assert line in text, table.stdout
    off = run_cli("plan", path, "--rpc", rpc_endpoint, "--vram", "64MiB", "--ctx", "256", "--draft", "off")
    assert "MTP" not in off.stdout


def test_draft_auto_follows_the_verdict_bench_records(test_model, tmp_path):
    path = test_model(**MIRROR)
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    generate = ("generate", path, "-p", PROMPT, "-n", "16", "--threads", "1", "--ctx", "256")

    def drafted(result) -> bool:
        assert result.returncode == 0, result.stderr
        return "drafted" in result.stdout

    first = run_cli(*generate, env=env)
    assert not drafted(first) and "rotary-gguf bench" in " ".join(first.stderr.split())

    result = run_cli("bench", path, "--prompt-tokens", "16", "--gen-tokens", "16", "--runs", "1", "--threads", "1",
                     "--ctx", "256", "--json", env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    names = [c["name"] for c in report["candidates"]]
    assert names == ["cpu-only", "cpu-only +mtp"]
    with_drafts = report["candidates"][1]
    assert with_drafts["draft_max"] == 3 and with_drafts["figures"]["mean_accepted"]["median"] > 0
    assert 0 < with_drafts["figures"]["draft_acceptance"]["median"] <= 1
    (verdict,) = report["draft_verdicts"]
    measured = [c["figures"]["decode_tps"]["median"] for c in report["candidates"]]
    assert verdict["faster"] == (measured[1] > measured[0]) and verdict["candidate"] == "cpu-only +mtp"

    records = list((tmp_path / "rotary-gguf" / "drafts").glob("*.json"))
    assert len(records) == 1
    assert drafted(run_cli(*generate, env=env)) == verdict["faster"]
    # the record decides: flipped, auto follows it
    d = json.loads(records[0].read_text())
    for entry in d["verdicts"].values():
        entry["faster"] = not entry["faster"]
    records[0].write_text(json.dumps(d))
    assert drafted(run_cli(*generate, env=env)) != verdict["faster"]
    # another thread count is another setup: not measured
    assert not drafted(run_cli(*generate[:-4], "--threads", "2", "--ctx", "256", env=env))
    assert drafted(run_cli(*generate, "--draft", "mtp", env=env))
    assert not drafted(run_cli(*generate, "--draft", "off", env=env))


def test_drafting_errors_are_one_line(test_model, rpc_endpoint):
    plain = test_model(arch="qwen35moe")
    path = test_model(**MIRROR)
    for command in ("generate", "chat", "serve", "bench", "plan"):
        assert_one_line_error(run_cli(command, path, "--draft", "eagle"), "unknown draft mode 'eagle'", "auto, mtp, off")
    assert_one_line_error(run_cli("plan", plain, "--rpc", rpc_endpoint, "--vram", "64MiB", "--draft", "mtp"),
                          "no multi-token-prediction")
    assert_one_line_error(run_cli("bench", plain, "--draft", "mtp"), "no multi-token-prediction")
    # auto on a model without an MTP block just does not draft
    assert plan_json(plain, "--rpc", rpc_endpoint, "--vram", "64MiB")["draft"] is None
    need = drafting_plan(path, rpc_endpoint, "64MiB")["minimum_budget"]
    small = run_cli("plan", path, "--rpc", rpc_endpoint, "--vram", f"{need - 1}B", "--ctx", "256", "--draft", "mtp")
    assert_one_line_error(small, "too small")
    saved = re.search(r"--draft off saves ([\d.]+) (KiB|MiB)", small.stderr)
    assert saved, small.stderr
    # the same budget without drafts plans fine, and auto (not measured) falls back to it
    assert plan_json(path, "--rpc", rpc_endpoint, "--vram", f"{need - 1}B", "--ctx", "256", "--draft", "mtp",
                     "--draft-max", "1")["draft"]["draft_max"] == 1
    assert plan_json(path, "--rpc", rpc_endpoint, "--vram", f"{need - 1}B", "--ctx", "256")["draft"] is None
