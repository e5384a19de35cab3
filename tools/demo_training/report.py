"""The report's checks: a unigram baseline, routing skew and burstiness, llama.cpp's logits against
torch's, samples, llama.cpp's tokenization against the trainer's, and the output file's hash."""

from __future__ import annotations

import hashlib
import math
import pathlib

import numpy as np
import torch

from .corpus import IM_END, IM_START
from .qwen3moe import DemoMoE
from .tokenizer import Tokenizer


def unigram_nll(train_stream: np.ndarray, held_stream: np.ndarray, vocab: int) -> float:
    """Held-out NLL of add-one-smoothed token frequencies of the training stream."""
    counts = np.bincount(train_stream, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[held_stream[1:]].mean())


def routing_skew(path: pathlib.Path, stream: np.ndarray, seq_len: int) -> list[dict]:
    """Per block, over the held-out text as llama.cpp runs the file (the project's routing
    telemetry): entropy of the expert-selection distribution (bits), the share of selections taken
    by the busiest 10% of experts, and the experts never selected."""
    from rotary_gguf.engine import Engine
    from rotary_gguf.telemetry import RoutingTelemetry

    telemetry = RoutingTelemetry.for_model(path)
    with Engine.load(path, n_ctx=seq_len, n_batch=seq_len, n_threads=1, telemetry=telemetry,
                     all_outputs=True) as engine:
        engine.output_every_token = True  # else the last block routes only the last token
        for start in range(0, len(stream) - seq_len + 1, seq_len):
            engine.reset()
            engine.eval(stream[start : start + seq_len].tolist())
    counts = telemetry.counts()
    top = max(1, round(0.1 * telemetry.n_expert))
    out = []
    for layer in telemetry.layers:
        c = counts[layer]
        p = c[c > 0] / c.sum()
        out.append({
            "layer": int(layer),
            "entropy_bits": round(float(-(p * np.log2(p)).sum()), 2),
            "max_entropy_bits": round(math.log2(telemetry.n_expert), 2),
            "top10pct_share": round(float(np.sort(c)[::-1][:top].sum() / c.sum()), 3),
            "top10pct_uniform_share": round(top / telemetry.n_expert, 3),
            "unused_experts": int((c == 0).sum()),
        })
    return out


@torch.no_grad()
def next_token_reuse(model: DemoMoE, stream: np.ndarray, seq_len: int) -> list[float]:
    """Per block, over the held-out text (torch forward): how often an expert chosen for one token
    is chosen again for the next (burstiness; by chance it would be used/experts)."""
    s = model.s
    hits, total = np.zeros(s.layers), np.zeros(s.layers)
    for start in range(0, len(stream) - seq_len + 1, seq_len):
        _, _, chosen = model(torch.from_numpy(stream[start : start + seq_len].astype(np.int64))[None])
        for layer, c in enumerate(chosen):
            sel = np.zeros((seq_len, s.experts), dtype=bool)
            np.put_along_axis(sel, c[0].numpy(), True, axis=1)
            hits[layer] += (sel[1:] & sel[:-1]).sum()
            total[layer] += sel[:-1].sum()
    return [round(float(h / t), 3) for h, t in zip(hits, total)]


@torch.no_grad()
def logit_check(path: pathlib.Path, model: DemoMoE, tokens: list[int]) -> dict:
    """llama.cpp's logits for each position (one decode per token) against the torch forward."""
    from rotary_gguf.engine import Engine

    ref = model(torch.tensor([tokens]))[0][0].numpy()
    with Engine.load(path, n_ctx=len(tokens), n_threads=1) as engine:  # within the model's trained context
        got = []
        for t in tokens:
            engine.eval([t])
            got.append(engine.logits())
    got = np.stack(got)
    diff = np.abs(got - ref)
    return {
        "tokens": len(tokens),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "logit_range": float(np.abs(ref).max()),
        "argmax_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean()),
    }


def samples(path: pathlib.Path, prompts: list[str], n_tokens: int, seed: int) -> list[dict]:
    """Greedy and sampled continuations from llama.cpp, plus one chat answer."""
    from rotary_gguf.engine import Engine, SamplingParams

    out = []
    with Engine.load(path, n_threads=1) as engine:  # the model's own context
        def run(prompt: str, sampling: SamplingParams) -> str:
            events = engine.generate(engine.tokenize(prompt), max_tokens=n_tokens, sampling=sampling)
            return "".join(e.text for e in events)

        greedy = SamplingParams(repeat_penalty=1.1)
        sampled = SamplingParams(temperature=0.8, top_p=0.95, repeat_penalty=1.1, seed=seed)
        for prompt in prompts:
            out.append({"prompt": prompt, "greedy": run(prompt, greedy), "sampled": run(prompt, sampled)})
        chat = f"{IM_START}user\nWhat does a for loop do?{IM_END}\n{IM_START}assistant\n"
        out.append({"prompt": chat, "greedy": run(chat, greedy), "sampled": run(chat, sampled)})
    return out


def tokenizer_agreement(path: pathlib.Path, tok: Tokenizer, texts: list[str]) -> dict:
    """Does llama.cpp tokenize the held-out documents exactly as the trainer does?"""
    from rotary_gguf.engine import Engine

    with Engine.load(path, n_ctx=16, n_threads=1) as engine:  # tokenizing only: the least context
        mismatched = [i for i, t in enumerate(texts) if engine.tokenize(t, add_special=False) != tok.encode(t)]
    return {"documents": len(texts), "mismatched": len(mismatched)}


def sha256_file(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
