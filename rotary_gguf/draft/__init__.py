"""Speculative decoding with drafts from the model itself: the modes, their defaults and the checks
a model file must pass (light, for the command line); `mtp` runs the drafts."""

from __future__ import annotations

from ..errors import UserError

DRAFT_MODES = ("off", "mtp")  # what the engine takes
# what the command line takes: auto drafts where `bench` measured drafts faster (`verdict`)
DRAFT_SETTINGS = ("auto", "mtp", "off")
DEFAULT_DRAFT_MAX = 3  # drafts per round at most; the round's length adapts to acceptance below it
MAX_DRAFT_MAX = 16


def check_mtp(inv, draft_max: int, n_ubatch: int) -> None:
    """UserError unless the model file `inv` (an Inventory) carries an MTP block llama.cpp runs,
    with `draft_max` drafts a round in micro-batches of `n_ubatch` tokens."""
    if not 1 <= draft_max <= MAX_DRAFT_MAX:
        raise UserError(f"--draft-max must be between 1 and {MAX_DRAFT_MAX} (got {draft_max})")
    if n_ubatch <= draft_max + 1:  # a round's token and drafts, and its rollback, need one micro-batch
        raise UserError(f"--draft-max {draft_max} needs a micro-batch (--ubatch) of more than {draft_max + 1} tokens, not {n_ubatch}")
    if inv.hparam("nextn_predict_layers") < 1:
        raise UserError(f"{inv.path.name} has no multi-token-prediction (MTP) block; use --draft off")
    if inv.arch not in ("qwen35", "qwen35moe"):
        raise UserError(f"MTP drafts are not supported for arch {inv.arch} (only qwen35/qwen35moe); use --draft off")
    from .. import native

    if not native.nextn_available():
        raise UserError("this llama.cpp build has no NextN (MTP) API; use --draft off")


def draft_setting(value: str) -> str:
    """--draft as the commands take it: auto, mtp or off."""
    if value not in DRAFT_SETTINGS:
        raise UserError(f"unknown draft mode {value!r} (known: {', '.join(DRAFT_SETTINGS)})")
    return value


def has_mtp(inv) -> bool:
    """Whether the model file `inv` has an MTP block this build drafts with (no error when not)."""
    try:
        check_mtp(inv, DEFAULT_DRAFT_MAX, DEFAULT_DRAFT_MAX + 2)
    except UserError:
        return False
    return True


def mtp_expert_overrides(inv, placement) -> tuple[tuple[str, str], ...]:
    """Where a placement does not say (`Placement.draft_overrides` None: not a plan's), the MTP
    block's routed experts stay in host memory beside an accelerator, as a host block's do."""
    from ..arch import expert_pattern
    from ..plan import HOST_BUFFER_TYPE

    if placement.n_gpu_layers == 0:
        return ()
    return ((expert_pattern([inv.n_layer - inv.hparam("nextn_predict_layers")]), HOST_BUFFER_TYPE),)
