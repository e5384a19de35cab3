"""The test models' tokenizer: 256 byte symbols, a few dozen English BPE merges and the special
tokens, and the chat templates a model can carry."""

from __future__ import annotations

import pathlib
from typing import Dict, List

# GGUF token types
TOKEN_NORMAL = 1
TOKEN_CONTROL = 3

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

# Chat templates a test model can carry (``chat_template=``): "chatml" is the plain one above;
# "qwen3.5" (tool calls as <tool_call><function=..><parameter=..>, thinking opened by the
# generation prompt, enable_thinking) and "qwen3" (JSON tool calls in <tool_call>, thinking the
# model opens itself) are the model family's own templates, kept as data in tools/chat_templates.
_TEMPLATE_DIR = pathlib.Path(__file__).resolve().parents[1] / "chat_templates"
CHAT_TEMPLATES = ("chatml", "qwen3.5", "qwen3")


def chat_template_text(name: str) -> str:
    """The text of the chat template called ``name`` (one of ``CHAT_TEMPLATES``)."""
    if name not in CHAT_TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; expected one of {CHAT_TEMPLATES}")
    return CHAT_TEMPLATE if name == "chatml" else (_TEMPLATE_DIR / f"{name}.jinja").read_text()


# A few dozen byte-level BPE merges of common English pairs, in GPT-2's
# byte-to-unicode spelling ("Ġ" is a space, "Ċ" a newline). Merge order is rank.
_MERGES = (
    "Ġ t", "Ġ a", "h e", "i n", "r e", "o n", "Ġt he", "e r", "Ġ s", "a t",
    "Ġ w", "Ġ o", "e n", "Ġ c", "i t", "i s", "a n", "o r", "e s", "Ġ b",
    "e d", "Ġ f", "in g", "Ġ p", "o u", "Ġa n", "a l", "a r", "Ġt o", "Ġ m",
    "Ġo f", "Ġ in", "Ġ d", "Ġ h", "Ġan d", "i c", "a s", "l e", "Ġt h", "i on",
    "o m", "l l", "en t", "Ġ n", "Ġ l", "s t", "Ġ re", "v e", "Ġ e", "r o",
    "l y", "Ġb e", "Ġ g", "Ġ T", "c t", "Ġ S", "i d", "o t", "Ġ I", "u t",
    "e t", "Ġ A", "Ġ is", "Ġo n", "Ġ y", "Ġy ou", "Ġw h", "Ġh e", "Ġ H", "Ġw it",
    "Ġwit h", "Ġth at", "Ġf or", "Ġ Ġ", "Ċ Ċ", "e l", "l o",
)


# ---------------------------------------------------------------------------
# tokenizer


def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character mapping."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping: Dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def build_tokenizer() -> Dict[str, object]:
    """Build the vocabulary: 256 byte symbols (id == byte value), merged
    tokens, then the special tokens. Returns a dict with ``tokens``,
    ``types``, ``merges`` and the ids of the special tokens."""
    byte_map = bytes_to_unicode()
    tokens: List[str] = [byte_map[b] for b in range(256)]
    seen = set(tokens)
    merges: List[str] = []
    for merge in _MERGES:
        left, right = merge.split(" ")
        if left not in seen or right not in seen:
            raise AssertionError(f"merge {merge!r} uses an unknown token")
        if merge in merges:
            raise AssertionError(f"duplicate merge {merge!r}")
        merges.append(merge)
        merged = left + right
        if merged not in seen:
            seen.add(merged)
            tokens.append(merged)
    types = [TOKEN_NORMAL] * len(tokens)
    ids = {}
    for special in SPECIAL_TOKENS:
        ids[special] = len(tokens)
        tokens.append(special)
        types.append(TOKEN_CONTROL)
    return {
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "bos_id": ids["<|endoftext|>"],
        "eos_id": ids["<|im_end|>"],
        "pad_id": ids["<|endoftext|>"],
        "im_start_id": ids["<|im_start|>"],
        "control_ids": [ids[s] for s in SPECIAL_TOKENS],
    }
