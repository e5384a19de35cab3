"""The tokenizer: byte-level BPE with llama.cpp's "qwen2" pre-tokenizer split, its training (cached
in the work directory) and the token streams it makes of the documents."""

from __future__ import annotations

import heapq
import json
import math
import pathlib
import re
import sys
import unicodedata
from collections import Counter
from functools import lru_cache

import numpy as np

from synthetic_models.tokenizer import SPECIAL_TOKENS, TOKEN_CONTROL, TOKEN_NORMAL, bytes_to_unicode

from .corpus import ENDOFTEXT, IM_END, Document, format_document
from .settings import Settings


PRE_TOKENIZER = "qwen2"
# llama.cpp's unicode_set_whitespace (src/unicode-data.cpp); Python's \s also matches \x1c-\x1f
_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


@lru_cache(maxsize=1)
def _pretokenizer() -> re.Pattern:
    """llama.cpp's qwen2 split regex, with \\p{L}, \\p{N} and \\s spelled as Python classes."""

    def ranges(prefix: str) -> str:
        out, start = [], None
        for cp in range(sys.maxunicode + 2):
            inside = cp <= sys.maxunicode and unicodedata.category(chr(cp)).startswith(prefix)
            if inside and start is None:
                start = cp
            elif not inside and start is not None:
                out.append(f"\\U{start:08x}" + (f"-\\U{cp - 1:08x}" if cp - 1 > start else ""))
                start = None
        return "".join(out)

    L, N, S = ranges("L"), ranges("N"), _WHITESPACE
    return re.compile(
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
        f"|[^\\r\\n{L}{N}]?[{L}]+|[{N}]| ?[^{S}{L}{N}]+[\\r\\n]*|[{S}]*[\\r\\n]+|[{S}]+(?![^{S}])|[{S}]+"
    )


_SPECIAL_SPLIT = re.compile("(" + "|".join(re.escape(s) for s in SPECIAL_TOKENS) + ")")


def _chunks(text: str) -> list[str]:
    """Pre-tokenized pieces of ordinary text, in GPT-2's byte-to-unicode spelling."""
    byte_map = bytes_to_unicode()
    return ["".join(byte_map[b] for b in piece.encode("utf-8")) for piece in _pretokenizer().findall(text)]


def train_bpe(texts: list[str], n_new_tokens: int) -> list[tuple[str, str]]:
    """Learn merges (repeatedly the most frequent adjacent pair; ties: the smallest pair) until
    they make `n_new_tokens` distinct tokens (two merges can spell the same token)."""
    words = Counter()
    for text in texts:
        for part in _SPECIAL_SPLIT.split(text):
            if part and part not in SPECIAL_TOKENS:
                words.update(_chunks(part))
    symbols = [list(w) for w in words]
    freqs = list(words.values())
    pair_count: Counter = Counter()
    pair_words: dict[tuple[str, str], set[int]] = {}
    for i, syms in enumerate(symbols):
        for pair in zip(syms, syms[1:]):
            pair_count[pair] += freqs[i]
            pair_words.setdefault(pair, set()).add(i)
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    made: set[str] = set()
    while len(made) < n_new_tokens and heap:
        neg, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -neg or neg == 0:
            continue  # stale heap entry
        merges.append(pair)
        merged = pair[0] + pair[1]
        made.add(merged)
        changed = set()
        for i in sorted(pair_words.pop(pair, ())):
            old = symbols[i]
            new, j = [], 0
            while j < len(old):
                if j + 1 < len(old) and (old[j], old[j + 1]) == pair:
                    new.append(merged)
                    j += 2
                else:
                    new.append(old[j])
                    j += 1
            if len(new) == len(old):
                continue
            for p in zip(old, old[1:]):
                pair_count[p] -= freqs[i]
                changed.add(p)
            for p in zip(new, new[1:]):
                pair_count[p] += freqs[i]
                pair_words.setdefault(p, set()).add(i)
                changed.add(p)
            symbols[i] = new
        for p in changed:
            if pair_count[p] > 0:
                heapq.heappush(heap, (-pair_count[p], p))
            else:
                del pair_count[p]
    return merges


