"""The memory model: bytes of the KV cache, recurrent state, compute buffers and staging copies,
following llama.cpp's own sizing. Weights, KV cache and recurrent state are exact; compute buffers
and the runtime reserve are estimates."""

from __future__ import annotations

from dataclasses import dataclass, fields

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import UserError
from ..speed_model import kv_row_bytes
from .figures import Accelerator, ModelFigures
from .settings import CTX_PADDING, CUDA_OFFLOAD_MIN_BATCH, KV_TYPES


@dataclass(frozen=True)
class DeviceUse:
    """Predicted bytes of one memory pool, by purpose."""

    weights: int = 0
    kv_cache: int = 0
    recurrent_state: int = 0
    compute: int = 0  # estimate
    staging: int = 0  # full-size copy of one host expert tensor while its op runs on the GPU
    output: int = 0  # logits llama.cpp copies out (host)
    runtime_reserve: int = 0  # estimate
    expert_cache: int = 0  # the expert cache's slots

    ESTIMATES = ("compute", "runtime_reserve")

    @property
    def total(self) -> int:
        return sum(self.parts().values())

    def parts(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def padded_ctx(ctx: int) -> int:
    return -(-ctx // CTX_PADDING) * CTX_PADDING


def kv_cache_bytes(model: ModelFigures, ctx: int, kv_type: str = "f16") -> int:
    """K and V rows of every full-attention block for the padded context (one sequence)."""
    n_full = model.attention.count("full")
    per_token = _row_bytes(kv_type, model.n_head_kv * model.head_dim_k) + _row_bytes(kv_type, model.n_head_kv * model.head_dim_v)
    return n_full * padded_ctx(ctx) * per_token


def recurrent_state_bytes(model: ModelFigures) -> int:
    """Conv and SSM state (f32) of every linear-attention block, for one sequence."""
    return model.attention.count("linear") * (model.recurrent_conv + model.recurrent_ssm) * 4


def ubatch_tokens(ctx: int, n_ubatch: int) -> int:
    """The worst-case micro-batch llama.cpp reserves its compute buffers for (at most the context)."""
    return min(ctx, n_ubatch)


def accelerator_compute_bytes(model: ModelFigures, ctx: int, n_ubatch: int, flash_attn: bool = True,
                              all_outputs: bool = False, output: bool = True, n_outputs: int = 1) -> int:
    """Estimate of the accelerator's compute buffer for a micro-batch of `n_ubatch` tokens: the KQ
    mask (f16 for flash attention, else f32) plus the larger of the output phase (logits of
    `n_outputs` tokens, or of every token of the micro-batch with `all_outputs`) and the widest
    block (attention, MoE or linear attention activations; without flash attention also the f32 KQ
    scores of every head over the whole context). A device without the output layer (`output`
    False: one of several) has no output phase."""
    t = ubatch_tokens(ctx, n_ubatch)
    full = "full" in model.attention
    mask = _mask_bytes(model, ctx, t, flash_attn)
    logits = t if all_outputs else min(t, n_outputs)
    output_phase = 4 * (logits * model.n_vocab + t * 3 * model.n_embd) if output else 0
    attention = 3 * model.n_head * model.head_dim_k + 2 * model.n_head_kv * model.head_dim_k
    widest = max(attention, model.moe_width, model.recurrent_width if "linear" in model.attention else 0)
    layer_phase = 4 * t * (3 * model.n_embd + widest)
    if full and not flash_attn:
        layer_phase += 4 * model.n_head * padded_ctx(ctx) * t
    return mask + max(output_phase, layer_phase)


def host_compute_bytes(model: ModelFigures, ctx: int, n_ubatch: int, experts_on_cpu: bool, flash_attn: bool = True) -> int:
    """Estimate of the CPU compute buffer: the KQ mask is built there, the embeddings are looked
    up there, and host experts computed by the CPU keep their activations there."""
    t = ubatch_tokens(ctx, n_ubatch)
    return _mask_bytes(model, ctx, t, flash_attn) + 4 * t * (3 * model.n_embd + (model.moe_width if experts_on_cpu else 0))


def _mask_bytes(model: ModelFigures, ctx: int, tokens: int, flash_attn: bool) -> int:
    """The KQ mask: f16 for flash attention, f32 otherwise; none without full-attention blocks."""
    return (2 if flash_attn else 4) * padded_ctx(ctx) * tokens if "full" in model.attention else 0


def staging_bytes(model: ModelFigures, accelerator: Accelerator, host_layers: list[int], mode: str, n_ubatch: int) -> int:
    """The full-size accelerator copy llama.cpp makes of one host expert tensor while an op that
    uses it runs on the GPU: every decode step in rotary mode, prompt batches of 32+ tokens in cpu
    mode. Only one such copy is live at a time (each starts a new split), so: the largest one."""
    if not (accelerator.streams_host_ops and host_layers):
        return 0
    if mode != "rotary" and n_ubatch < CUDA_OFFLOAD_MIN_BATCH:
        return 0
    return max(max(model.expert_tensors[i]) for i in host_layers)


def _row_bytes(type_name: str, n: int) -> int:
    try:
        block = GGML_QUANT_SIZES[GGMLQuantizationType[type_name.upper()]][0]
    except KeyError:
        raise UserError(f"unknown KV cache type {type_name!r} (known: {', '.join(KV_TYPES)})") from None
    if n % block:
        raise UserError(f"KV cache type {type_name} needs rows that are a multiple of {block}; this model's are {n}")
    return kv_row_bytes(type_name, n)
