"""The planner: where every tensor lives for a VRAM budget. Pure Python, no llama.cpp import.

Policy: everything except the routed experts goes on the accelerator (the token embeddings stay in
host memory, where llama.cpp always keeps its input layer); then the whole expert tensors of as
many blocks as the budget allows stay resident on the accelerator, largest blocks first; the rest
live in host memory and run in one of two modes:

- `cpu`: the CPU computes them during decode (llama.cpp's `--n-cpu-moe` behaviour);
- `rotary`: each token's experts are streamed to the accelerator and computed there
  (GGML_OP_OFFLOAD_MIN_BATCH=1, pinned host memory). This needs a GPU backend with offload_op.

The memory model follows llama.cpp's own sizing (src/llama-kv-cache.cpp,
src/llama-memory-recurrent.cpp, src/llama-context.cpp): weights, KV cache and recurrent state are
exact; compute buffers and the CUDA runtime reserve are estimates, calibrated against what
llama.cpp allocates (for the test models and for a header-only model with Qwen3.6-35B-A3B's
widths). Every figure says whether it is an estimate.

With an expert cache, each host block also keeps `slots` accelerator slots, each holding one of
its experts (every expert tensor of the block). Its misses are either computed by the CPU while
the accelerator computes the hits (`split`, the default: one more all-zero slot per block, and
uploads between tokens), or uploaded before the block runs (`upload`, for fast links). A slot
count chooses the resident blocks around the cache. `auto` with split weighs every slot count
against the resident blocks the same memory would hold, by the decode-time model of
`decode_cost`, and keeps the fastest (resident blocks only, when nothing beats them); `auto` with
upload fills what the resident blocks leave (`caching`).

Over several accelerators (`spreading`): llama.cpp's layer split follows the devices' budgets, the
resident expert blocks spread over the devices, fastest first, and host experts run on the CPU.

The output, a `Plan`, turns into a `Placement`: what the engine hands to llama.cpp (the device
list, the tensor_buft_overrides as pattern -> buffer type name, first match wins, and load options).
"""

from .budget import Sizing, estimate_margin, largest_ctx, shrink_advice
from .choosing import choose_mode, predicted_token_seconds
from .context import ContextSettings, context_settings, default_ctx, trained_ctx
from .drafting import DraftUse
from .figures import Accelerator, LinkFigures, ModelFigures
from .memory import (DeviceUse, accelerator_compute_bytes, host_compute_bytes, kv_cache_bytes, padded_ctx,
                     recurrent_state_bytes, staging_bytes, ubatch_tokens)
from .caching import ExpertCachePlan, HitRates, predicted_host_seconds
from .placing import DeviceShare, Placement, Plan, make_plan
from .spreading import layer_split, layers_by_device, make_spread_plan
from .settings import (AUTO_CACHE_MIN_USED_MULTIPLE, CACHE_MISSES, CARD_RESERVE, COPY_LATENCY_S, CTX_PADDING,
                       CUDA_OFFLOAD_MIN_BATCH, CUDA_RUNTIME_RESERVE, ESTIMATE_MARGIN_SHARE, FREE_MEMORY_RESERVE, DEFAULT_BATCH, DEFAULT_CTX, DEFAULT_FLASH_ATTN, DEFAULT_KV_TYPE,
                       EXPERT_CACHE_SETTINGS, FLASH_ATTN, HOST_BUFFER_TYPE, HOST_MODES, KV_TYPES, MIN_CTX,
                       ROTARY_OFFLOAD_MIN_BATCH)

__all__ = [
    "AUTO_CACHE_MIN_USED_MULTIPLE", "CACHE_MISSES", "CARD_RESERVE", "ESTIMATE_MARGIN_SHARE", "FREE_MEMORY_RESERVE",
    "Sizing", "estimate_margin", "largest_ctx", "shrink_advice", "COPY_LATENCY_S", "CTX_PADDING", "CUDA_OFFLOAD_MIN_BATCH",
    "CUDA_RUNTIME_RESERVE", "DEFAULT_BATCH", "DEFAULT_CTX", "DEFAULT_FLASH_ATTN", "DEFAULT_KV_TYPE",
    "EXPERT_CACHE_SETTINGS", "FLASH_ATTN", "HOST_BUFFER_TYPE", "HOST_MODES", "KV_TYPES", "MIN_CTX",
    "ROTARY_OFFLOAD_MIN_BATCH", "Accelerator", "ContextSettings", "context_settings", "default_ctx", "trained_ctx", "DeviceUse",
    "DraftUse", "ExpertCachePlan", "HitRates", "LinkFigures",
    "ModelFigures", "Placement", "Plan", "accelerator_compute_bytes", "choose_mode", "host_compute_bytes",
    "kv_cache_bytes", "make_plan", "padded_ctx", "predicted_host_seconds", "predicted_token_seconds",
    "recurrent_state_bytes", "staging_bytes", "ubatch_tokens", "DeviceShare", "layer_split", "layers_by_device",
    "make_spread_plan",
]
