"""Every tensor and metadata name the tool relies on, declared once.

inventory, convert, plan and the engine all ask this module what an expert tensor is, so a new
architecture is added here and nowhere else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Routed-expert weights: blk.N.ffn_{gate,up,down,gate_up}_exps.weight. `kind` is the part after ffn_.
EXPERT_TENSOR = re.compile(r"^blk\.(?P<layer>\d+)\.ffn_(?P<kind>gate_up|gate|up|down)_exps\.weight$")
BLOCK_TENSOR = re.compile(r"^blk\.(?P<layer>\d+)\.")
# Per-expert companions of the expert weights, ne {n_expert}: llama.cpp loads
# blk.N.ffn_{gate,up,down}_exps.scale for every arch (src/llama-model.cpp, "MoE expert weight scales").
EXPERT_SIDE_TENSOR = re.compile(r"^blk\.(?P<layer>\d+)\.ffn_(?P<kind>gate_up|gate|up|down)_exps\.(?P<part>scale|bias)$")

# The same set as a llama.cpp tensor_buft_overrides pattern (regex_search on the tensor name).
# It must match the fused name too: a fused tensor left out of a host override would stay on the
# accelerator while the rest of the layer's experts go to host.
EXPERT_KINDS_PATTERN = r"ffn_(gate_up|gate|up|down)_exps"

# Metadata written by our converter.
ROTARY_LAYOUT_KEY = "rotary.layout_version"
ROTARY_CONVERTER_KEY = "rotary.converter_version"
ROTARY_PERMUTATION_KEY = "rotary.expert_order.blk.{layer}"  # int32 array: new id -> original id
ROTARY_KEY_PREFIX = "rotary."
LAYOUT_VERSION = 1

# Blocks at the end of the file that are multi-token-prediction heads (loaded only on request).
NEXTN_LAYERS_HPARAM = "nextn_predict_layers"


@dataclass(frozen=True)
class ArchSpec:
    """What rotary-gguf knows about one MoE architecture."""

    name: str
    # Per-expert tensors besides the expert weights (outer dimension = expert), permuted together
    # with the experts when the converter reorders them. The router's rows are per expert too.
    per_expert_tensors: tuple[str, ...]
    has_shared_expert: bool
    # Whether llama.cpp's loader for this arch reads a fused ffn_gate_up_exps (create_tensor_gate_up_exps).
    # Where it does not, a fused tensor would leave the model unloadable.
    loads_fused_gate_up: bool = False

    def permuted_with_experts(self, tensor_name: str) -> bool:
        """True for every tensor whose outer dimension is the expert id: the expert weights, their
        per-expert scales/biases, and the arch's per-expert tensors (router rows)."""
        if EXPERT_TENSOR.match(tensor_name) or EXPERT_SIDE_TENSOR.match(tensor_name):
            return True
        m = BLOCK_TENSOR.match(tensor_name)
        return bool(m) and tensor_name[m.end() :].rsplit(".", 1)[0] in self.per_expert_tensors


# Architectures whose expert layout, routing and per-expert tensors were checked against
# llama.cpp's source (src/llama-model.cpp, src/llama-graph.cpp): softmax routing, no expert bias.
# Only the qwen35moe loader reads a fused gate+up (src/models/qwen35moe.cpp); qwen3moe's requires
# separate ffn_gate_exps and ffn_up_exps (src/models/qwen3moe.cpp).
SUPPORTED = {
    "qwen3moe": ArchSpec("qwen3moe", per_expert_tensors=("ffn_gate_inp",), has_shared_expert=False),
    "qwen35moe": ArchSpec(
        "qwen35moe", per_expert_tensors=("ffn_gate_inp",), has_shared_expert=True, loads_fused_gate_up=True
    ),
}


def block_index(tensor_name: str) -> int | None:
    """The block (layer) number of a tensor name, or None for global tensors."""
    m = BLOCK_TENSOR.match(tensor_name)
    return int(m.group("layer")) if m else None


def expert_kind(tensor_name: str) -> str | None:
    """'gate', 'up', 'down' or 'gate_up' for a routed-expert weight, else None."""
    m = EXPERT_TENSOR.match(tensor_name)
    return m.group("kind") if m else None


def expert_tensor_name(layer: int, kind: str) -> str:
    """blk.N.ffn_<kind>_exps.weight, e.g. expert_tensor_name(3, 'gate_up')."""
    return f"blk.{layer}.ffn_{kind}_exps.weight"


def expert_pattern(layers: list[int] | None = None) -> str:
    """llama.cpp override regex for the routed-expert tensors of `layers` (None: every block)."""
    if layers is None:
        return rf"\.{EXPERT_KINDS_PATTERN}\."
    alternatives = "|".join(str(i) for i in sorted(layers))
    return rf"^blk\.({alternatives})\.{EXPERT_KINDS_PATTERN}\."


def hparam(arch: str, name: str) -> str:
    """Key of an architecture hyperparameter, e.g. hparam('qwen3moe', 'expert_count')."""
    return f"{arch}.{name}"
