"""The budget side of a plan: the accelerator memory the plan needs whatever the experts do, the
margin it keeps for its estimated parts, the largest context that fits, and what would shrink the
need when a budget is too small."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from ..errors import UserError
from ..units import human_bytes
from .drafting import DraftUse
from .figures import Accelerator, ModelFigures
from .memory import (DeviceUse, accelerator_compute_bytes, kv_cache_bytes, recurrent_state_bytes, staging_bytes,
                     ubatch_tokens)
from .settings import ESTIMATE_MARGIN_SHARE, KV_TYPES, MIN_CTX, SMALL_BATCH


@dataclass(frozen=True)
class Sizing:
    """What sizes the accelerator's fixed part: the context and the compute-buffer knobs."""

    ctx: int
    n_ubatch: int  # tokens of the micro-batch llama.cpp reserves compute buffers for
    kv_type: str
    flash_attn: bool
    all_outputs: bool  # logits of every token of a micro-batch, not of one
    draft_max: int = 0  # MTP drafts a round (0: no drafting)

    def draft_use(self, model: ModelFigures, experts_on_cpu: bool = False) -> DraftUse | None:
        """What drafting adds (None without it)."""
        if not self.draft_max:
            return None
        return DraftUse.size(model, self.draft_max, self.ctx, self.n_ubatch, self.kv_type, self.flash_attn,
                             experts_on_cpu, self.all_outputs)

    def fixed_use(self, model: ModelFigures, accelerator: Accelerator) -> DeviceUse:
        """The accelerator's bytes that do not depend on where the experts live (the MTP block's
        experts included: they are placed after the trunk's)."""
        use = DeviceUse(
            weights=model.base_weight_bytes,
            kv_cache=kv_cache_bytes(model, self.ctx, self.kv_type),
            recurrent_state=recurrent_state_bytes(model),
            compute=accelerator_compute_bytes(model, self.ctx, self.n_ubatch, self.flash_attn, self.all_outputs),
            runtime_reserve=accelerator.runtime_reserve,
        )
        draft = self.draft_use(model)
        if draft is None:
            return use
        return DeviceUse(**{part: n + draft.fixed_accelerator.get(part, 0) for part, n in use.parts().items()})

    def needed(self, model: ModelFigures, accelerator: Accelerator, mode: str) -> int:
        """The least budget: every expert in host memory, plus the margin for the estimates."""
        use = self.fixed_use(model, accelerator)
        host = [i for i in range(model.n_layer) if model.expert_bytes(i)]
        staging = staging_bytes(model, accelerator, host, mode, ubatch_tokens(self.ctx, self.n_ubatch))
        return use.total + staging + estimate_margin(use)


def estimate_margin(use: DeviceUse) -> int:
    """Bytes a plan leaves free beyond its prediction: a share of its estimated parts (compute
    buffers, runtime reserve), the error those estimates may have on a real GPU."""
    return math.ceil(ESTIMATE_MARGIN_SHARE * sum(getattr(use, part) for part in DeviceUse.ESTIMATES))


def largest_ctx(model: ModelFigures, accelerator: Accelerator, budget: int, mode: str, sizing: Sizing) -> int:
    """The largest context (at most the trained one) whose least budget fits `budget`, by
    bisection over the memory model; 0 when not even MIN_CTX tokens fit."""
    return largest_fitting_ctx(model, lambda ctx: replace(sizing, ctx=ctx).needed(model, accelerator, mode) <= budget)


def largest_fitting_ctx(model: ModelFigures, fits: Callable[[int], bool]) -> int:
    """The largest context from MIN_CTX up to the trained one that `fits` (which must stay false
    once it turns false as the context grows), by bisection; 0 when not even MIN_CTX fits."""
    low, high = MIN_CTX, model.n_ctx_train or 2**24
    if not fits(low):
        return 0
    if fits(high):
        return high
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def shrink_advice(model: ModelFigures, accelerator: Accelerator, mode: str, sizing: Sizing) -> list[str]:
    """The flags that would lower the least budget, each with the bytes it saves: a smaller
    --batch (it sizes the compute buffer), half the --ctx, the next smaller --kv-type, no MTP drafts."""
    need = sizing.needed(model, accelerator, mode)
    options = []
    if ubatch_tokens(sizing.ctx, sizing.n_ubatch) > SMALL_BATCH:
        options.append((f"--batch {SMALL_BATCH}", replace(sizing, n_ubatch=SMALL_BATCH)))
    if sizing.ctx // 2 >= MIN_CTX:
        options.append((f"--ctx {sizing.ctx // 2}", replace(sizing, ctx=sizing.ctx // 2)))
    smaller = KV_TYPES[KV_TYPES.index(sizing.kv_type) + 1:] if sizing.kv_type in KV_TYPES else ()
    if smaller and sizing.flash_attn:
        options.append((f"--kv-type {smaller[0]}", replace(sizing, kv_type=smaller[0])))
    if sizing.draft_max:
        options.append(("--draft off", replace(sizing, draft_max=0)))
    advice = []
    for flag, other in options:
        try:
            saved = need - other.needed(model, accelerator, mode)
        except UserError:  # a KV type whose blocks do not fit this model's rows
            continue
        if saved > 0:
            advice.append(f"{flag} saves {human_bytes(saved)}")
    return advice
