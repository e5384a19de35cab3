"""GGUF export: the trained weights under llama.cpp's tensor names, with the settings, the tokenizer
and the chat template, written atomically as f32, f16 or q8_0."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Iterator

import gguf
import numpy as np

from synthetic_models.tensors import keep_f32
from synthetic_models.tokenizer import CHAT_TEMPLATE
from synthetic_models.writing import FTYPE_ALL_F32, FTYPE_MOSTLY_F16, FTYPE_MOSTLY_Q8_0, quantize, tmp_path

from .qwen3moe import DemoMoE
from .qwen35moe import Qwen35MoE, add_hparams
from .tokenizer import PRE_TOKENIZER, Tokenizer

QUANTS = ("f32", "f16", "q8_0")
SETTINGS_KEY = "rotary.demo.settings"
CORPUS_SHA_KEY = "rotary.demo.corpus_sha256"


def gguf_tensors(model: DemoMoE) -> Iterator[tuple[str, np.ndarray]]:
    """The weights under llama.cpp's qwen3moe names; numpy shapes are ggml's ne reversed."""
    yield "token_embd.weight", model.token_embd.weight
    for i, b in enumerate(model.blocks):
        for name in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm",
                     "attn_k_norm", "ffn_norm", "ffn_gate_inp"):
            yield f"blk.{i}.{name}.weight", getattr(b, name).weight
        for name in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
            yield f"blk.{i}.{name}.weight", getattr(b, name)
    yield "output_norm.weight", model.output_norm.weight


def write_gguf(path: pathlib.Path, model: DemoMoE | Qwen35MoE, tok: Tokenizer, quant: str, meta: dict) -> None:
    """Write the model (f32 or f16 weights; q8_0 goes through llama.cpp's quantizer) atomically."""
    s = model.s
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(folder, path.name, ".tmp")
    tmp_f32 = tmp_path(folder, path.name, ".f32.tmp") if quant == "q8_0" else None
    try:
        f16 = quant == "f16"
        w = gguf.GGUFWriter(tmp_f32 or tmp, s.arch)
        w.add_name("rotary-gguf demo MoE" if s.arch == "qwen3moe" else f"rotary-gguf demo {s.arch}")
        w.add_description(meta["description"])
        w.add_license("MIT")
        w.add_file_type(FTYPE_MOSTLY_F16 if f16 else FTYPE_ALL_F32)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_string(SETTINGS_KEY, json.dumps(dataclasses.asdict(s), sort_keys=True))
        w.add_string(CORPUS_SHA_KEY, meta["corpus_sha256"])
        w.add_context_length(s.seq_len)
        w.add_embedding_length(s.embd)
        if s.arch == "qwen35moe":
            add_hparams(w, s)
        else:
            w.add_block_count(s.layers)
        w.add_head_count(s.heads)
        w.add_head_count_kv(s.kv_heads)
        w.add_key_length(s.head_dim)
        w.add_value_length(s.head_dim)
        w.add_layer_norm_rms_eps(s.rms_eps)
        w.add_rope_freq_base(s.rope_base)
        w.add_feed_forward_length(s.ff * s.used)
        w.add_expert_feed_forward_length(s.ff)
        w.add_expert_count(s.experts)
        w.add_expert_used_count(s.used)
        vocab = tok.gguf_vocab()
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(PRE_TOKENIZER)
        w.add_token_list(vocab["tokens"])
        w.add_token_types(vocab["types"])
        w.add_token_merges(vocab["merges"])
        w.add_bos_token_id(vocab["bos_id"])
        w.add_eos_token_id(vocab["eos_id"])
        w.add_eot_token_id(vocab["eos_id"])
        w.add_pad_token_id(vocab["pad_id"])
        w.add_add_bos_token(False)
        w.add_chat_template(CHAT_TEMPLATE)
        for name, p in model.gguf_tensors() if s.arch == "qwen35moe" else gguf_tensors(model):
            arr = p.detach().float().numpy()
            if f16 and not keep_f32(name, arr):
                arr = arr.astype(np.float16)
            w.add_tensor(name, np.ascontiguousarray(arr))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        if tmp_f32 is not None:
            quantize(tmp_f32, tmp, FTYPE_MOSTLY_Q8_0)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # the temp file was created private
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        if tmp_f32 is not None:
            tmp_f32.unlink(missing_ok=True)
