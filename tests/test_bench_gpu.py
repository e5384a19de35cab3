"""The GPU check's parts that run here: the Q4_K benchmark model, and tools/bench_gpu.py's variants
on the ggml-rpc device (the simulated accelerator: rotary mode is skipped there)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from conftest import REPO
from make_test_model import main as make_test_model_main
from synthetic_models import BIAS_CHANNEL, make_bench_model
from rotary_gguf.engine import Engine
from rotary_gguf.inventory import read_inventory
from rotary_gguf.plan import Accelerator, ModelFigures, make_plan

import bench_gpu

SMALL = dict(layers=4, embd=256, experts=32, used=4, ff=256)  # Q4_K rows need multiples of 256
BENCH = [sys.executable, str(REPO / "tools" / "bench_gpu.py")]
QUICK = ["--ctx", "256", "--prompt-tokens", "16", "--gen-tokens", "8"]


def test_bench_model_is_valid_q4_k_that_llama_cpp_runs(tmp_path):
    path = make_bench_model(tmp_path / "bench.gguf", **SMALL)
    inv = read_inventory(path)
    assert (inv.arch, inv.n_layer, inv.n_embd, inv.n_expert, inv.n_expert_used, inv.n_ff_exp) == ("qwen35moe", 4, 256, 32, 4, 256)
    assert {t.type_name for t in inv.expert_tensors} == {"Q4_K"} and len(inv.expert_tensors) == 3 * 4
    assert inv.expert_bytes == 4 * 3 * 32 * 256 * 256 // 256 * 144  # 144 bytes per 256 weights
    assert inv.file_bytes == path.stat().st_size

    tensors = {t.name: t for t in GGUFReader(path).tensors}
    for name, n_in in (("blk.1.ffn_gate_exps.weight", 256), ("blk.1.ffn_down_exps.weight", 256)):
        assert tensors[name].tensor_type == GGMLQuantizationType.Q4_K
        w = dequantize(tensors[name].data, GGMLQuantizationType.Q4_K)  # (expert, out, in)
        assert np.isfinite(w).all() and abs(w.mean()) < 1e-3
        assert 0.8 < w.std() * np.sqrt(n_in) < 1.1  # the f32 models' spread
    # the bias channel: only the routers read it (the experts skip its 32-weight sub-block), nothing writes it
    up = dequantize(tensors["blk.1.ffn_up_exps.weight"].data, GGMLQuantizationType.Q4_K)
    down = dequantize(tensors["blk.1.ffn_down_exps.weight"].data, GGMLQuantizationType.Q4_K)
    assert BIAS_CHANNEL < 32 and not up[..., :32].any() and up[..., 32:].all()
    rows = np.arange(down.shape[1]) != BIAS_CHANNEL
    assert not down[:, BIAS_CHANNEL, :].any() and down[:, rows, :].all()

    with Engine.load(path, n_ctx=128, n_threads=2) as engine:
        prompt = engine.tokenize("The quick brown fox")
        engine.eval(prompt)
        logits = engine.logits()
        assert np.isfinite(logits).all() and logits.std() > 0
        assert len(engine.greedy(prompt, 4)) == 4

    again = make_bench_model(tmp_path / "again.gguf", **SMALL)
    assert again.read_bytes() == path.read_bytes()
    cli = tmp_path / "cli.gguf"
    assert make_test_model_main(["-o", str(cli), "--bench-dims", "--layers", "4", "--embd", "256", "--experts", "32",
                                 "--used", "4", "--ff", "256"]) == 0
    assert cli.read_bytes() == path.read_bytes()
    other = make_bench_model(tmp_path / "other.gguf", **SMALL, seed=1)
    assert other.stat().st_size == path.stat().st_size and other.read_bytes() != path.read_bytes()


def host_experts_budget(path) -> int:
    """A budget on the RPC device that holds 1.9 blocks of experts beyond the rest: one block
    resident, and room for an "auto" expert cache in what it leaves."""
    figures = ModelFigures.from_inventory(read_inventory(path))
    rpc = Accelerator("RPC0", "RPC0", None, None, streams_host_ops=False, runtime_reserve=0)
    minimum = make_plan(figures, rpc, 2**40, ctx=256, n_batch=512).minimum_budget
    return minimum + 19 * figures.expert_bytes(0) // 10


def test_every_variant_in_its_own_process_on_the_rpc_device(tmp_path, rpc_endpoint):
    model = make_bench_model(tmp_path / "bench.gguf", **SMALL)
    budget = host_experts_budget(model)
    out = tmp_path / "out"
    result = subprocess.run([*BENCH, str(model), "--rpc", rpc_endpoint, "--vram", f"{budget}B", *QUICK,
                             "--split", "8", "--upload", "8", "auto", "--out", str(out)], capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr
    runs = {name: json.loads((out / f"{name}.json").read_text())
            for name in ("cpu", "rotary", "split-8", "upload-8", "upload-auto")}

    cpu = runs["cpu"]
    assert cpu["status"] == "ok" and cpu["device"] == "RPC0" and cpu["cache_slots"] is None and cpu["hit_rate"] is None
    assert cpu["host_blocks"] > 0 and cpu["decode_tps"] > 0 and cpu["prompt_tps"] > 0
    assert 0 < cpu["peak_vram_bytes"] <= budget == cpu["budget_bytes"] and cpu["predicted_accelerator_bytes"] <= budget
    assert len(cpu["tokens"]) == 8
    assert cpu["predicted_decode_tps"] > 0 and cpu["predicted_prompt_tps"] > 0 and "RPC0" in cpu["speeds_source"]

    rotary = runs["rotary"]
    assert rotary["status"] == "skipped" and "rotary mode needs a CUDA GPU" in rotary["reason"]

    for name in ("split-8", "upload-8", "upload-auto"):
        cache = runs[name]
        assert cache["status"] == "ok" and cache["cache_disabled_reason"] is None, cache
        assert cache["cache_slots"] and cache["predicted_accelerator"]["expert_cache"] > 0
        assert 0 < cache["hit_rate"] < 1 and cache["decode_tps"] > 0
        assert cache["predicted_accelerator_bytes"] <= budget
        assert cache["tokens"] == cpu["tokens"]  # the same greedy output
        assert cache["predicted_decode_tps"] > 0 and cache["predicted_prompt_tps"] > 0
    assert runs["upload-8"]["cache_uploaded_bytes"] > 0  # every miss is uploaded
    assert runs["split-8"]["cache_slots"] == runs["upload-8"]["cache_slots"] == 8

    table = (out / "table.md").read_text()
    assert result.stdout == table
    assert "| cpu | " in table and " 1.00x " in table and "| rotary | skipped |" in table
    assert "| split-8 | " in table and f"| upload-auto ({runs['upload-auto']['cache_slots']} slots) | " in table
    assert "- rotary skipped: rotary mode needs a CUDA GPU" in table
    error = cpu["decode_tps"] / cpu["predicted_decode_tps"] - 1
    assert f"| cpu | {cpu['decode_tps']:.1f} | {cpu['predicted_decode_tps']:.1f} ({error:+.0%}) | 1.00x | " in table
    assert "- predicted t/s: the speed model (calibrated: " in table


def test_a_failing_variant_is_recorded_and_the_rest_go_on(tmp_path, test_model):
    out = tmp_path / "out"
    result = subprocess.run([*BENCH, str(test_model(arch="qwen35moe")), *QUICK, "--split", "8", "--upload", "--timeout", "0.01",
                             "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    for name in ("cpu", "rotary", "split-8"):
        record = json.loads((out / f"{name}.json").read_text())
        assert record["status"] == "error" and "ran past --timeout" in record["reason"]
        assert f"| {name} | error |" in result.stdout


def test_bad_settings_are_one_line_errors(tmp_path, capsys):
    model = str(tmp_path / "any.gguf")
    assert bench_gpu.main([model, "--split", "off"]) == 2
    assert bench_gpu.main([model, "--vram", "lots"]) == 2
    assert bench_gpu.main([model, "--ctx", "64", "--prompt-tokens", "60", "--gen-tokens", "8"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 3 and all(line.startswith("error: ") for line in errors)
    assert "'off'" in errors[0] and "bad size" in errors[1] and "--ctx 64" in errors[2]
