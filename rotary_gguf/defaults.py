"""Defaults of the context llama.cpp creates, of the budget and of the calibration, shared by the planner, the engine and the command
line: one place for them, with no imports, so the command line's options can name them cheaply."""

DEFAULT_CTX = 4096  # tokens, for a model the catalog (models.toml) gives no default_ctx
MIN_CTX = 16  # a short prompt and a few tokens of reply; llama.cpp pads any smaller context to 256 anyway
DEFAULT_BATCH = 512  # tokens per llama_decode call (n_batch)
KV_TYPES = ("f16", "q8_0", "q4_0")  # K and V cache element types (llama_context_params.type_k/type_v)
DEFAULT_KV_TYPE = "f16"
FLASH_ATTN = ("auto", "on", "off")  # llama.cpp's flash_attn_type: auto lets it pick per device
DEFAULT_FLASH_ATTN = "auto"

# Kept off a GPU's budget for the display and the driver. Free memory already excludes what they
# use now, so the reserve only covers their growth (a browser, a second monitor); a size given with
# --vram is the card's, so the reserve also covers the CUDA context (about 300 MiB) and a desktop.
FREE_MEMORY_RESERVE = 256 * 2**20
CARD_RESERVE = 768 * 2**20

# The figures a plan predicts speed from are each the median of this machine's last few calibrations:
# slow states of a shared machine outlast one calibration (whole calibrations a minute apart predicted
# one placement at 33.7 and 46.5 t/s).
CALIBRATIONS_KEPT = 3
