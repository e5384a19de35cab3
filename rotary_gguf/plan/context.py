"""The context llama.cpp creates: its length within the model's limits, the batch sizes, the KV
cache type and flash attention, checked before llama.cpp sees them. Every command takes its
defaults from here."""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..catalog import load_catalog, match
from ..errors import UserError
from ..inventory import Inventory
from ..defaults import DEFAULT_BATCH, DEFAULT_CTX, DEFAULT_FLASH_ATTN, DEFAULT_KV_TYPE, FLASH_ATTN, KV_TYPES, MIN_CTX


@dataclass(frozen=True)
class ContextSettings:
    """What sizes llama.cpp's context (and the planner's memory model)."""

    ctx: int = DEFAULT_CTX
    n_batch: int = DEFAULT_BATCH  # tokens per llama_decode call
    n_ubatch: int = DEFAULT_BATCH  # tokens per micro-batch: sizes the compute buffers
    kv_type: str = DEFAULT_KV_TYPE
    flash_attn: str = DEFAULT_FLASH_ATTN

    def load_options(self) -> dict:
        """Engine.load's keyword arguments for this context."""
        return dict(n_ctx=self.ctx, n_batch=self.n_batch, n_ubatch=self.n_ubatch, kv_type=self.kv_type,
                    flash_attn=self.flash_attn)

    def plan_options(self) -> dict:
        """make_plan's keyword arguments for this context."""
        return dict(ctx=self.ctx, n_batch=self.n_batch, n_ubatch=self.n_ubatch, kv_type=self.kv_type,
                    flash_attn=self.flash_attn)


def trained_ctx(inv: Inventory) -> int:
    """The context the model was trained for (`<arch>.context_length`); 0 when the file lacks it."""
    return inv.hparam("context_length")


def default_ctx(inv: Inventory) -> int:
    """The catalog's default_ctx for a model it knows (the smallest, if several entries match),
    else DEFAULT_CTX; never more than the trained context."""
    names = set(match(inv))
    known = [m["default_ctx"] for m in load_catalog() if m["name"] in names and "default_ctx" in m]
    ctx = min(known) if known else DEFAULT_CTX
    return min(ctx, trained_ctx(inv)) if trained_ctx(inv) else ctx


def context_settings(inv: Inventory, ctx: int | None = None, n_batch: int = DEFAULT_BATCH, n_ubatch: int | None = None,
                     kv_type: str = DEFAULT_KV_TYPE, flash_attn: str = DEFAULT_FLASH_ATTN) -> ContextSettings:
    """The settings for `inv`, checked: `ctx` None is the model's default; the context lies between
    MIN_CTX and the trained context; a micro-batch is at most a batch; quantized K and V rows fit
    the model's head sizes, and a quantized V cache has flash attention (llama.cpp's rule)."""
    ctx = default_ctx(inv) if ctx is None else ctx
    trained = trained_ctx(inv)
    if ctx < MIN_CTX:
        raise UserError(f"--ctx {ctx}: the context must hold at least {MIN_CTX} tokens")
    if trained and ctx > trained:
        raise UserError(f"--ctx {ctx}: {inv.path.name} was trained for {trained} tokens; use --ctx {trained} or less")
    n_ubatch = n_batch if n_ubatch is None else n_ubatch
    if n_batch < 1 or n_ubatch < 1:
        raise UserError(f"--batch and --ubatch take at least 1 token, not {min(n_batch, n_ubatch)}")
    if n_ubatch > n_batch:
        raise UserError(f"--ubatch {n_ubatch} is more than --batch {n_batch}: a micro-batch is a part of a batch")
    if kv_type not in KV_TYPES:
        raise UserError(f"--kv-type {kv_type}: use {', '.join(KV_TYPES)}")
    if flash_attn not in FLASH_ATTN:
        raise UserError(f"--flash-attn {flash_attn}: use {', '.join(FLASH_ATTN)}")
    block = GGML_QUANT_SIZES[GGMLQuantizationType[kv_type.upper()]][0]
    head_k, head_v = inv.head_dim_k, inv.head_dim_v
    if head_k % block or head_v % block:
        raise UserError(f"--kv-type {kv_type} stores blocks of {block} values; {inv.path.name}'s attention heads have "
                        f"{head_k} (K) and {head_v} (V): use --kv-type f16")
    if block > 1 and flash_attn == "off":
        raise UserError(f"--kv-type {kv_type} quantizes the V cache, which llama.cpp reads only with flash attention: "
                        "use --flash-attn on or auto, or --kv-type f16")
    return ContextSettings(ctx, n_batch, n_ubatch, kv_type, flash_attn)
