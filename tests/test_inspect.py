"""`inspect`, `devices`, and the CLI's front door: figures, bad input, help."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gguf import GGUFReader

from conftest import assert_one_line_error, run_cli

from rotary_gguf.inventory import read_inventory


def independent_sums(path) -> dict:
    """Expert vs other bytes summed with gguf-py's own reader, not ours."""
    reader = GGUFReader(path)
    experts = other = 0
    for t in reader.tensors:
        if "_exps." in t.name:
            experts += int(t.n_bytes)
        else:
            other += int(t.n_bytes)
    return {"experts": experts, "other": other, "count": len(reader.tensors)}


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(arch="qwen3moe"),
        dict(arch="qwen35moe"),
        dict(arch="qwen35moe", quant="q8_0"),
        dict(arch="qwen35moe", fused_gate_up=True),
    ],
    ids=["qwen3moe", "qwen35moe", "qwen35moe-q8_0", "qwen35moe-fused"],
)
def test_inspect_figures_match_an_independent_reader(test_model, kwargs):
    path = test_model(**kwargs)
    result = run_cli("inspect", path, "--json")
    assert result.returncode == 0, result.stderr
    s = json.loads(result.stdout)
    ref = independent_sums(path)
    assert s["bytes"] == {"experts": ref["experts"], "other": ref["other"]}
    assert s["tensor_count"] == ref["count"]
    assert s["file_bytes"] == path.stat().st_size
    assert sum(layer["experts"] for layer in s["layers"]) == ref["experts"]
    assert s["arch"] == kwargs["arch"]
    assert s["n_expert"] > s["n_expert_used"] > 0
    assert s["layout"] == "original"
    assert s["fused_gate_up"] == kwargs.get("fused_gate_up", False)
    reader = GGUFReader(path)
    field = reader.fields[f"{kwargs['arch']}.expert_count"]
    assert s["n_expert"] == int(np.asarray(field.parts[field.data[0]])[0])


@pytest.mark.parametrize("quant, file_type", [("q4_k_m", "Q4_K_M"), ("f32", "F32")])
def test_inspect_shows_the_quant_mix_and_trained_context(test_model, quant, file_type):
    path = test_model(arch="qwen35moe", quant=quant)
    s = json.loads(run_cli("inspect", path, "--json").stdout)
    reader = GGUFReader(path)
    by_type: dict[str, int] = {}
    for t in reader.tensors:
        by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + int(t.n_bytes)
    total = sum(by_type.values())
    assert {q["type"]: q["bytes"] for q in s["quant_mix"]} == by_type
    assert [q["bytes"] for q in s["quant_mix"]] == sorted(by_type.values(), reverse=True)
    assert sum(q["share"] for q in s["quant_mix"]) == pytest.approx(1.0)
    assert s["quant_mix"][0]["share"] == pytest.approx(max(by_type.values()) / total)
    field = reader.fields["qwen35moe.context_length"]
    assert s["context_length"] == int(np.asarray(field.parts[field.data[0]])[0]) > 0
    assert s["file_type"] == file_type
    table = run_cli("inspect", path).stdout
    assert f"trained context  {s['context_length']:,} tokens" in table
    top = s["quant_mix"][0]
    assert f"{file_type}: {top['type']} {top['share']:.1%}" in table


def test_generate_takes_threads_and_gives_the_same_text(test_model):
    path = test_model()
    one = run_cli("generate", path, "-n", "8", "--threads", "1")
    default = run_cli("generate", path, "-n", "8")
    assert one.returncode == 0, one.stderr
    assert one.stdout.splitlines()[0] == default.stdout.splitlines()[0]  # the text; the speed line differs
    assert_one_line_error(run_cli("generate", path, "--threads", "-1"), "--threads")


def test_verbose_works_after_the_subcommand_too(test_model):
    path = test_model()
    quiet = run_cli("generate", path, "-n", "2")
    assert quiet.returncode == 0 and "llama_model_loader" not in quiet.stderr
    for args in (("-v", "generate", path, "-n", "2"), ("generate", path, "-n", "2", "-v"),
                 ("generate", path, "--verbose", "-n", "2")):
        result = run_cli(*args)
        assert result.returncode == 0, (args, result.stderr)
        assert "llama_model_loader" in result.stderr, args
    assert "--verbose" in run_cli("plan", "--help").stdout


