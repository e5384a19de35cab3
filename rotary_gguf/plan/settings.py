"""The planner's settings and their defaults, in one place (the context's own are in `defaults`)."""

HOST_MODES = ("cpu", "rotary")
EXPERT_CACHE_SETTINGS = ("auto", "off")  # or a number of slots per host block
CACHE_MISSES = ("split", "upload")  # what a cache miss does: computed on the CPU meanwhile, or uploaded first
# `auto` makes no cache smaller than this many times the experts a token uses: a miss costs an
# upload where the CPU would have computed the expert in place, and replayed routing traces hit
# only 18-47% at slots = used (test and demo models) against 43-88% at twice that.
AUTO_CACHE_MIN_USED_MULTIPLE = 2
HOST_BUFFER_TYPE = "CPU"  # llama.cpp's plain host buffer type (it may pick a repacked or pinned variant)
ROTARY_OFFLOAD_MIN_BATCH = 1  # every decode step streams the used host experts to the GPU
CUDA_OFFLOAD_MIN_BATCH = 32  # CUDA's default: batches this large run host-expert ops on the GPU
CTX_PADDING = 256  # llama.cpp pads the context (and so the KV cache) to a multiple of this
CUDA_RUNTIME_RESERVE = 256 * 2**20  # CUDA memory pools and cuBLAS workspace: outside llama.cpp's buffers (estimate)

# --- the budget ------------------------------------------------------------------------------------
# Left free beyond a plan's prediction: this share of its estimated parts (compute buffers and the
# runtime reserve). On the ggml-rpc device the compute estimates stay 0-2x above what llama.cpp
# allocates; a GPU backend may split the graph differently, and a quarter more covers that.
ESTIMATE_MARGIN_SHARE = 0.25
SMALL_BATCH = 128  # the --batch "too small" advice offers: prompts still go 128 tokens per step

from ..defaults import (CARD_RESERVE, DEFAULT_BATCH, DEFAULT_CTX, DEFAULT_FLASH_ATTN, DEFAULT_KV_TYPE,  # noqa: F401
                        FLASH_ATTN, FREE_MEMORY_RESERVE, KV_TYPES, MIN_CTX)
# Per-copy cost of streaming one run of experts (launch + PCIe latency): an assumption of the
# mode-choice model, not a measurement.
COPY_LATENCY_S = 10e-6
