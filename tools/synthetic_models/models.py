"""The two kinds of test model: `make_model` (small, any architecture and type) and `make_bench_model`
(Qwen3.6's expert widths, Q4_K)."""

from __future__ import annotations

import os
import pathlib

from .q4k import Q4_K_WEIGHTS, q4k_experts
from .routing import router_skew_value
from .shapes import (DEFAULT_EMBD, DEFAULT_EMBD_KQUANT, DEFAULT_EXPERTS, DEFAULT_FF, DEFAULT_FF_KQUANT, DEFAULT_LAYERS,
                     DEFAULT_USED, add_mtp, model_dims)
from .tensors import Weights
from .tokenizer import build_tokenizer, chat_template_text
from .writing import FTYPE_MOSTLY_Q4_K_M, FTYPE_MOSTLY_Q4_K_S, FTYPE_MOSTLY_Q8_0, quantize, tmp_path, write_gguf

QUANTS = ("f32", "f16", "q8_0", "q4_k_m")

# Qwen3.5/3.6-35B-A3B's expert widths
BENCH_EMBD = 2048
BENCH_EXPERTS = 256
BENCH_USED = 8
BENCH_FF = 512


def _output_path(output) -> pathlib.Path:
    """`output` as a path, its folder made."""
    out = pathlib.Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


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
    writes into the residual stream (see ``add_mtp``)."""
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
    router_skew = router_skew_value(router_skew)
    if router_skew and arch == "qwen3":
        raise ValueError("router_skew needs a MoE arch")

    d = model_dims(arch=arch, layers=layers, experts=experts, used=used, embd=embd, ff=ff)
    add_mtp(d, mtp, trunk_gain)
    tok = build_tokenizer()

    out = _output_path(output)
    folder = out.parent
    tmp_final = tmp_path(folder, out.name, ".tmp")
    tmp_f32 = None
    try:
        if quant in ("f32", "f16"):
            write_gguf(tmp_final, d, tok, seed, router_skew, fused_gate_up, f16=(quant == "f16"),
                        chat_template=chat_template)
        else:
            tmp_f32 = tmp_path(folder, out.name, ".f32.tmp")
            write_gguf(tmp_f32, d, tok, seed, router_skew, fused_gate_up, f16=False, chat_template=chat_template)
            ftype = FTYPE_MOSTLY_Q8_0 if quant == "q8_0" else FTYPE_MOSTLY_Q4_K_M
            quantize(tmp_f32, tmp_final, ftype)
        os.replace(tmp_final, out)
    except BaseException:
        tmp_final.unlink(missing_ok=True)
        raise
    finally:
        if tmp_f32 is not None:
            tmp_f32.unlink(missing_ok=True)
    return out


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
    router_skew = router_skew_value(router_skew)
    d = model_dims(arch="qwen35moe", layers=layers, experts=experts, used=used, embd=embd, ff=ff)
    add_mtp(d, mtp, trunk_gain)
    tok = build_tokenizer()

    out = _output_path(output)
    tmp = tmp_path(out.parent, out.name, ".tmp")
    try:
        write_gguf(tmp, d, tok, seed, router_skew, fused_gate_up=False, f16=True, file_type=FTYPE_MOSTLY_Q4_K_S,
                    routed_experts=q4k_experts(Weights(seed), d))
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
