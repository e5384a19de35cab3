"""What a structurally sound GGUF must also satisfy before any figure of it is trusted: the type
and range of every metadata key rotary-gguf reads, and agreement between those keys and the tensors.

The ranges hold every real model we target (Qwen3.5/3.6-35B-A3B: 40-41 blocks, 256 experts, n_embd
2048) with room to spare, and stop at llama.cpp's own limits (LLAMA_MAX_LAYERS, LLAMA_MAX_EXPERTS)
where it has them, so that a corrupted count can never drive a loop or an allocation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import arch as names

if TYPE_CHECKING:
    from .inventory import Inventory

MAX_LAYERS = 512  # llama.cpp's LLAMA_MAX_LAYERS
MAX_EXPERTS = 1024  # llama.cpp's LLAMA_MAX_EXPERTS
_WIDTH = 2**20  # embedding, FFN and state widths
_HEADS = 2**14


class CorruptGGUF(ValueError):
    """A GGUF file breaks a rule; the message names the field."""


# arch hyperparameter -> (smallest, largest, may be a per-block array). None: depends on other keys.
# A key that is present must be usable: widths and counts start at 1, except where 0 means "none".
# In a per-block array 0 is allowed (a block without attention heads).
HPARAM_RANGES: dict[str, tuple[int, int | None, bool]] = {
    "block_count": (1, MAX_LAYERS, False),
    "expert_count": (0, MAX_EXPERTS, False),
    "expert_used_count": (0, None, False),  # 1 to expert_count
    "nextn_predict_layers": (0, None, False),  # fewer than block_count
    "embedding_length": (1, _WIDTH, False),
    "expert_feed_forward_length": (1, _WIDTH, False),
    "expert_shared_feed_forward_length": (0, _WIDTH, False),
    "attention.head_count": (1, _HEADS, True),
    "attention.head_count_kv": (1, _HEADS, True),
    "attention.key_length": (1, 2**16, False),
    "attention.value_length": (1, 2**16, False),
    "ssm.conv_kernel": (1, 2**10, False),
    "ssm.inner_size": (1, _WIDTH, False),
    "ssm.group_count": (1, _HEADS, False),
    "ssm.state_size": (1, 2**14, False),
    "ssm.time_step_rank": (1, _HEADS, False),
    "expert_group_count": (0, None, False),  # fewer than expert_count
    "expert_group_used_count": (0, None, False),  # fewer than expert_group_count
    "rope.dimension_count": (1, 2**16, False),
}
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")  # llama.cpp aborts on any other
F32 = 0
NOT_WEIGHT_TYPES = {9, 15, 24, 25, 26, 27, 28}  # Q8_1, Q8_K (dot-product only), I8, I16, I32, I64, F64
STRING_KEYS = ("general.architecture", "tokenizer.chat_template")


def check_inventory(inv: Inventory) -> None:
    """Raise CorruptGGUF for the first key or tensor that breaks a rule."""
    for key in STRING_KEYS:
        if key in inv.metadata and not isinstance(inv.metadata[key], str):
            raise CorruptGGUF(f"{key} must be a string")
    _check_hparams(inv)
    _check_what_llama_cpp_asserts(inv)
    _check_tensors_agree(inv)
    _check_tensor_types(inv)
    _check_expert_orders(inv)


def _check_hparams(inv: Inventory) -> None:
    n_layer = n_expert = 0
    for name, (low, high, per_block) in HPARAM_RANGES.items():
        key = names.hparam(inv.arch, name)
        if key not in inv.metadata:
            continue
        if name == "expert_used_count":
            low, high = (1 if n_expert else 0), n_expert
        elif name == "nextn_predict_layers":
            high = n_layer - 1
        elif name == "expert_group_count":
            high = max(n_expert - 1, 0)
        elif name == "expert_group_used_count":
            groups = inv.hparam("expert_group_count")
            low, high = (1, groups - 1) if groups > 1 else (0, 0)
        values = _integers(key, inv.metadata[key], per_block, n_layer)
        if len(values) > 1 or isinstance(inv.metadata[key], list):
            low = 0
        for v in values:
            if not low <= v <= high:
                raise CorruptGGUF(f"{key} = {v} is out of range ({low} to {high})")
        if name == "block_count":
            n_layer = values[0]
        elif name == "expert_count":
            n_expert = values[0]


def _check_what_llama_cpp_asserts(inv: Inventory) -> None:
    """Key combinations that make llama.cpp abort the process (GGML_ASSERT while loading, or
    while building the first graph) rather than refuse the file."""
    key = lambda name: names.hparam(inv.arch, name)  # noqa: E731
    if inv.n_expert and key("expert_used_count") not in inv.metadata:
        raise CorruptGGUF(f"{key('expert_count')} is {inv.n_expert}, but {key('expert_used_count')} is missing")
    groups = inv.hparam("expert_group_count")
    if groups > 1 and inv.n_expert % groups:
        raise CorruptGGUF(f"{key('expert_group_count')} = {groups} does not divide the {inv.n_expert} experts")
    if groups > 1 and key("expert_group_used_count") not in inv.metadata:
        raise CorruptGGUF(f"{key('expert_group_count')} is {groups}, but {key('expert_group_used_count')} is missing")
    scaling = inv.metadata.get(key("rope.scaling.type"), "linear")
    if scaling not in ROPE_SCALING_TYPES:
        raise CorruptGGUF(f"{key('rope.scaling.type')} must be one of {', '.join(ROPE_SCALING_TYPES)}, not {scaling!r}")
    if inv.arch not in names.SUPPORTED:
        return
    # qwen3moe and qwen35moe: one head size for keys and values; qwen3moe rotates all of it
    head_k = inv.hparam("attention.key_length") or inv.n_embd // max(inv.hparam("attention.head_count"), 1)
    head_v = inv.hparam("attention.value_length") or head_k
    if head_k != head_v:
        raise CorruptGGUF(f"{key('attention.key_length')} ({head_k}) and {key('attention.value_length')} ({head_v}) differ")
    n_rot = inv.hparam("rope.dimension_count", head_k)
    if inv.arch == "qwen3moe" and n_rot != head_k:
        raise CorruptGGUF(f"{key('rope.dimension_count')} = {n_rot} is not the head size {head_k}")
    if n_rot > head_k:
        raise CorruptGGUF(f"{key('rope.dimension_count')} = {n_rot} is more than the head size {head_k}")
    sections = inv.metadata.get(key("rope.dimension_sections"))
    if sections is not None:
        if not (isinstance(sections, list) and len(sections) <= 4 and all(_is_int(v) and v >= 0 for v in sections)):
            raise CorruptGGUF(f"{key('rope.dimension_sections')} must be up to 4 non-negative integers")
        if sum(sections) > n_rot:
            raise CorruptGGUF(f"{key('rope.dimension_sections')} {sections} add up to more than the {n_rot} rotated dimensions")
    v_heads, k_heads = inv.hparam("ssm.time_step_rank"), inv.hparam("ssm.group_count")
    if v_heads and k_heads and v_heads % k_heads:
        raise CorruptGGUF(f"{key('ssm.time_step_rank')} ({v_heads}) is not a multiple of {key('ssm.group_count')} ({k_heads})")


def _integers(key: str, value: object, per_block: bool, n_layer: int) -> list[int]:
    """The integers of a scalar, or of a per-block array with one entry per block."""
    if _is_int(value):
        return [value]
    if per_block and isinstance(value, list) and all(_is_int(v) for v in value):
        if len(value) != n_layer:
            raise CorruptGGUF(f"{key} has {len(value)} entries for {n_layer} blocks")
        return value
    kind = "an integer or one integer per block" if per_block else "an integer"
    return _wrong_type(key, kind, value)


def _wrong_type(key: str, wanted: str, value: object):
    found = {bool: "a bool", int: "an integer", float: "a float", str: "a string"}.get(type(value), "an array")
    raise CorruptGGUF(f"{key} must be {wanted}, not {found}")


def _is_int(value: object) -> bool:
    return type(value) is int  # not bool, not float


def _check_tensors_agree(inv: Inventory) -> None:
    """Tensors for every block of block_count and none beyond; expert tensors [.., .., n_expert] with a matching expert_count."""
    n_layer = inv.n_layer
    blocks = {t.layer for t in inv.tensors}
    if inv.tensors and not blocks >= set(range(n_layer)):
        missing = min(set(range(n_layer)) - blocks)
        raise CorruptGGUF(f"block {missing} has no tensors, but block_count says {n_layer} blocks")
    for t in inv.tensors:
        if t.layer is not None and t.layer >= n_layer:
            raise CorruptGGUF(f"tensor {t.name!r} is in block {t.layer}, but the model has {n_layer} blocks (block_count)")
        if t.expert_kind is None:
            continue
        if len(t.shape) != 3 or t.shape[2] != inv.n_expert:
            raise CorruptGGUF(
                f"tensor {t.name!r} has shape {list(t.shape)}; expected 3 dimensions, the last the "
                f"{inv.n_expert} experts of {names.hparam(inv.arch, 'expert_count')}"
            )
        rows = _expert_rows(inv, t.expert_kind)
        if rows and tuple(t.shape[:2]) != rows:
            raise CorruptGGUF(f"tensor {t.name!r} has shape {list(t.shape)}; embedding_length and "
                              f"expert_feed_forward_length say {[*rows, inv.n_expert]}")
    embd = inv.by_name.get("token_embd.weight")
    if embd is not None and inv.n_embd and embd.shape[:1] != (inv.n_embd,):
        raise CorruptGGUF(f"tensor 'token_embd.weight' has shape {list(embd.shape)}; embedding_length is {inv.n_embd}")


def _check_tensor_types(inv: Inventory) -> None:
    """Weights in types llama.cpp computes with: never integers or F64 (its kernels assert on
    them), and F32 for every 1-dimensional tensor (norms, SSM parameters), as its converters write."""
    for t in inv.tensors:
        if t.ggml_type in NOT_WEIGHT_TYPES:
            raise CorruptGGUF(f"tensor {t.name!r} is {t.type_name}, which is not a weight type")
        if len(t.shape) == 1 and t.ggml_type != F32:
            raise CorruptGGUF(f"tensor {t.name!r} is 1-dimensional but {t.type_name}, not F32")


def _expert_rows(inv: Inventory, kind: str) -> tuple[int, int] | None:
    """The first two dimensions an expert tensor of `kind` has, where the hyperparameters say."""
    n_embd, n_ff = inv.n_embd, inv.n_ff_exp
    if not (n_embd and n_ff):
        return None
    return {"gate": (n_embd, n_ff), "up": (n_embd, n_ff), "gate_up": (n_embd, 2 * n_ff), "down": (n_ff, n_embd)}[kind]


def _check_expert_orders(inv: Inventory) -> None:
    """Our converter's per-block expert orders: permutations of the experts, for existing blocks."""
    prefix = names.ROTARY_PERMUTATION_KEY.split("{", 1)[0]
    identity = list(range(inv.n_expert))
    for key, value in inv.metadata.items():
        if not key.startswith(prefix):
            continue
        layer = key[len(prefix) :]
        if not layer.isdigit() or int(layer) >= inv.n_layer:
            raise CorruptGGUF(f"{key} names no block of the model")
        if not isinstance(value, list) or not all(_is_int(v) for v in value):
            _wrong_type(key, "an array of integers", value)
        if sorted(value) != identity:
            raise CorruptGGUF(f"{key} is not a permutation of the {inv.n_expert} experts")
    layout = inv.metadata.get(names.ROTARY_LAYOUT_KEY)
    if layout is not None and not _is_int(layout):
        _wrong_type(names.ROTARY_LAYOUT_KEY, "an integer", layout)
