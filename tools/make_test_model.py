#!/usr/bin/env python3
"""Generate small synthetic Mixture-of-Experts GGUF models for tests.

The files load and run in llama.cpp (llama-cpp-python 0.3.36) on CPU in well
under a second. Three architectures are supported:

* ``qwen3moe``  - Qwen3-30B-A3B style: every block is full attention + routed
  experts (no shared expert).
* ``qwen35moe`` - Qwen3.5/3.6-35B-A3B style hybrid: block ``i`` is full
  (gated) attention when ``(i + 1) % 4 == 0`` and Gated DeltaNet otherwise;
  every block has routed experts plus a sigmoid-gated shared expert.
* ``qwen3``     - a small *dense* model (no experts at all), useful for testing
  "not a MoE model" error paths. ``--ff`` is its dense FFN size there.

Weights are drawn from ``numpy.random.default_rng`` seeded by ``--seed`` and the
tensor name, so equal arguments give byte-identical files (also for the
quantized types, which are produced by llama.cpp's own quantizer).

Routing skew (``--router-skew S``): channel 0 of the residual stream is a
constant "bias" channel: every token embedding holds ``BIAS_VALUE`` there, no
layer writes to it and only the routers read it. The router rows of a few hot
experts per layer (``hot_experts()``: ``2*used`` of them, at most half the
experts, different per layer, chosen from the seed) get ``S * ROUTER_SKEW_GAIN``
on that channel; all other router weights on it are zero. ``S = 0`` gives
near-uniform routing; with the defaults the hot experts take about 80-87% of
the selections at ``S = 1`` and about 99% at ``S = 2``.

Defaults: 4 layers, 32 experts, 4 used, ``embd`` 64 and ``ff`` 32 (about 3.5 MB
in f32, ~1 MB in q8_0). K-quants need rows that are a multiple of 256, so with
``--quant q4_k_m`` the defaults become ``embd`` 256 and ``ff`` 256 (~16 MB,
~2 s to generate) so that all expert tensors really are K-quants (Q4_K, and
Q6_K for some ffn_down_exps as llama.cpp's Q4_K_M mix does). For other sizes
llama.cpp falls back to a legacy type (Q5_0/Q5_1/Q8_0) for tensors whose row
size does not fit: ``embd``/``ff`` must be multiples of 32 for q8_0 and of 256
for K-quants to be used everywhere.

Constraints from llama.cpp: ``qwen35moe`` needs ``layers >= 4`` (a hybrid model
without any full-attention block aborts), and ``--fused-gate-up`` only works
for ``qwen35moe`` (the qwen3moe loader only reads separate gate/up tensors).
Control tokens get all-zero output rows so greedy decoding never picks them
(generation runs to ``max_tokens`` instead of stopping at ``<|im_end|>``).

Multi-token prediction (``--mtp``, ``qwen35moe``): one more block ``blk.<layers>``, a full
attention + MoE block with the ``nextn.*`` tensors, counted in ``block_count`` and named by
``qwen35moe.nextn_predict_layers``, as Qwen3.5/3.6 GGUFs carry it.

Benchmark models (``make_bench_model``, ``--bench-dims``): a ``qwen35moe``
with Qwen3.5/3.6-35B-A3B's expert widths (``embd`` 2048, 256 experts, top-8,
expert FFN 512) whose experts are random but valid Q4_K blocks written straight
into the file (no f32 copy, no quantizer), ~0.5 GB per block; the rest is f16.

Usage::

    python tools/make_test_model.py -o tiny.gguf --arch qwen35moe \\
        --quant q8_0 --router-skew 1.5 --seed 3
    python tools/make_test_model.py -o bench.gguf --bench-dims --layers 16
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys
import tempfile
import zlib
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import numpy as np

import gguf

__all__ = [
    "ARCHS",
    "QUANTS",
    "MTP_KINDS",
    "BIAS_CHANNEL",
    "BIAS_VALUE",
    "ROUTER_SKEW_GAIN",
    "make_model",
    "make_bench_model",
    "hot_experts",
    "simulated_profile",
    "model_dims",
    "build_tokenizer",
    "CHAT_TEMPLATE",
    "CHAT_TEMPLATES",
    "chat_template_text",
    "main",
]

ARCHS = ("qwen3moe", "qwen35moe", "qwen3")
QUANTS = ("f32", "f16", "q8_0", "q4_k_m")
# Multi-token-prediction blocks: "random" weights (its drafts are mostly rejected), or "mirror":
# the block passes the token's embedding straight to the LM head, so it drafts what the trunk
# would predict from that token alone, which the model often agrees with.
MTP_KINDS = ("random", "mirror")

DEFAULT_LAYERS = 4
DEFAULT_EXPERTS = 32
DEFAULT_USED = 4
DEFAULT_EMBD = 64
DEFAULT_FF = 32
# K-quants (Q4_K/Q6_K) work on 256-wide blocks along a row.
DEFAULT_EMBD_KQUANT = 256
DEFAULT_FF_KQUANT = 256

CONTEXT_LENGTH = 4096
RMS_EPS = 1e-6

# residual-stream channel that carries a constant, used to skew routing
BIAS_CHANNEL = 0
BIAS_VALUE = 4.0
# router logit boost per unit of --router-skew and per unit of the
# (normalised) bias channel
ROUTER_SKEW_GAIN = 0.5
# random attention mostly averages values over the context, which adds a
# component common to all tokens; keeping it small keeps routing token-specific
ATTN_OUT_GAIN = 0.5

# llama.cpp's llama_ftype values
_FTYPE_ALL_F32 = 0
_FTYPE_MOSTLY_F16 = 1
_FTYPE_MOSTLY_Q8_0 = 7
_FTYPE_MOSTLY_Q4_K_S = 14
_FTYPE_MOSTLY_Q4_K_M = 15

# number of threads given to llama.cpp's quantizer (the result does not depend
# on it, but a fixed value keeps runs identical in every respect)
_QUANT_THREADS = 4

# GGUF token types
_TOKEN_NORMAL = 1
_TOKEN_CONTROL = 3

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

# Chat templates a test model can carry (``chat_template=``): "chatml" is the plain one above;
# "qwen3.5" (tool calls as <tool_call><function=..><parameter=..>, thinking opened by the
# generation prompt, enable_thinking) and "qwen3" (JSON tool calls in <tool_call>, thinking the
# model opens itself) are the model family's own templates, kept as data next to this file.
_TEMPLATE_DIR = pathlib.Path(__file__).with_name("chat_templates")
CHAT_TEMPLATES = ("chatml", "qwen3.5", "qwen3")


def chat_template_text(name: str) -> str:
    """The text of the chat template called ``name`` (one of ``CHAT_TEMPLATES``)."""
    if name not in CHAT_TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; expected one of {CHAT_TEMPLATES}")
    return CHAT_TEMPLATE if name == "chatml" else (_TEMPLATE_DIR / f"{name}.jinja").read_text()

# A few dozen byte-level BPE merges of common English pairs, in GPT-2's
# byte-to-unicode spelling ("Ġ" is a space, "Ċ" a newline). Merge order is rank.
_MERGES = (
    "Ġ t", "Ġ a", "h e", "i n", "r e", "o n", "Ġt he", "e r", "Ġ s", "a t",
    "Ġ w", "Ġ o", "e n", "Ġ c", "i t", "i s", "a n", "o r", "e s", "Ġ b",
    "e d", "Ġ f", "in g", "Ġ p", "o u", "Ġa n", "a l", "a r", "Ġt o", "Ġ m",
    "Ġo f", "Ġ in", "Ġ d", "Ġ h", "Ġan d", "i c", "a s", "l e", "Ġt h", "i on",
    "o m", "l l", "en t", "Ġ n", "Ġ l", "s t", "Ġ re", "v e", "Ġ e", "r o",
    "l y", "Ġb e", "Ġ g", "Ġ T", "c t", "Ġ S", "i d", "o t", "Ġ I", "u t",
    "e t", "Ġ A", "Ġ is", "Ġo n", "Ġ y", "Ġy ou", "Ġw h", "Ġh e", "Ġ H", "Ġw it",
    "Ġwit h", "Ġth at", "Ġf or", "Ġ Ġ", "Ċ Ċ", "e l", "l o",
)


# ---------------------------------------------------------------------------
# tokenizer


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character mapping."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping: Dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def build_tokenizer() -> Dict[str, object]:
    """Build the vocabulary: 256 byte symbols (id == byte value), merged
    tokens, then the special tokens. Returns a dict with ``tokens``,
    ``types``, ``merges`` and the ids of the special tokens."""
    byte_map = _bytes_to_unicode()
    tokens: List[str] = [byte_map[b] for b in range(256)]
    seen = set(tokens)
    merges: List[str] = []
    for merge in _MERGES:
        left, right = merge.split(" ")
        if left not in seen or right not in seen:
            raise AssertionError(f"merge {merge!r} uses an unknown token")
        if merge in merges:
            raise AssertionError(f"duplicate merge {merge!r}")
        merges.append(merge)
        merged = left + right
        if merged not in seen:
            seen.add(merged)
            tokens.append(merged)
    types = [_TOKEN_NORMAL] * len(tokens)
    ids = {}
    for special in SPECIAL_TOKENS:
        ids[special] = len(tokens)
        tokens.append(special)
        types.append(_TOKEN_CONTROL)
    return {
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "bos_id": ids["<|endoftext|>"],
        "eos_id": ids["<|im_end|>"],
        "pad_id": ids["<|endoftext|>"],
        "im_start_id": ids["<|im_start|>"],
        "control_ids": [ids[s] for s in SPECIAL_TOKENS],
    }


# ---------------------------------------------------------------------------
# dimensions


def _rope_sections(n_pairs: int) -> List[int]:
    """Split ``n_pairs`` rotary pairs over (t, h, w) like Qwen3.5's [11,11,10]."""
    base, rem = divmod(n_pairs, 3)
    secs = [base + (1 if i < rem else 0) for i in range(3)]
    return secs + [0]


