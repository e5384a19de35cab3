#!/usr/bin/env python3
"""Train the built-in demo model: a small qwen3moe Mixture-of-Experts language model, on CPU; or
with ``--arch qwen35moe`` the target's architecture (Gated DeltaNet and full-attention blocks, a
shared expert) with a trained multi-token-prediction head (``demo_training/qwen35moe.py``).

Text: the English documentation that ships with CPython (``pydoc_data.topics``, the language
reference behind ``help()``) and the prose paragraphs of the standard library's docstrings, both
under the Python Software Foundation License. Every machine with Python has them, so the run needs
no download. About 5% of the documents (picked by the seed) are held out for perplexity.

Steps: byte-level BPE tokenizer trained on the text (GPT-2 byte mapping, llama.cpp's "qwen2"
pre-tokenizer split) -> the model (torch, the same forward as llama.cpp's qwen3moe graph) ->
GGUF export -> a report: held-out perplexity vs a unigram baseline, llama.cpp vs torch logits,
samples, routing skew (qwen35moe: also the MTP head's logits and its drafts' acceptance through
the engine's ``--draft mtp``). Training saves a checkpoint in ``--work-dir`` every ``--checkpoint-every``
steps and resumes from it when run again with the same settings; equal settings and seed give
the same model.

Needs torch (``pip install -e .[train]``); the rotary_gguf package itself never imports it.

Usage::

    python tools/train_demo_model.py                        # the shipped model (about 35 minutes)
    python tools/train_demo_model.py --arch qwen35moe --steps 600   # its qwen35moe sibling
    python tools/train_demo_model.py --steps 3 --embd 32 --layers 1 --experts 4 --used 2 \\
        --ff 32 --vocab 300 --text-limit 20000 -o tiny.gguf --work-dir tiny-run
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import platform
import sys
import time

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO))

from demo_training.corpus import format_document, load_documents, split_documents  # noqa: E402
from demo_training.export import QUANTS, write_gguf  # noqa: E402
from demo_training.qwen3moe import DemoMoE  # noqa: E402
from demo_training.qwen35moe import Qwen35MoE, mtp_acceptance, mtp_heldout, mtp_logit_check  # noqa: E402
from demo_training.report import (  # noqa: E402
    logit_check,
    next_token_reuse,
    routing_skew,
    samples,
    sha256_file,
    tokenizer_agreement,
    unigram_nll,
)
from demo_training.settings import Settings  # noqa: E402
from demo_training.tokenizer import build_tokenizer, encode_stream  # noqa: E402
from demo_training.training import heldout_nll, train  # noqa: E402

DEFAULT_OUTPUTS = {"qwen3moe": REPO / "rotary_gguf" / "data" / "demo-moe.gguf",
                   "qwen35moe": REPO / "rotary_gguf" / "data" / "demo-qwen35moe.gguf"}
DEFAULT_WORK_DIRS = {"qwen3moe": REPO / "build" / "demo-model", "qwen35moe": REPO / "build" / "demo-qwen35moe"}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Train the built-in demo MoE model on CPU and export it as GGUF.")
    d = Settings()
    ap.add_argument("-o", "--output", type=pathlib.Path, help="output .gguf (default: the shipped file of --arch)")
    ap.add_argument("--work-dir", type=pathlib.Path,
                    help="checkpoints, tokenizer, F32 copy and report.json (default: build/ per --arch)")
    ap.add_argument("--quant", choices=QUANTS, default="q8_0", help="weight type of the output file")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    ap.add_argument("--eval-every", type=int, default=250, help="steps between held-out evaluations (0: never)")
    ap.add_argument("--no-report", action="store_true", help="skip samples, routing and logit checks")
    for f in dataclasses.fields(Settings):
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(d, f.name)), default=getattr(d, f.name),
                        choices=tuple(DEFAULT_OUTPUTS) if f.name == "arch" else None)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    s = Settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)})
    torch.set_num_threads(args.threads)
    if s.arch == "qwen35moe" and s.layers < 4:
        raise SystemExit("error: --arch qwen35moe needs --layers 4 or more (block 3 is its first full-attention block)")
    torch.manual_seed(s.seed)
    args.output = args.output or DEFAULT_OUTPUTS[s.arch]
    work_dir = args.work_dir or DEFAULT_WORK_DIRS[s.arch]
    work_dir.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    docs = load_documents(s.text_limit)
    corpus_sha = hashlib.sha256("\0".join(d.text for d in docs).encode()).hexdigest()
    train_docs, held_docs = split_documents(docs, s.holdout, s.seed)
    tok = build_tokenizer(train_docs, s, work_dir, corpus_sha)
    train_stream, held_stream = encode_stream(tok, train_docs), encode_stream(tok, held_docs)
    print(f"text: {len(docs)} documents, {sum(len(d.text) for d in docs)} characters; "
          f"{len(train_stream)} training and {len(held_stream)} held-out tokens; "
          f"vocabulary {len(tok)} ({time.perf_counter() - t0:.0f} s)", flush=True)

    model = Qwen35MoE(s) if s.arch == "qwen35moe" else DemoMoE(s)
    n_params = sum(p.numel() for p in model.parameters())
    n_moe_blocks = s.layers + (s.arch == "qwen35moe")  # and the MTP head's
    n_active = n_params - n_moe_blocks * 3 * (s.experts - s.used) * s.ff * s.embd
    print(f"model: {n_params / 1e6:.2f} M parameters, {n_active / 1e6:.2f} M active per token", flush=True)
    report: dict = {"settings": dataclasses.asdict(s), "parameters": n_params, "active_parameters": n_active,
                    "documents": len(docs), "train_tokens": len(train_stream), "heldout_tokens": len(held_stream),
                    "python": platform.python_version(), "corpus_sha256": corpus_sha}
    report |= train(model, train_stream, held_stream, s, work_dir, args.checkpoint_every, args.eval_every)
    epochs = s.steps * s.batch * s.seq_len / len(train_stream)
    report["epochs"] = round(epochs, 2)

    nll = heldout_nll(model, held_stream, s.seq_len)
    uni = unigram_nll(train_stream, held_stream, s.vocab)
    report["heldout_perplexity"] = round(math.exp(nll), 2)
    report["unigram_perplexity"] = round(math.exp(uni), 2)
    print(f"held-out perplexity {math.exp(nll):.2f}; unigram baseline {math.exp(uni):.2f}", flush=True)
    if s.arch == "qwen35moe":
        report["mtp_heldout"] = mtp_heldout(model, held_stream, s.seq_len)
        print(f"MTP head: {report['mtp_heldout']}", flush=True)

    description = (f"Demo MoE trained by rotary-gguf's tools/train_demo_model.py on CPython's documentation "
                   f"(pydoc_data topics and stdlib docstrings, PSF License; Python {report['python']}), "
                   f"{s.steps} steps, seed {s.seed}; held-out perplexity {math.exp(nll):.1f} "
                   f"(unigram {math.exp(uni):.1f}).")
    meta = {"description": description, "corpus_sha256": corpus_sha}
    f32_path = work_dir / f"{args.output.stem}-f32.gguf"
    write_gguf(f32_path, model, tok, "f32", meta)
    if args.quant != "f32":
        write_gguf(args.output, model, tok, args.quant, meta)
    else:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        os.replace(f32_path, args.output)
        f32_path = args.output
    report["file_bytes"] = args.output.stat().st_size
    report["file_sha256"] = sha256_file(args.output)
    print(f"wrote {args.output} ({report['file_bytes'] / 1e6:.1f} MB, {args.quant}) sha256 {report['file_sha256']}")

    if not args.no_report:
        check_tokens = held_stream[: min(128, s.seq_len)].tolist()
        report["logits_f32"] = logit_check(f32_path, model, check_tokens)
        report["logits_output"] = logit_check(args.output, model, check_tokens)
        if s.arch == "qwen35moe":
            report["mtp_logits_f32"] = mtp_logit_check(f32_path, model, check_tokens)
            report["mtp_logits_output"] = mtp_logit_check(args.output, model, check_tokens)
            prompts = [tok.encode(format_document(d))[:32] for d in held_docs[:8]]
            report["mtp_acceptance"] = mtp_acceptance(args.output, prompts, 64)
        report["tokenizer"] = tokenizer_agreement(args.output, tok, [format_document(d) for d in held_docs])
        report["routing"] = routing_skew(args.output, held_stream, s.seq_len)
        for entry, reuse in zip(report["routing"], next_token_reuse(model, held_stream, s.seq_len)):
            entry |= {"next_token_reuse": reuse, "reuse_by_chance": round(s.used / s.experts, 3)}
        prompts = ["The return value", "A list is", "In Python, a function", "The following example"]
        report["samples"] = samples(args.output, prompts, 48, s.seed)
    (work_dir / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "settings"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