class Tokenizer:
    """Byte-level BPE: ids 0-255 are the bytes, then the tokens the merges make, then the special
    tokens."""

    def __init__(self, merges: list[tuple[str, str]]):
        byte_map = bytes_to_unicode()
        self.merges = merges
        self.ranks = {pair: r for r, pair in enumerate(merges)}
        self.tokens = list(dict.fromkeys([byte_map[b] for b in range(256)] + [a + b for a, b in merges]))
        self.special = {s: len(self.tokens) + i for i, s in enumerate(SPECIAL_TOKENS)}
        self.tokens += list(SPECIAL_TOKENS)
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        self._cache: dict[str, list[int]] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    def _bpe(self, chunk: str) -> list[int]:
        if chunk not in self._cache:
            syms = list(chunk)
            while len(syms) > 1:
                best = min(zip(syms, syms[1:]), key=lambda p: self.ranks.get(p, math.inf))
                if best not in self.ranks:
                    break
                out, j = [], 0
                while j < len(syms):
                    if j + 1 < len(syms) and (syms[j], syms[j + 1]) == best:
                        out.append(syms[j] + syms[j + 1])
                        j += 2
                    else:
                        out.append(syms[j])
                        j += 1
                syms = out
            self._cache[chunk] = [self.ids[s] for s in syms]
        return self._cache[chunk]

    def encode(self, text: str) -> list[int]:
        """Token ids; special token strings become their ids (llama.cpp's parse_special)."""
        ids: list[int] = []
        for part in _SPECIAL_SPLIT.split(text):
            if part in self.special:
                ids.append(self.special[part])
            elif part:
                for chunk in _chunks(part):
                    ids.extend(self._bpe(chunk))
        return ids

    def gguf_vocab(self) -> dict:
        """The token dict synthetic_models' GGUF writer takes (its build_tokenizer's layout)."""
        n_normal = len(self.tokens) - len(SPECIAL_TOKENS)
        return {
            "tokens": self.tokens,
            "types": [TOKEN_NORMAL] * n_normal + [TOKEN_CONTROL] * len(SPECIAL_TOKENS),
            "merges": [f"{a} {b}" for a, b in self.merges],
            "bos_id": self.special[ENDOFTEXT],
            "eos_id": self.special[IM_END],
            "pad_id": self.special[ENDOFTEXT],
        }


def build_tokenizer(train_docs: list[Document], s: Settings, work_dir: pathlib.Path, corpus_sha: str) -> Tokenizer:
    """Train the BPE merges, or reuse the ones saved for this corpus and vocabulary."""
    cache = work_dir / "tokenizer.json"
    key = {"corpus_sha256": corpus_sha, "vocab": s.vocab, "holdout": s.holdout, "seed": s.seed}
    if cache.exists():
        saved = json.loads(cache.read_text())
        if saved["key"] == key:
            return Tokenizer([tuple(m) for m in saved["merges"]])
    n_new = s.vocab - 256 - len(SPECIAL_TOKENS)
    if n_new < 0:
        raise SystemExit(f"error: --vocab must be at least {256 + len(SPECIAL_TOKENS)}")
    merges = train_bpe([format_document(d) for d in train_docs], n_new)
    tok = Tokenizer(merges)
    if len(tok) < s.vocab:
        raise SystemExit(f"error: the text only allows a vocabulary of {len(tok)}; lower --vocab")
    cache.write_text(json.dumps({"key": key, "merges": merges}))
    return tok


def encode_stream(tok: Tokenizer, docs: list[Document]) -> np.ndarray:
    return np.array([t for d in docs for t in tok.encode(format_document(d))], dtype=np.int32)
