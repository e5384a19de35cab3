"""What drafting with the model's multi-token-prediction (MTP) block adds to a plan's memory,
following llama.cpp's sizing (src/llama-model.cpp create_memory, src/llama-memory-recurrent.cpp,
src/llama-context.cpp):

- the MTP block's weights: all but its routed experts on the accelerator (it is one more layer
  there); the experts resident when the budget has room after the trunk's blocks, else in host
  memory, like the experts of a host block;
- the MTP context's KV cache: a plain attention cache holding only the MTP block (its other blocks
  are filtered out), as long as the target's context;
- `draft_max` more copies of the target's recurrent state: llama.cpp keeps `n_rs_seq` per-token
  snapshots of every linear-attention block's conv and SSM state (rows of `(1 + n_rs_seq)` times
  the cells) to roll rejected drafts back;
- the MTP context's compute buffer (one full-attention MoE block and the output head), and the
  verify batch's logits: both contexts reserve `draft_max + 1` output rows instead of one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import UserError
from .figures import ModelFigures
from .memory import accelerator_compute_bytes, host_compute_bytes, kv_cache_bytes, recurrent_state_bytes


@dataclass(frozen=True)
class DraftUse:
    """The bytes drafting adds, by part; `experts` live where `experts_resident` says."""

    draft_max: int
    weights: int  # the MTP block's non-expert weights (accelerator)
    experts: int  # its routed experts
    kv_cache: int  # the MTP context's KV cache (accelerator)
    recurrent_copies: int  # the target's n_rs_seq recurrent-state snapshots (accelerator)
    compute: int  # the MTP context's accelerator compute buffer (estimate)
    verify_outputs: int  # the target's compute buffer grows by the verify batch's logits (estimate)
    host_compute: int  # the MTP context's host compute buffer (estimate)
    host_outputs: int  # logits and hidden states both contexts copy out (host)
    experts_resident: bool = False
    reason: str = ""  # why the experts live where they do

    @classmethod
    def size(cls, model: ModelFigures, draft_max: int, ctx: int, n_ubatch: int, kv_type: str, flash_attn: bool,
             experts_on_cpu: bool, all_outputs: bool = False) -> "DraftUse":
        """What `draft_max` drafts a round need beside the target's context of `ctx` tokens (whose
        compute buffer already holds every token's logits with `all_outputs`)."""
        if not model.mtp_tensors:
            raise UserError(f"{model.name} has no multi-token-prediction (MTP) block to draft with; use --draft off")
        n_mtp = len(model.mtp_blocks)
        head = replace(model, attention=("full",) * n_mtp, tensors=model.mtp_tensors)
        outputs = n_ubatch if all_outputs else draft_max + 1
        one_output = accelerator_compute_bytes(model, ctx, n_ubatch, flash_attn, all_outputs)
        return cls(
            draft_max=draft_max,
            weights=model.mtp_base_bytes,
            experts=model.mtp_expert_bytes,
            kv_cache=kv_cache_bytes(head, ctx, kv_type),
            recurrent_copies=draft_max * recurrent_state_bytes(model),
            compute=accelerator_compute_bytes(head, ctx, n_ubatch, flash_attn, n_outputs=outputs),
            verify_outputs=(accelerator_compute_bytes(model, ctx, n_ubatch, flash_attn, all_outputs, n_outputs=outputs)
                            - one_output),
            host_compute=host_compute_bytes(head, ctx, n_ubatch, experts_on_cpu, flash_attn),
            host_outputs=4 * (2 * outputs * model.n_vocab - model.n_vocab + outputs * model.n_embd),
        )

    @property
    def fixed_accelerator(self) -> dict[str, int]:
        """The accelerator's bytes by DeviceUse part, whatever the experts do."""
        return {"weights": self.weights, "kv_cache": self.kv_cache, "recurrent_state": self.recurrent_copies,
                "compute": self.compute + self.verify_outputs}

    def lines(self) -> list[tuple[str, int, int]]:
        """(part, accelerator bytes, host bytes) for a plan's table."""
        experts = (self.experts, 0) if self.experts_resident else (0, self.experts)
        return [("MTP block weights", self.weights, 0), ("MTP block experts", *experts),
                ("MTP KV cache", self.kv_cache, 0),
                (f"recurrent snapshots ({self.draft_max})", self.recurrent_copies, 0),
                ("MTP compute ~", self.compute, self.host_compute),
                (f"verify outputs ({self.draft_max + 1}) ~", self.verify_outputs, self.host_outputs)]

    def to_json(self) -> dict:
        return {"draft_max": self.draft_max, "experts": "accelerator" if self.experts_resident else "host",
                "experts_reason": self.reason,
                "accelerator": {"weights": self.weights, "experts": self.experts if self.experts_resident else 0,
                                "kv_cache": self.kv_cache, "recurrent_copies": self.recurrent_copies,
                                "compute": self.compute, "verify_outputs": self.verify_outputs},
                "host": {"experts": 0 if self.experts_resident else self.experts, "compute": self.host_compute,
                         "outputs": self.host_outputs}}