def test_qwen35moe_attention_layout_and_shared_expert(test_model):
    inv = read_inventory(test_model(arch="qwen35moe", layers=8))
    assert inv.attention_layout() == ["linear", "linear", "linear", "full"] * 2
    assert inv.has_shared_expert


def test_inspect_table_is_readable(test_model):
    result = run_cli("inspect", test_model(arch="qwen35moe"))
    assert result.returncode == 0, result.stderr
    for words in ("qwen35moe", "routed experts", "bytes per block", "linear (recurrent)", "original"):
        assert words in result.stdout


def test_non_moe_model_is_inspected_with_a_note(test_model):
    result = run_cli("inspect", test_model(arch="qwen3"), "--json")
    assert result.returncode == 0, result.stderr
    s = json.loads(result.stdout)
    assert s["n_expert"] == 0 and s["bytes"]["experts"] == 0
    assert "not a Mixture-of-Experts" in s["note"]


def test_bad_files_give_one_clear_line(tmp_path, test_model):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    assert_one_line_error(run_cli("inspect", empty), "empty file")

    noise = tmp_path / "noise.gguf"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    assert_one_line_error(run_cli("inspect", noise), "not a GGUF file")

    good = test_model(arch="qwen3moe").read_bytes()
    for cut, words in [(len(good) // 2, "truncated"), (200, "cannot fit in 200 bytes"), (30, "cannot fit in 30 bytes"), (12, "corrupt GGUF: header: truncated")]:
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(good[:cut])
        assert_one_line_error(run_cli("inspect", bad), words)

    corrupt = bytearray(good)
    corrupt[16:24] = (2**62).to_bytes(8, "little")  # absurd key/value count
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(bytes(corrupt))
    assert_one_line_error(run_cli("inspect", bad), "corrupt")

    assert_one_line_error(run_cli("inspect", tmp_path / "missing.gguf"), "no such file")


def test_catalog_names_the_target_model_shape(tmp_path):
    from rotary_gguf.catalog import load_catalog, match

    catalog = load_catalog()
    names = {m["name"] for m in catalog}
    assert {"Qwen3.6-35B-A3B", "Qwen3.5-35B-A3B", "Qwen3-30B-A3B"} <= names
    target = next(m for m in catalog if m["name"] == "Qwen3.6-35B-A3B")
    assert (target["arch"], target["n_layer"], target["n_expert"], target["n_expert_used"]) == ("qwen35moe", 40, 256, 8)

    class Shape:  # the figures match() compares, as an Inventory of the real file would report them
        arch, n_layer, n_expert, n_expert_used, n_embd, n_ff_exp = "qwen35moe", 41, 256, 8, 2048, 512

    assert match(Shape(), catalog) == ["Qwen3.6-35B-A3B", "Qwen3.5-35B-A3B"]


def test_devices_lists_the_cpu():
    result = run_cli("devices", "--json")
    assert result.returncode == 0, result.stderr
    devices = json.loads(result.stdout)
    cpu = [d for d in devices if d["type"] == "cpu"]
    assert cpu and cpu[0]["total"] > 0


def test_devices_with_rpc_lists_the_simulated_accelerator(rpc_endpoint):
    result = run_cli("devices", "--rpc", rpc_endpoint, "--json")
    assert result.returncode == 0, result.stderr
    rpc = [d for d in json.loads(result.stdout) if d["name"].startswith("RPC")]
    assert rpc and rpc[0]["description"] == rpc_endpoint


def test_unreachable_rpc_endpoint_is_one_line():
    from conftest import free_port

    assert_one_line_error(run_cli("devices", "--rpc", f"127.0.0.1:{free_port()}"), "cannot reach an RPC device")
    assert_one_line_error(run_cli("devices", "--rpc", "no-port"), "bad RPC endpoint")


def test_help_lists_every_command_and_version():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("inspect", "devices", "rpc-device", "generate"):
        assert command in result.stdout
    import typer

    from rotary_gguf.cli import app

    commands = typer.main.get_command(app).commands
    for command in commands.values():  # listed by one sentence on one line, not the docstring's line breaks
        assert command.short_help and "\n" not in command.short_help and command.short_help.endswith(".")
    assert commands["inspect"].short_help.startswith("Show a GGUF model's architecture, trained context, quantization "
                                                     "(general.file_type and each tensor type's share of the bytes)")
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("rotary-gguf ")
