"""Small synthetic Mixture-of-Experts GGUF models for tests and benchmarks (``make_model``,
``make_bench_model``), written by ``tools/make_test_model.py`` from the command line.

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

Modules, in the order they build on each other: ``shapes`` (hyper-parameters), ``tokenizer``
(vocabulary and chat templates), ``routing`` (the skew and simulated profiles), ``tensors``
(every tensor's weights), ``q4k`` (raw Q4_K experts), ``writing`` (GGUF and the quantizer),
``models`` (the two entry points).
"""

from .models import BENCH_EMBD, BENCH_EXPERTS, BENCH_FF, BENCH_USED, QUANTS, make_bench_model, make_model
from .routing import BIAS_CHANNEL, BIAS_VALUE, ROUTER_SKEW_GAIN, hot_experts, simulated_profile
from .shapes import (ARCHS, DEFAULT_EMBD, DEFAULT_EMBD_KQUANT, DEFAULT_EXPERTS, DEFAULT_FF, DEFAULT_FF_KQUANT,
                     DEFAULT_LAYERS, DEFAULT_USED, MTP_KINDS, model_dims)
from .tokenizer import CHAT_TEMPLATE, CHAT_TEMPLATES, build_tokenizer, chat_template_text

__all__ = [
    "ARCHS", "QUANTS", "MTP_KINDS", "BIAS_CHANNEL", "BIAS_VALUE", "ROUTER_SKEW_GAIN",
    "DEFAULT_LAYERS", "DEFAULT_EXPERTS", "DEFAULT_USED", "DEFAULT_EMBD", "DEFAULT_FF", "DEFAULT_EMBD_KQUANT",
    "DEFAULT_FF_KQUANT", "BENCH_EMBD", "BENCH_EXPERTS", "BENCH_USED", "BENCH_FF",
    "make_model", "make_bench_model", "hot_experts", "simulated_profile", "model_dims", "build_tokenizer",
    "CHAT_TEMPLATE", "CHAT_TEMPLATES", "chat_template_text",
]