def model_dims(
    *,
    arch: str = "qwen3moe",
    layers: int = DEFAULT_LAYERS,
    experts: int = DEFAULT_EXPERTS,
    used: int = DEFAULT_USED,
    embd: int = DEFAULT_EMBD,
    ff: int = DEFAULT_FF,
) -> Dict[str, object]:
    """All derived hyper-parameters of a generated model."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    if layers < 1:
        raise ValueError("layers must be >= 1")
    if embd < 16 or embd % 8:
        raise ValueError("embd must be a multiple of 8 and >= 16")
    if ff < 1:
        raise ValueError("ff must be >= 1")
    moe = arch != "qwen3"
    if moe:
        if experts < 2 or experts > 512:
            raise ValueError("experts must be in [2, 512]")
        if used < 1 or used > experts:
            raise ValueError("used must be in [1, experts]")

    d: Dict[str, object] = {
        "arch": arch,
        "moe": moe,
        "layers": layers,
        "embd": embd,
        "ff": ff,
        "experts": experts if moe else 0,
        "used": used if moe else 0,
        "n_head": 4,
        "n_head_kv": 2,
    }
    if arch == "qwen35moe" and layers < 4:
        # llama.cpp aborts (GGML_ASSERT(buffer) in ggml-backend) when a hybrid
        # model has no full-attention block, i.e. an empty KV cache
        raise ValueError("qwen35moe needs layers >= 4 (block 3 is the first full-attention block)")
    if arch == "qwen35moe":
        # real: n_embd 2048, head_dim 256, rope dims 64 (partial 0.25),
        # sections [11, 11, 10, 0], linear attn: 16 k-heads, 32 v-heads, dim 128
        head_dim = max(16, embd // 2)
        n_rot = max(4, head_dim // 4)
        d.update(
            head_dim=head_dim,
            n_rot=n_rot,
            rope_sections=_rope_sections(n_rot // 2),
            rope_base=1e7,
            full_attention_interval=4,
            ff_shexp=ff,
            ssm_d_state=max(8, head_dim // 2),
            ssm_n_group=2,
            ssm_dt_rank=4,
            ssm_d_conv=4,
        )
        d["ssm_d_inner"] = d["ssm_d_state"] * d["ssm_dt_rank"]
        d["recurrent"] = [(i + 1) % 4 != 0 for i in range(layers)]
    else:
        # real Qwen3-30B-A3B: n_embd 2048, 32 heads, 4 kv heads, head_dim 128
        head_dim = max(16, embd // 4)
        d.update(head_dim=head_dim, n_rot=head_dim, rope_base=1e6)
        d["recurrent"] = [False] * layers
    return d


def hot_experts(
    layers: int = DEFAULT_LAYERS,
    experts: int = DEFAULT_EXPERTS,
    used: int = DEFAULT_USED,
    seed: int = 0,
) -> List[List[int]]:
    """The experts that ``--router-skew`` favours, per layer (sorted ids).

    ``min(2*used, experts//2)`` experts per layer, chosen from the seed; the
    choice does not depend on the skew value."""
    n_hot = max(1, min(2 * used, experts // 2))
    out = []
    for il in range(layers):
        rng = np.random.default_rng([int(seed), zlib.crc32(f"blk.{il}.router_hot".encode())])
        out.append(sorted(int(x) for x in rng.permutation(experts)[:n_hot]))
    return out


# ---------------------------------------------------------------------------
# weights


def simulated_profile(inv, seed: int = 0, tokens: int = 400) -> dict:
    """A routing profile (the schema `profile` writes) of `tokens` simulated tokens routed with a
    skewed preference per block, with pair counts. `inv` is a rotary_gguf Inventory."""
    rng = np.random.default_rng(seed)
    n, used = inv.n_expert, inv.n_expert_used
    layers = []
    for i in range(inv.n_layer):
        p = rng.dirichlet(np.full(n, 0.3))
        counts, pairs = np.zeros(n, dtype=int), np.zeros((n, n), dtype=int)
        for _ in range(tokens):
            chosen = rng.choice(n, size=used, replace=False, p=p)
            counts[chosen] += 1
            pairs[np.ix_(chosen, chosen)] += 1
        np.fill_diagonal(pairs, 0)
        layers.append({"index": i, "counts": counts.tolist(), "coactivation": pairs.tolist()})
    model = {"arch": inv.arch, "n_expert": n, "n_expert_used": used, "file": inv.path.name, "bytes": inv.file_bytes}
    return {"model": model, "tokens": tokens, "layers": layers}


class _Weights:
    """Deterministic per-tensor random weights (depend on seed + name only)."""

    def __init__(self, seed: int) -> None:
        if seed < 0:
            raise ValueError("seed must be >= 0")
        self.seed = int(seed)

    def rng(self, name: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, zlib.crc32(name.encode())])

    def normal(self, name: str, shape: Sequence[int], std: float) -> np.ndarray:
        x = self.rng(name).standard_normal(tuple(shape), dtype=np.float32)
        return x * np.float32(std)

    def linear(self, name: str, n_out: int, n_in: int, gain: float = 1.0) -> np.ndarray:
        """numpy (n_out, n_in) == ggml ne {n_in, n_out}."""
        return self.normal(name, (n_out, n_in), gain / math.sqrt(n_in))

    def norm(self, name: str, n: int) -> np.ndarray:
        return np.float32(1.0) + self.normal(name, (n,), 0.02)

    def uniform(self, name: str, shape: Sequence[int], lo: float, hi: float) -> np.ndarray:
        return self.rng(name).uniform(lo, hi, size=tuple(shape)).astype(np.float32)


def _no_bias_write(w: np.ndarray) -> np.ndarray:
    """Zero the output row of the bias channel (numpy axis -2 is ggml ne[1])."""
    w[..., BIAS_CHANNEL, :] = 0.0
    return w


def _no_bias_read(w: np.ndarray) -> np.ndarray:
    """Zero the input column of the bias channel (numpy axis -1 is ggml ne[0]),
    so that only the router sees the constant."""
    w[..., BIAS_CHANNEL] = 0.0
    return w


def _tensors(d: Dict[str, object], n_vocab: int, control_ids: Sequence[int],
             seed: int, router_skew: float, fused_gate_up: bool,
             routed_experts: Callable[[str, float], Iterator[Tuple[str, object]]] | None = None,
             ) -> Iterator[Tuple[str, np.ndarray]]:
    """Every tensor in file order. ``routed_experts(prefix)``, when given, yields a block's routed
    expert tensors in place of the random f32 ones (``prefix`` is ``"blk.N."``; ``gain`` scales
    the experts' output)."""
    W = _Weights(seed)
    arch = d["arch"]
    E = int(d["embd"])
    F = int(d["ff"])
    NH, NKV, HD = int(d["n_head"]), int(d["n_head_kv"]), int(d["head_dim"])
    X = int(d["experts"])

    emb = W.normal("token_embd.weight", (n_vocab, E), 1.0)
    emb[:, BIAS_CHANNEL] = BIAS_VALUE
    yield "token_embd.weight", emb

    hot = hot_experts(int(d["layers"]), X, int(d["used"]), seed) if d["moe"] else None

    layers, mirror = int(d["layers"]), d.get("mtp") == "mirror"
    for il in range(layers + int(d.get("nextn", 0))):
        p = f"blk.{il}."
        nextn = il >= layers  # the MTP block: full attention + MoE, and the nextn tensors
        # how much the block writes into the residual stream (a mirror head: nothing)
        gain = (0.0 if mirror else 1.0) if nextn else float(d.get("trunk_gain", 1.0))
        yield p + "attn_norm.weight", W.norm(p + "attn_norm.weight", E)

        if not nextn and d["recurrent"][il]:
            # Gated DeltaNet (linear attention)
            ds, ng, nv, kc = (int(d["ssm_d_state"]), int(d["ssm_n_group"]),
                              int(d["ssm_dt_rank"]), int(d["ssm_d_conv"]))
            key_dim, value_dim = ds * ng, ds * nv
            conv_dim = 2 * key_dim + value_dim
            yield p + "attn_qkv.weight", _no_bias_read(W.linear(p + "attn_qkv.weight", conv_dim, E))
            yield p + "attn_gate.weight", _no_bias_read(W.linear(p + "attn_gate.weight", value_dim, E))
            yield p + "ssm_conv1d.weight", W.normal(p + "ssm_conv1d.weight", (conv_dim, kc), 1.0 / math.sqrt(kc))
            yield p + "ssm_dt.bias", np.float32(1.0) + W.normal(p + "ssm_dt.bias", (nv,), 0.1)
            # ssm_a = -exp(A_log) < 0 so that the decay exp(softplus(.) * a) is in (0, 1)
            yield p + "ssm_a", -W.uniform(p + "ssm_a", (nv,), 0.5, 8.0)
            yield p + "ssm_beta.weight", _no_bias_read(W.linear(p + "ssm_beta.weight", nv, E))
            yield p + "ssm_alpha.weight", _no_bias_read(W.linear(p + "ssm_alpha.weight", nv, E))
            yield p + "ssm_norm.weight", W.norm(p + "ssm_norm.weight", ds)
            yield p + "ssm_out.weight", _no_bias_write(W.linear(p + "ssm_out.weight", E, value_dim, gain))
        else:
            if arch == "qwen35moe":
                # query and output gate interleaved per head: [q_h, gate_h] x n_head
                q_out = 2 * NH * HD
            else:
                q_out = NH * HD
            yield p + "attn_q.weight", _no_bias_read(W.linear(p + "attn_q.weight", q_out, E))
            yield p + "attn_k.weight", _no_bias_read(W.linear(p + "attn_k.weight", NKV * HD, E))
            yield p + "attn_v.weight", _no_bias_read(W.linear(p + "attn_v.weight", NKV * HD, E))
            yield p + "attn_output.weight", _no_bias_write(W.linear(p + "attn_output.weight", E, NH * HD, gain * ATTN_OUT_GAIN))
            yield p + "attn_q_norm.weight", W.norm(p + "attn_q_norm.weight", HD)
            yield p + "attn_k_norm.weight", W.norm(p + "attn_k_norm.weight", HD)

        if arch == "qwen35moe":
            yield p + "post_attention_norm.weight", W.norm(p + "post_attention_norm.weight", E)
        else:
            yield p + "ffn_norm.weight", W.norm(p + "ffn_norm.weight", E)

        if not d["moe"]:
            yield p + "ffn_gate.weight", _no_bias_read(W.linear(p + "ffn_gate.weight", F, E))
            yield p + "ffn_up.weight", _no_bias_read(W.linear(p + "ffn_up.weight", F, E))
            yield p + "ffn_down.weight", _no_bias_write(W.linear(p + "ffn_down.weight", E, F))
            continue

        # router: nothing reads the bias channel except the hot experts' boost
        router = W.linear(p + "ffn_gate_inp.weight", X, E)
        router[:, BIAS_CHANNEL] = 0.0
        if router_skew and not nextn:
            router[hot[il], BIAS_CHANNEL] = np.float32(router_skew * ROUTER_SKEW_GAIN)
        yield p + "ffn_gate_inp.weight", router

        if routed_experts is not None:
            yield from routed_experts(p, gain)
        else:
            yield from _f32_experts(W, p, X, F, E, fused_gate_up, gain)

        if arch == "qwen35moe":
            FS = int(d["ff_shexp"])
            yield p + "ffn_gate_inp_shexp.weight", _no_bias_read(W.normal(p + "ffn_gate_inp_shexp.weight", (E,), 1.0 / math.sqrt(E)))
            yield p + "ffn_gate_shexp.weight", _no_bias_read(W.linear(p + "ffn_gate_shexp.weight", FS, E))
            yield p + "ffn_up_shexp.weight", _no_bias_read(W.linear(p + "ffn_up_shexp.weight", FS, E))
            yield p + "ffn_down_shexp.weight", _no_bias_write(W.linear(p + "ffn_down_shexp.weight", E, FS, gain))
        if nextn:
            yield from _nextn_tensors(W, p, E, mirror)

    yield "output_norm.weight", W.norm("output_norm.weight", E)
    out = W.linear("output.weight", n_vocab, E)
    out[:, BIAS_CHANNEL] = 0.0
    # control tokens get logit 0, which a greedy sampler never picks over the
    # random logits of the ordinary tokens, so generation never stops early
    out[list(control_ids), :] = 0.0
    yield "output.weight", out


def _nextn_tensors(W: _Weights, p: str, E: int, mirror: bool) -> Iterator[Tuple[str, np.ndarray]]:
    """The MTP block's own tensors (its LM head and norm are the model's). The block's input is
    eh_proj([enorm(token embedding), hnorm(target hidden state)]); with ``mirror`` it keeps just
    the token embedding, so the head predicts what the trunk would say from that token alone."""
    if mirror:
        proj = np.concatenate([np.eye(E, dtype=np.float32), np.zeros((E, E), dtype=np.float32)], axis=1)
        enorm = np.ones(E, dtype=np.float32)
    else:
        proj = W.linear(p + "nextn.eh_proj.weight", E, 2 * E)
        enorm = W.norm(p + "nextn.enorm.weight", E)
    yield p + "nextn.eh_proj.weight", proj
    yield p + "nextn.enorm.weight", enorm
    yield p + "nextn.hnorm.weight", W.norm(p + "nextn.hnorm.weight", E)


def _f32_experts(W: _Weights, p: str, X: int, F: int, E: int, fused_gate_up: bool, gain: float = 1.0
                 ) -> Iterator[Tuple[str, np.ndarray]]:
    """One block's routed experts, random f32 (their output scaled by ``gain``)."""
    # numpy (n_expert, n_out, n_in) == ggml {n_in, n_out, n_expert}
    gate = _no_bias_read(W.normal(p + "ffn_gate_exps.weight", (X, F, E), 1.0 / math.sqrt(E)))
    up = _no_bias_read(W.normal(p + "ffn_up_exps.weight", (X, F, E), 1.0 / math.sqrt(E)))
    down = _no_bias_write(W.normal(p + "ffn_down_exps.weight", (X, E, F), gain / math.sqrt(F)))
    if fused_gate_up:
        # per expert: rows [0, ff) are gate, rows [ff, 2ff) are up
        yield p + "ffn_gate_up_exps.weight", np.concatenate([gate, up], axis=1)
    else:
        yield p + "ffn_gate_exps.weight", gate
        yield p + "ffn_up_exps.weight", up
    yield p + "ffn_down_exps.weight", down


def _keep_f32(name: str, arr: np.ndarray) -> bool:
    """Tensors llama.cpp expects in f32 (mirrors convert_hf_to_gguf)."""
    return (
        arr.ndim <= 1
        or name.endswith("_norm.weight")
        or ".ffn_gate_inp." in name
        or ".ffn_gate_inp_shexp." in name
        or ".ssm_conv1d." in name
    )


# ---------------------------------------------------------------------------
# writing


def _add_metadata(w: gguf.GGUFWriter, d: Dict[str, object], tok: Dict[str, object], file_type: int,
                  chat_template: str = "chatml") -> None:
    """The hyper-parameters and the tokenizer."""
    arch = str(d["arch"])
    w.add_name(f"rotary-gguf synthetic {arch}")
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    w.add_context_length(CONTEXT_LENGTH)
    w.add_embedding_length(int(d["embd"]))
    w.add_block_count(int(d["layers"]) + int(d.get("nextn", 0)))
    if d.get("nextn"):
        w.add_uint32(f"{arch}.nextn_predict_layers", int(d["nextn"]))
    w.add_head_count(int(d["n_head"]))
    w.add_head_count_kv(int(d["n_head_kv"]))
    w.add_key_length(int(d["head_dim"]))
    w.add_value_length(int(d["head_dim"]))
    w.add_layer_norm_rms_eps(RMS_EPS)
    w.add_rope_freq_base(float(d["rope_base"]))
    w.add_rope_dimension_count(int(d["n_rot"]))
    if d["moe"]:
        # dense-equivalent size (llama.cpp falls back to ff / used for the
        # expert size when expert_feed_forward_length is absent)
        w.add_feed_forward_length(int(d["ff"]) * int(d["used"]))
        w.add_expert_feed_forward_length(int(d["ff"]))
        w.add_expert_count(int(d["experts"]))
        w.add_expert_used_count(int(d["used"]))
    else:
        w.add_feed_forward_length(int(d["ff"]))
    if arch == "qwen35moe":
        w.add_expert_shared_feed_forward_length(int(d["ff_shexp"]))
        w.add_rope_dimension_sections([int(x) for x in d["rope_sections"]])
        w.add_full_attention_interval(int(d["full_attention_interval"]))
        w.add_ssm_conv_kernel(int(d["ssm_d_conv"]))
        w.add_ssm_inner_size(int(d["ssm_d_inner"]))
        w.add_ssm_state_size(int(d["ssm_d_state"]))
        w.add_ssm_time_step_rank(int(d["ssm_dt_rank"]))
        w.add_ssm_group_count(int(d["ssm_n_group"]))

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    w.add_bos_token_id(int(tok["bos_id"]))
    w.add_eos_token_id(int(tok["eos_id"]))
    w.add_eot_token_id(int(tok["eos_id"]))
    w.add_pad_token_id(int(tok["pad_id"]))
    w.add_add_bos_token(False)
    w.add_chat_template(chat_template_text(chat_template))


def _write_gguf(path: pathlib.Path, d: Dict[str, object], tok: Dict[str, object],
                seed: int, router_skew: float, fused_gate_up: bool, f16: bool, *,
                file_type: int | None = None, chat_template: str = "chatml",
                routed_experts: Callable[[str, float], Iterator[Tuple[str, object]]] | None = None) -> None:
    """Every tensor of ``_tensors`` into a GGUF at ``path``: f32, or f16 where ``_keep_f32``
    allows with ``f16``; routed experts from ``routed_experts`` (raw Q4_K) are generated only as
    they are written, one at a time. ``file_type`` defaults to what ``f16`` says."""
    w = gguf.GGUFWriter(path, str(d["arch"]))
    _add_metadata(w, d, tok, file_type if file_type is not None else _FTYPE_MOSTLY_F16 if f16 else _FTYPE_ALL_F32,
                  chat_template)

    tensors = []
    for name, arr in _tensors(d, len(tok["tokens"]), tok["control_ids"], seed, router_skew, fused_gate_up,
                              routed_experts=routed_experts):
        if isinstance(arr, _Q4KExperts):
            w.add_tensor_info(name, arr.byte_shape, np.dtype(np.uint8), arr.nbytes, raw_dtype=Q4_K)
        else:
            arr = np.ascontiguousarray(arr, dtype=np.float32)
            if f16 and not _keep_f32(name, arr):
                arr = arr.astype(np.float16)
            w.add_tensor_info(name, arr.shape, arr.dtype, arr.nbytes)
        tensors.append(arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for arr in tensors:
        w.write_tensor_data(arr.blocks() if isinstance(arr, _Q4KExperts) else arr)
    w.close()


def _quantize(src: pathlib.Path, dst: pathlib.Path, ftype: int) -> None:
    import ctypes
    import logging

    import llama_cpp  # lazy: only needed for q8_0 / q4_k_m

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = _QUANT_THREADS
    params.ftype = ftype
    # llama-cpp-python routes llama.cpp's log through this logger (when its own
    # callback is installed); keep the per-tensor quantizer chatter out of
    # stderr but let errors through, then restore the caller's level
    logger = logging.getLogger("llama-cpp-python")
    old_level = logger.level
    if old_level < logging.ERROR:
        logger.setLevel(logging.ERROR)
    try:
        rc = llama_cpp.llama_model_quantize(
            os.fsencode(str(src)), os.fsencode(str(dst)), ctypes.byref(params)
        )
    finally:
        logger.setLevel(old_level)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed with code {rc}")


def _tmp_path(folder: pathlib.Path, stem: str, suffix: str) -> pathlib.Path:
    fd, name = tempfile.mkstemp(prefix=f".{stem}.", suffix=suffix, dir=folder)
    os.close(fd)
    return pathlib.Path(name)


def _add_mtp(d: Dict[str, object], mtp: str | None, trunk_gain: float = 1.0) -> None:
    """Give the model ``d`` one multi-token-prediction (nextn) block of kind ``mtp``, and scale what
    its trunk blocks write into the residual stream by ``trunk_gain``: below 1 the model leans on
    the last token alone, as a mirror head does, so more of its drafts are accepted (to measure
    drafts at a trained head's acceptance rate)."""
    if not math.isfinite(trunk_gain) or trunk_gain < 0:
        raise ValueError("trunk_gain must be a finite value >= 0")
    d["trunk_gain"] = float(trunk_gain)
    if mtp is None:
        return
    if mtp not in MTP_KINDS:
        raise ValueError(f"unknown mtp kind {mtp!r}; expected one of {MTP_KINDS}")
    if d["arch"] != "qwen35moe":
        raise ValueError("an MTP block is only supported for arch 'qwen35moe'")
    d.update(nextn=1, mtp=mtp)


def _router_skew(value) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError("router_skew must be a finite value >= 0")
    return value


def make_model(
    output,
    *,
    arch: str = "qwen3moe",
    layers: int = DEFAULT_LAYERS,
    experts: int = DEFAULT_EXPERTS,
    used: int = DEFAULT_USED,
    embd: int | None = None,
    ff: int | None = None,
    quant: str = "f32",
    router_skew: float = 0.0,
    seed: int = 0,
    fused_gate_up: bool = False,
    chat_template: str = "chatml",
    mtp: str | None = None,
    trunk_gain: float = 1.0,
) -> pathlib.Path:
    """Write a synthetic GGUF model to ``output`` (atomically) and return its path.

    ``embd``/``ff`` default to 64/32, or 256/256 for ``quant="q4_k_m"``.
    ``experts``/``used`` are ignored for the dense ``arch="qwen3"``, where
    ``ff`` is the dense FFN size. ``fused_gate_up`` writes
    ``ffn_gate_up_exps`` (gate rows then up rows per expert) instead of
    ``ffn_gate_exps`` + ``ffn_up_exps``; llama.cpp only reads the fused tensor
    for ``qwen35moe``. ``chat_template`` names one of ``CHAT_TEMPLATES``. ``mtp`` (``qwen35moe``)
    adds a multi-token-prediction block (see ``MTP_KINDS``); ``trunk_gain`` scales what every block
    writes into the residual stream (see ``_add_mtp``)."""
    chat_template_text(chat_template)  # an unknown name fails before anything is written
    if quant not in QUANTS:
        raise ValueError(f"unknown quant {quant!r}; expected one of {QUANTS}")
    kquant = quant == "q4_k_m"
    if embd is None:
        embd = DEFAULT_EMBD_KQUANT if kquant else DEFAULT_EMBD
    if ff is None:
        ff = DEFAULT_FF_KQUANT if kquant else DEFAULT_FF
    if fused_gate_up and arch != "qwen35moe":
        raise ValueError(
            "fused_gate_up is only supported for arch 'qwen35moe' "
            "(llama.cpp's qwen3moe/qwen3 loaders do not read ffn_gate_up_exps)"
        )
    router_skew = _router_skew(router_skew)
    if router_skew and arch == "qwen3":
        raise ValueError("router_skew needs a MoE arch")

    d = model_dims(arch=arch, layers=layers, experts=experts, used=used, embd=embd, ff=ff)
    _add_mtp(d, mtp, trunk_gain)
    tok = build_tokenizer()

    out = pathlib.Path(output)
    folder = out.parent if str(out.parent) else pathlib.Path(".")
    folder.mkdir(parents=True, exist_ok=True)

    tmp_final = _tmp_path(folder, out.name, ".tmp")
    tmp_f32 = None
    try:
        if quant in ("f32", "f16"):
            _write_gguf(tmp_final, d, tok, seed, router_skew, fused_gate_up, f16=(quant == "f16"),
                        chat_template=chat_template)
        else:
            tmp_f32 = _tmp_path(folder, out.name, ".f32.tmp")
            _write_gguf(tmp_f32, d, tok, seed, router_skew, fused_gate_up, f16=False, chat_template=chat_template)
            ftype = _FTYPE_MOSTLY_Q8_0 if quant == "q8_0" else _FTYPE_MOSTLY_Q4_K_M
            _quantize(tmp_f32, tmp_final, ftype)
        os.replace(tmp_final, out)
    except BaseException:
        tmp_final.unlink(missing_ok=True)
        raise
    finally:
        if tmp_f32 is not None:
            tmp_f32.unlink(missing_ok=True)
    return out


# ---------------------------------------------------------------------------
# benchmark models: the real expert widths, written straight as Q4_K

# Qwen3.5/3.6-35B-A3B's expert widths
BENCH_EMBD = 2048
BENCH_EXPERTS = 256
BENCH_USED = 8
BENCH_FF = 512

Q4_K = gguf.GGMLQuantizationType.Q4_K
Q4_K_WEIGHTS, Q4_K_BYTES = gguf.GGML_QUANT_SIZES[Q4_K]  # 256 weights in 144 bytes
# ggml's block_q4_K: d (f16), dmin (f16), scales[12] (eight 6-bit scales and mins of 32-weight
# sub-blocks, packed), qs[128] (4-bit quants). A weight is d*scale*q - dmin*min. Random blocks
# use scale == min and dmin == 7.5*d, so weights are d*scale*(q - 7.5): zero-mean.
_Q4_K_SCALES = np.arange(32, 64)  # drawn uniformly; q is uniform in 0..15
_Q4_K_UNIT_STD = math.sqrt(np.mean(_Q4_K_SCALES.astype(np.float64) ** 2) * 85 / 4)  # std of scale*(q - 7.5)


class _Q4KExperts:
    """A routed-expert tensor of random, valid Q4_K blocks (numpy shape (n_expert, n_out,
    n_in)), generated only when written. Like ``_no_bias_read``/``_no_bias_write``, it can
    leave the bias channel alone: ``no_read`` zeroes the whole 32-weight sub-block holding input
    column ``BIAS_CHANNEL`` of every row, ``no_write`` zeroes output row ``BIAS_CHANNEL``."""

    def __init__(self, W: _Weights, name: str, shape: Tuple[int, int, int], std: float,
                 *, no_read: bool = False, no_write: bool = False) -> None:
        self.W, self.name, self.shape, self.std = W, name, shape, std
        self.no_read, self.no_write = no_read, no_write
        self.byte_shape = (shape[0], shape[1], shape[2] // Q4_K_WEIGHTS * Q4_K_BYTES)
        self.nbytes = math.prod(self.byte_shape)

    def blocks(self) -> np.ndarray:
        rng = self.W.rng(self.name)
        n = self.nbytes // Q4_K_BYTES
        out = np.empty((n, Q4_K_BYTES), dtype=np.uint8)
        d = self.std / _Q4_K_UNIT_STD
        out[:, 0:4] = np.array([d, 7.5 * d], dtype="<f2").view(np.uint8)
        sc = rng.integers(_Q4_K_SCALES[0], _Q4_K_SCALES[-1] + 1, size=(n, 8), dtype=np.uint8)
        low, high = sc[:, :4], sc[:, 4:]
        packed_low = low | ((high >> 4) << 6)  # scales 0-3 (and the top bits of 4-7)
        out[:, 4:8] = packed_low  # scales
        out[:, 8:12] = packed_low  # mins (== scales)
        out[:, 12:16] = (high & 0x0F) | ((high & 0x0F) << 4)  # low bits of scales and mins 4-7
        out[:, 16:] = rng.integers(0, 2**64 - 1, size=n * 16, dtype=np.uint64, endpoint=True).view(np.uint8).reshape(n, 128)
        rows = out.reshape(self.shape[0], self.shape[1], -1, Q4_K_BYTES)
        if self.no_read:
            block, sub = divmod(BIAS_CHANNEL, Q4_K_WEIGHTS)
            assert sub < 4 * 32, "the bias channel must be in one of the first four sub-blocks"
            rows[:, :, block, 4 + sub // 32] &= 0xC0  # its scale...
            rows[:, :, block, 8 + sub // 32] &= 0xC0  # ...and min: every weight there is 0
        if self.no_write:
            rows[:, BIAS_CHANNEL] = 0  # d = dmin = 0
        return out.reshape(self.byte_shape)


def _q4k_experts(W: _Weights, d: Dict[str, object]) -> Callable[[str, float], Iterator[Tuple[str, _Q4KExperts]]]:
    """``_tensors``' routed_experts: separate gate, up and down, all Q4_K, with the f32 weights'
    spread and bias-channel rules."""
    X, F, E = int(d["experts"]), int(d["ff"]), int(d["embd"])

    def block(p: str, gain: float) -> Iterator[Tuple[str, _Q4KExperts]]:
        for kind in ("gate", "up"):
            name = p + f"ffn_{kind}_exps.weight"
            yield name, _Q4KExperts(W, name, (X, F, E), 1.0 / math.sqrt(E), no_read=True)
        name = p + "ffn_down_exps.weight"
        yield name, _Q4KExperts(W, name, (X, E, F), gain / math.sqrt(F), no_write=True)

    return block


def make_bench_model(
    output,
    *,
    layers: int,
    embd: int = BENCH_EMBD,
    experts: int = BENCH_EXPERTS,
    used: int = BENCH_USED,
    ff: int = BENCH_FF,
    router_skew: float = 1.0,
    seed: int = 0,
    mtp: str | None = None,
    trunk_gain: float = 1.0,
) -> pathlib.Path:
    """Write a ``qwen35moe`` model with real-size Q4_K experts to ``output`` (atomically) and
    return its path: random but valid Q4_K blocks written straight into the file, tensor by
    tensor (no f32 copy, no quantizer), so a block at the real widths (~450 MiB of experts)
    takes about a second. Everything else is what ``make_model(arch="qwen35moe", quant="f16")``
    writes (attention and DeltaNet widths derived from ``embd``, within 2x of the real ones).
    ``embd`` and ``ff`` must be multiples of 256 (Q4_K rows)."""
    if embd % Q4_K_WEIGHTS or ff % Q4_K_WEIGHTS:
        raise ValueError(f"embd and ff must be multiples of {Q4_K_WEIGHTS} for Q4_K rows")
    router_skew = _router_skew(router_skew)
    d = model_dims(arch="qwen35moe", layers=layers, experts=experts, used=used, embd=embd, ff=ff)
    _add_mtp(d, mtp, trunk_gain)
    tok = build_tokenizer()

    out = pathlib.Path(output)
    folder = out.parent if str(out.parent) else pathlib.Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(folder, out.name, ".tmp")
    try:
        _write_gguf(tmp, d, tok, seed, router_skew, fused_gate_up=False, f16=True, file_type=_FTYPE_MOSTLY_Q4_K_S,
                    routed_experts=_q4k_experts(_Weights(seed), d))
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


# ---------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="Write a small synthetic (MoE) GGUF model that llama.cpp can run.",
    )
    ap.add_argument("-o", "--output", required=True, help="output .gguf path")
    ap.add_argument("--arch", choices=ARCHS, default="qwen3moe",
                    help="qwen3moe, qwen35moe (hybrid DeltaNet/attention MoE) or qwen3 (dense)")
    ap.add_argument("--layers", type=int, default=DEFAULT_LAYERS, help="number of blocks")
    ap.add_argument("--experts", type=int, default=None,
                    help=f"routed experts per block (default {DEFAULT_EXPERTS}, {BENCH_EXPERTS} with --bench-dims)")
    ap.add_argument("--used", type=int, default=None,
                    help=f"experts used per token (default {DEFAULT_USED}, {BENCH_USED} with --bench-dims)")
    ap.add_argument("--embd", type=int, default=None,
                    help=f"embedding size (default {DEFAULT_EMBD}, {DEFAULT_EMBD_KQUANT} for q4_k_m, "
                         f"{BENCH_EMBD} with --bench-dims)")
    ap.add_argument("--ff", type=int, default=None,
                    help=f"expert FFN size, dense FFN size for qwen3 "
                         f"(default {DEFAULT_FF}, {DEFAULT_FF_KQUANT} for q4_k_m, {BENCH_FF} with --bench-dims)")
    ap.add_argument("--quant", choices=QUANTS, default="f32", help="weight type")
    ap.add_argument("--router-skew", type=float, default=None,
                    help="0 = near-uniform routing; 1-2 = a few hot experts per layer take most selections "
                         "(default 0, 1 with --bench-dims)")
    ap.add_argument("--seed", type=int, default=0, help="weights seed")
    ap.add_argument("--fused-gate-up", action="store_true",
                    help="write ffn_gate_up_exps instead of ffn_gate_exps + ffn_up_exps (qwen35moe)")
    ap.add_argument("--chat-template", choices=CHAT_TEMPLATES, default="chatml",
                    help="chatml (plain), qwen3.5 (tools as <function=..>, thinking on by default) or qwen3 "
                         "(JSON tool calls)")
    ap.add_argument("--mtp", choices=MTP_KINDS, default=None,
                    help="add a multi-token-prediction (nextn) block (qwen35moe): random weights, or 'mirror' "
                         "(drafts what the trunk predicts from the last token alone, often accepted)")
    ap.add_argument("--trunk-gain", type=float, default=1.0,
                    help="scale what every block writes into the residual stream (below 1: the next token depends "
                         "more on the last one, and a mirror MTP head's drafts are accepted more often)")
    ap.add_argument("--bench-dims", action="store_true",
                    help="make_bench_model: a qwen35moe with Qwen3.5/3.6-35B-A3B's expert widths, its experts "
                         "written straight as random Q4_K blocks (--arch, --quant and --fused-gate-up do not apply)")
    return ap


def _given(value, default):
    return default if value is None else value


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.bench_dims:
            path = make_bench_model(
                args.output,
                layers=args.layers,
                embd=_given(args.embd, BENCH_EMBD),
                experts=_given(args.experts, BENCH_EXPERTS),
                used=_given(args.used, BENCH_USED),
                ff=_given(args.ff, BENCH_FF),
                router_skew=_given(args.router_skew, 1.0),
                seed=args.seed,
                mtp=args.mtp,
                trunk_gain=args.trunk_gain,
            )
        else:
            path = make_model(
                args.output,
                arch=args.arch,
                layers=args.layers,
                experts=_given(args.experts, DEFAULT_EXPERTS),
                used=_given(args.used, DEFAULT_USED),
                embd=args.embd,
                ff=args.ff,
                quant=args.quant,
                router_skew=_given(args.router_skew, 0.0),
                seed=args.seed,
                fused_gate_up=args.fused_gate_up,
                chat_template=args.chat_template,
                mtp=args.mtp,
                trunk_gain=args.trunk_gain,
            )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{path} {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
