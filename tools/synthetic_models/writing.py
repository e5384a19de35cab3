"""Writing a test model's GGUF: metadata, tensors (f32, f16 or raw Q4_K) and llama.cpp's quantizer."""

from __future__ import annotations

import os
import pathlib
import tempfile
from typing import Callable, Dict, Iterator, Tuple

import numpy as np

import gguf

from .q4k import Q4_K, Q4KExperts
from .shapes import CONTEXT_LENGTH, RMS_EPS
from .tensors import keep_f32, model_tensors
from .tokenizer import chat_template_text

# llama.cpp's llama_ftype values
FTYPE_ALL_F32 = 0
FTYPE_MOSTLY_F16 = 1
FTYPE_MOSTLY_Q8_0 = 7
FTYPE_MOSTLY_Q4_K_S = 14
FTYPE_MOSTLY_Q4_K_M = 15

# number of threads given to llama.cpp's quantizer (the result does not depend
# on it, but a fixed value keeps runs identical in every respect)
_QUANT_THREADS = 4


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


def write_gguf(path: pathlib.Path, d: Dict[str, object], tok: Dict[str, object],
               seed: int, router_skew: float, fused_gate_up: bool, f16: bool, *,
               file_type: int | None = None, chat_template: str = "chatml",
               routed_experts: Callable[[str, float], Iterator[Tuple[str, object]]] | None = None) -> None:
    """Every tensor of ``model_tensors`` into a GGUF at ``path``: f32, or f16 where ``keep_f32``
    allows with ``f16``; routed experts from ``routed_experts`` (raw Q4_K) are generated only as
    they are written, one at a time. ``file_type`` defaults to what ``f16`` says."""
    w = gguf.GGUFWriter(path, str(d["arch"]))
    _add_metadata(w, d, tok, file_type if file_type is not None else FTYPE_MOSTLY_F16 if f16 else FTYPE_ALL_F32,
                  chat_template)

    tensors = []
    for name, arr in model_tensors(d, len(tok["tokens"]), tok["control_ids"], seed, router_skew, fused_gate_up,
                                   routed_experts=routed_experts):
        if isinstance(arr, Q4KExperts):
            w.add_tensor_info(name, arr.byte_shape, np.dtype(np.uint8), arr.nbytes, raw_dtype=Q4_K)
        else:
            arr = np.ascontiguousarray(arr, dtype=np.float32)
            if f16 and not keep_f32(name, arr):
                arr = arr.astype(np.float16)
            w.add_tensor_info(name, arr.shape, arr.dtype, arr.nbytes)
        tensors.append(arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for arr in tensors:
        w.write_tensor_data(arr.blocks() if isinstance(arr, Q4KExperts) else arr)
    w.close()


def quantize(src: pathlib.Path, dst: pathlib.Path, ftype: int) -> None:
    """llama.cpp's own quantizer: `src` (f32) to `dst` in the llama_ftype `ftype`."""
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


def tmp_path(folder: pathlib.Path, stem: str, suffix: str) -> pathlib.Path:
    """A new hidden file in `folder` to write a model into before it is moved into place."""
    fd, name = tempfile.mkstemp(prefix=f".{stem}.", suffix=suffix, dir=folder)
    os.close(fd)
    return pathlib.Path(name)
