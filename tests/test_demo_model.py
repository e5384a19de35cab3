"""The built-in demo model: the shipped file is what the README says, runs in llama.cpp and
writes English-like text; its tokenizer round-trips; the training script works end to end."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rotary_gguf.demo import DEMO_MODEL, resolve_model
from rotary_gguf.engine import Engine
from rotary_gguf.inventory import read_inventory

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "tools" / "train_demo_model.py"
DEMO_QWEN35MOE = REPO / "rotary_gguf" / "data" / "demo-qwen35moe.gguf"


def readme_figures(heading: str = "The built-in demo model") -> dict[str, str]:
    """The rows of the two-column table in the README's section `heading`."""
    text = (REPO / "README.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return {m[1].strip(): m[2].strip() for m in re.finditer(r"^\| ([^|]+) \| ([^|]+) \|$", section, re.M)}


@pytest.fixture(scope="module")
def demo_engine():
    with Engine.load(DEMO_MODEL, n_ctx=256, n_threads=2) as engine:
        yield engine


def test_commands_default_to_the_shipped_model():
    assert resolve_model(None) == DEMO_MODEL
    assert DEMO_MODEL.is_file()
    assert DEMO_MODEL.stat().st_size <= 20 * 1024 * 1024
    other = Path("other.gguf")
    assert resolve_model(other) == other


def test_metadata_matches_the_readme():
    inv = read_inventory(DEMO_MODEL)
    figures = readme_figures()
    assert figures["architecture"] == f"`{inv.arch}`" == "`qwen3moe`"
    assert figures["blocks"] == str(inv.n_layer)
    assert figures["routed experts"] == f"{inv.n_expert} per block, {inv.n_expert_used} used per token"
    assert figures["embedding width"] == str(inv.n_embd)
    assert figures["expert FFN width"] == str(inv.n_ff_exp)
    assert figures["weights"] == "Q8_0"
    assert {t.type_name for t in inv.tensors if ".ffn_up_exps." in t.name} == {"Q8_0"}


def test_qwen35moe_demo_matches_the_readme_and_its_head_drafts():
    inv = read_inventory(DEMO_QWEN35MOE)
    figures = readme_figures("The qwen35moe demo model")
    assert DEMO_QWEN35MOE.stat().st_size <= 25 * 1000 * 1000
    assert figures["architecture"] == f"`{inv.arch}`" == "`qwen35moe`"
    assert figures["blocks"] == f"{inv.n_layer - 1} + 1 MTP block"
    assert figures["routed experts"] == f"{inv.n_expert} per block, {inv.n_expert_used} used per token"
    assert figures["embedding width"] == str(inv.n_embd)
    assert figures["weights"] == "Q8_0"
    assert inv.hparam("nextn_predict_layers") == 1
    # the trained head's drafts are mostly accepted on ordinary text (a random head's almost never)
    prompt = "<|im_start|>user\nWhat does the len() function do?<|im_end|>\n<|im_start|>assistant\n"
    with Engine.load(DEMO_QWEN35MOE, n_ctx=256, n_threads=2, draft="mtp") as engine:
        events = list(engine.generate(engine.tokenize(prompt), max_tokens=48))
    stats = events[-1].stats
    assert stats.drafted_tokens > 0 and stats.draft_accepted >= 0.3 * stats.drafted_tokens, stats


def test_generates_english_like_text(demo_engine):
    text = "".join(e.text for e in demo_engine.generate(demo_engine.tokenize("The expert said"), max_tokens=24))
    assert text.strip()
    # a trained model writes words; random weights give a soup of byte fragments and symbols
    words = re.findall(r"[A-Za-z]+", text)
    assert sum(map(len, words)) >= 0.6 * len(text.replace(" ", "")), text
    assert len(words) >= 5, text


def test_chat_answer_ends_with_end_of_turn(demo_engine):
    prompt = "<|im_start|>user\nWhat does the len() function do?<|im_end|>\n<|im_start|>assistant\n"
    events = list(demo_engine.generate(demo_engine.tokenize(prompt), max_tokens=200))
    assert "".join(e.text for e in events).strip()
    assert events[-1].stats.finish_reason == "stop"


@pytest.mark.parametrize(
    "text",
    [
        "The \"if\" statement is used for conditional execution.",
        "def f(x):\n    return x ** 2  # square\n\n\n",
        "It's 2024; numbers like 3.14159 and 1e-6 split digit by digit.",
        "Unicode: naïve café, “quotes” — and 日本語 text.\ttab  double  space ",
        "   leading spaces\r\nand CRLF\n",
    ],
)
def test_tokenizer_round_trips(demo_engine, text):
    tokens = demo_engine.tokenize(text, add_special=False)
    assert demo_engine.detokenize(tokens) == text
    assert len(tokens) < len(text.encode())  # real merges, not one token per byte


def test_special_tokens_are_single_tokens(demo_engine):
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert len(demo_engine.tokenize(special, add_special=False)) == 1


def _train(out: Path, work: Path, *extra: str) -> dict:
    args = [
        sys.executable, str(TRAIN_SCRIPT), "-o", str(out), "--work-dir", str(work),
        "--steps", "6", "--layers", "2", "--embd", "32", "--head-dim", "16", "--heads", "2",
        "--kv-heads", "1", "--experts", "4", "--used", "2", "--ff", "32", "--vocab", "400",
        "--seq-len", "32", "--batch", "4", "--warmup", "2", "--text-limit", "20000",
        "--eval-every", "3", "--checkpoint-every", "3", *extra,
    ]  # later options override earlier ones
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return json.loads((work / "report.json").read_text())


def test_tiny_training_run_exports_a_model_llama_cpp_runs(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "tiny.gguf"
    report = _train(out, tmp_path / "run", "--quant", "f16")

    # llama.cpp computes what the trainer computes, and tokenizes as the trainer does
    assert report["logits_f32"]["max_abs_diff"] < 1e-3, report["logits_f32"]
    assert report["logits_f32"]["argmax_agreement"] == 1.0
    assert report["logits_output"]["max_abs_diff"] < 1e-2, report["logits_output"]
    assert report["tokenizer"]["documents"] > 0 and report["tokenizer"]["mismatched"] == 0

    inv = read_inventory(out)
    assert (inv.arch, inv.n_layer, inv.n_expert, inv.n_expert_used, inv.n_embd) == ("qwen3moe", 2, 4, 2, 32)
    with Engine.load(out, n_ctx=32, n_threads=1) as engine:
        assert engine.n_vocab == 400
        assert len(engine.greedy(engine.tokenize("The"), 4)) > 0


def test_tiny_qwen35moe_with_an_mtp_head_computes_what_llama_cpp_computes(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "tiny35.gguf"
    # 80 tokens: the DeltaNet's chunked training form crosses a chunk boundary (64) in the check;
    # a high learning rate gives logits far enough from zero for the comparison to mean something
    report = _train(out, tmp_path / "run35", "--arch", "qwen35moe", "--layers", "4", "--seq-len", "80",
                    "--steps", "12", "--lr", "0.01", "--quant", "f32", "--eval-every", "0")

    for key in ("logits_f32", "mtp_logits_f32"):  # the trunk, then the MTP head through the drafter
        check = report[key]
        assert check["tokens"] == 80 and check["logit_range"] > 1.0, check
        assert check["max_abs_diff"] < 1e-3 * check["logit_range"], check
        assert check["argmax_agreement"] == 1.0, check
    # the engine drafts with the trained head and the greedy text is the one without drafts
    accept = report["mtp_acceptance"]
    assert accept["drafted"] > 0 and accept["same_as_without_drafts"], accept

    inv = read_inventory(out)
    assert (inv.arch, inv.n_layer, inv.hparam("nextn_predict_layers")) == ("qwen35moe", 5, 1)


@pytest.mark.parametrize("arch", [("--arch", "qwen3moe"), ("--arch", "qwen35moe", "--layers", "4")],
                         ids=["qwen3moe", "qwen35moe"])
def test_training_is_seeded(tmp_path, arch):
    pytest.importorskip("torch")
    first = _train(tmp_path / "a.gguf", tmp_path / "a", *arch, "--quant", "f32", "--no-report")
    second = _train(tmp_path / "b.gguf", tmp_path / "b", *arch, "--quant", "f32", "--no-report")
    assert first["file_sha256"] == second["file_sha256"]
