"""What the planner knows of a model, an accelerator and the link between host and accelerator."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from .. import arch as names
from ..errors import UserError
from ..inventory import Inventory
from .settings import CUDA_RUNTIME_RESERVE


@dataclass(frozen=True)
class Accelerator:
    """The device the plan fills, as the planner needs to know it."""

    name: str  # ggml device name, e.g. "CUDA0", "RPC0"
    buffer_type: str  # its buffer type name as llama.cpp names it, e.g. "CUDA0", "RPC0[127.0.0.1:50052]"
    pinned_host_buffer_type: str | None  # page-locked host memory for fast uploads ("CUDA_Host"), if any
    free_bytes: int | None  # free memory the device reports; None when it is not on this machine
    streams_host_ops: bool  # a GPU backend with offload_op: can run host-resident expert ops (rotary)
    runtime_reserve: int  # memory it uses outside llama.cpp's buffers (estimate)
    present: bool = True

    @classmethod
    def planned_cuda(cls) -> "Accelerator":
        """A CUDA GPU this machine does not have: plan for it, from the budget alone."""
        return cls("CUDA0", "CUDA0", "CUDA_Host", None, True, CUDA_RUNTIME_RESERVE, present=False)

    @property
    def kind(self) -> str:
        if not self.present:
            return "planned"
        return "gpu" if self.streams_host_ops else "rpc"


@dataclass(frozen=True)
class ModelFigures:
    """What the planner needs to know about a model: the bytes of every tensor llama.cpp loads and
    the hyperparameters that size the KV cache, recurrent state and compute buffers."""

    name: str
    arch: str
    n_layer: int  # blocks llama.cpp runs (a NextN/MTP head it skips is not counted)
    tensors: tuple[tuple[str, int], ...]  # (name, bytes) of every tensor llama.cpp loads
    attention: tuple[str, ...]  # per block: "full" (KV cache) or "linear" (recurrent state)
    n_vocab: int
    n_embd: int
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    recurrent_conv: int = 0  # conv-state floats per linear-attention block and sequence (n_embd_r)
    recurrent_ssm: int = 0  # ssm-state floats per linear-attention block and sequence (n_embd_s)
    recurrent_width: int = 0  # widest per-token activation of a linear-attention block, in floats
    n_ctx_train: int = 0  # the context the model was trained for; 0: not known
    mtp_tensors: tuple[tuple[str, int], ...] = ()  # (name, bytes) of its multi-token-prediction (NextN) blocks
    n_nextn: int = 0  # NextN/MTP blocks after the `n_layer` that run: llama.cpp still counts them in its layer split

    @classmethod
    def from_inventory(cls, inv: Inventory) -> "ModelFigures":
        """The figures of a GGUF file, from its header."""
        if not inv.is_moe:
            raise UserError(f"{inv.path.name} is not a Mixture-of-Experts model: there are no expert tensors to place")
        n_mtp = inv.hparam("nextn_predict_layers")
        n_layer = inv.n_layer - n_mtp  # llama.cpp skips the NextN head's tensors unless asked for it
        tensors = tuple(
            (t.name, t.nbytes) for t in inv.tensors if t.layer is None or t.layer < n_layer
        )
        d_conv, d_inner = inv.hparam("ssm.conv_kernel"), inv.hparam("ssm.inner_size")
        n_group, d_state = inv.hparam("ssm.group_count"), inv.hparam("ssm.state_size")
        n_v_heads = inv.hparam("ssm.time_step_rank")
        conv_channels = d_inner + 2 * n_group * d_state
        embd = inv.by_name.get("token_embd.weight")
        return cls(
            name=inv.path.name,
            arch=inv.arch,
            n_layer=n_layer,
            tensors=tensors,
            attention=tuple(inv.attention_layout()[:n_layer]),
            n_vocab=embd.shape[1] if embd else 0,
            n_embd=inv.n_embd,
            n_expert=inv.n_expert,
            n_expert_used=inv.n_expert_used,
            n_ff_exp=inv.n_ff_exp,
            n_head=inv.n_head,
            n_head_kv=inv.n_head_kv,
            head_dim_k=inv.head_dim_k,
            head_dim_v=inv.head_dim_v,
            recurrent_conv=max(d_conv - 1, 0) * conv_channels,
            recurrent_ssm=d_state * d_inner,
            # conv input and output, the output gate, and the delta rule's 64-token chunk matrices
            recurrent_width=2 * conv_channels + d_inner + 4 * 64 * n_v_heads,
            n_ctx_train=inv.hparam("context_length"),
            mtp_tensors=tuple((t.name, t.nbytes) for t in inv.tensors if t.layer is not None and t.layer >= n_layer),
            n_nextn=n_mtp,
        )

    # --- derived sizes ---------------------------------------------------------------------------
    @cached_property
    def expert_tensors(self) -> dict[int, list[int]]:
        """Per block: the bytes of each routed-expert tensor."""
        out: dict[int, list[int]] = {}
        for tensor, nbytes in self.tensors:
            if names.expert_kind(tensor):
                out.setdefault(names.block_index(tensor), []).append(nbytes)
        return out

    def expert_bytes(self, layer: int) -> int:
        return sum(self.expert_tensors.get(layer, ()))

    @cached_property
    def base_weight_bytes(self) -> int:
        """Weights on the accelerator when no expert is: everything but the experts and the token
        embeddings, plus a copy of the embeddings when the model has no separate output tensor
        (llama.cpp duplicates them into the output layer)."""
        by_name = dict(self.tensors)
        other = sum(n for t, n in self.tensors if not names.expert_kind(t) and t != "token_embd.weight")
        tied = "output.weight" not in by_name
        return other + (by_name.get("token_embd.weight", 0) if tied else 0)

    @property
    def mtp_expert_bytes(self) -> int:
        """The routed experts of the MTP blocks (llama.cpp loads them only for drafting)."""
        return sum(n for t, n in self.mtp_tensors if names.expert_kind(t))

    @property
    def mtp_base_bytes(self) -> int:
        """The MTP blocks' other weights: attention, router, shared expert and the NextN projection."""
        return sum(n for t, n in self.mtp_tensors if not names.expert_kind(t))

    @property
    def mtp_blocks(self) -> list[int]:
        return sorted({names.block_index(t) for t, _ in self.mtp_tensors})
    def block_weight_bytes(self, layer: int) -> int:
        """The bytes of block `layer`'s tensors other than its routed experts."""
        return sum(n for t, n in self.tensors if names.block_index(t) == layer and not names.expert_kind(t))

    @cached_property
    def output_weight_bytes(self) -> int:
        """The bytes of llama.cpp's output layer: the tensors outside the blocks (the token
        embeddings aside, or their copy when the model has no output tensor)."""
        return self.base_weight_bytes - sum(self.block_weight_bytes(i) for i in range(self.n_layer))

    @cached_property
    def embedding_bytes(self) -> int:
        return dict(self.tensors).get("token_embd.weight", 0)

    @property
    def moe_width(self) -> int:
        """Per-token floats live in one MoE block: router logits and probabilities, the experts'
        gate/up/activation, and their outputs before the weighted sum."""
        return 2 * self.n_expert + 3 * self.n_expert_used * self.n_ff_exp + self.n_expert_used * self.n_embd


@dataclass(frozen=True)
class LinkFigures:
    """Measured speeds that decide the host-expert mode on a GPU machine."""

    upload_bytes_per_s: float  # host -> accelerator, from pinned memory
    cpu_expert_bytes_per_s: float  # CPU matrix-vector throughput over expert weights
