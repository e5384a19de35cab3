#!/usr/bin/env python3
"""Train the built-in demo model: a small qwen3moe Mixture-of-Experts language model, on CPU; or
with ``--arch qwen35moe`` the target's architecture (Gated DeltaNet and full-attention blocks, a
shared expert) with a trained multi-token-prediction head (``demo_qwen35moe.py``).

Text: the English documentation that ships with CPython (``pydoc_data.topics``, the language
reference behind ``help()``) and the prose paragraphs of the standard library's docstrings, both
under the Python Software Foundation License. Every machine with Python has them, so the run needs
no download. About 5% of the documents (picked by the seed) are held out for perplexity.

Steps: byte-level BPE tokenizer trained on the text (GPT-2 byte mapping, llama.cpp's "qwen2"
pre-tokenizer split) -> the model (torch, the same forward as llama.cpp's qwen3moe graph) ->
GGUF export -> a report: held-out perplexity vs a unigram baseline, llama.cpp vs torch logits,
samples, routing skew (qwen35moe: also the MTP head's logits and its drafts' acceptance through
the engine's ``--draft mtp``). Training saves a checkpoint in ``--work-dir`` every ``--checkpoint-every``
steps and resumes from it when run again with the same settings; equal settings and seed give
the same model.

Needs torch (``pip install -e .[train]``); the rotary_gguf package itself never imports it.

Usage::

    python tools/train_demo_model.py                        # the shipped model (about 35 minutes)
    python tools/train_demo_model.py --arch qwen35moe --steps 600   # its qwen35moe sibling
    python tools/train_demo_model.py --steps 3 --embd 32 --layers 1 --experts 4 --used 2 \\
        --ff 32 --vocab 300 --text-limit 20000 -o tiny.gguf --work-dir tiny-run
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import heapq
import json
import math
import os
import pathlib
import platform
import re
import sys
import sysconfig
import time
import unicodedata
import zlib
from collections import Counter
from functools import lru_cache
from typing import Iterator

import gguf
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO))

from demo_qwen35moe import (  # noqa: E402
    Qwen35MoE,
    RMSNorm,
    add_hparams,
    moe_ffn,
    mtp_acceptance,
    mtp_heldout,
    mtp_logit_check,
)
from make_test_model import (  # noqa: E402
    _FTYPE_ALL_F32,
    _FTYPE_MOSTLY_F16,
    _FTYPE_MOSTLY_Q8_0,
    _TOKEN_CONTROL,
    _TOKEN_NORMAL,
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    _bytes_to_unicode,
    _keep_f32,
    _quantize,
    _tmp_path,
)

DEFAULT_OUTPUTS = {"qwen3moe": REPO / "rotary_gguf" / "data" / "demo-moe.gguf",
                   "qwen35moe": REPO / "rotary_gguf" / "data" / "demo-qwen35moe.gguf"}
DEFAULT_WORK_DIRS = {"qwen3moe": REPO / "build" / "demo-model", "qwen35moe": REPO / "build" / "demo-qwen35moe"}
QUANTS = ("f32", "f16", "q8_0")
ENDOFTEXT, IM_START, IM_END = SPECIAL_TOKENS
SETTINGS_KEY = "rotary.demo.settings"
CORPUS_SHA_KEY = "rotary.demo.corpus_sha256"


@dataclasses.dataclass
class Settings:
    """Everything that determines the trained model (saved with checkpoints and in the GGUF)."""

    arch: str = "qwen3moe"
    vocab: int = 4096
    layers: int = 4
    embd: int = 256
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    experts: int = 32
    used: int = 4
    ff: int = 128
    seq_len: int = 512
    batch: int = 6
    steps: int = 1000
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.1
    aux_loss: float = 0.002
    dropout: float = 0.1
    rope_base: float = 10000.0
    rms_eps: float = 1e-6
    holdout: float = 0.05
    text_limit: int = 0
    seed: int = 0
    mtp_loss: float = 0.3  # qwen35moe: weight of the MTP head's loss


# ---------------------------------------------------------------------------------------------
# text


@dataclasses.dataclass
class Document:
    kind: str  # topic, module, class, function
    name: str
    text: str


def _stdlib_docstrings() -> Iterator[Document]:
    """Prose paragraphs of the standard library's docstrings (no code, no doctests)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    skip = {"idlelib", "lib2to3", "site-packages", "dist-packages", "ensurepip", "turtledemo",
            "tkinter", "pydoc_data", "encodings", "__pycache__"}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in skip or part.startswith("test") for part in rel.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        yield from _docstrings(tree, module, "module")


def _docstrings(node: ast.AST, name: str, kind: str) -> Iterator[Document]:
    text = _prose(ast.get_docstring(node, clean=True) or "")
    if text:
        yield Document(kind, name, text)
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.ClassDef):
            yield from _docstrings(child, f"{name}.{child.name}", "class")
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and not child.name.startswith("_"):
            yield from _docstrings(child, f"{name}.{child.name}", "function")


def _prose(doc: str) -> str:
    """The paragraphs of a docstring that read as sentences, each joined onto one line."""
    keep = []
    for para in re.split(r"\n\s*\n", doc):
        lines = para.splitlines()
        if any(line.lstrip().startswith((">>>", "...")) or line.startswith(" ") for line in lines):
            continue
        if len(para) < 40 or sum(c.isalpha() or c == " " for c in para) < 0.85 * len(para):
            continue
        keep.append(" ".join(line.strip() for line in lines))
    return "\n\n".join(keep)


def load_documents(text_limit: int = 0) -> list[Document]:
    """pydoc_data's topics, then stdlib docstrings; stops after `text_limit` characters if set."""
    import pydoc_data.topics

    def sources() -> Iterator[Document]:
        for name, text in sorted(pydoc_data.topics.topics.items()):
            yield Document("topic", name, text.strip())
        yield from _stdlib_docstrings()

    docs, seen, total = [], set(), 0
    for doc in sources():
        if doc.text in seen:
            continue
        seen.add(doc.text)
        docs.append(doc)
        total += len(doc.text)
        if text_limit and total >= text_limit:
            break
    return docs


def split_documents(docs: list[Document], holdout: float, seed: int) -> tuple[list[Document], list[Document]]:
    """Hold out documents (picked by the seed) until they hold `holdout` of the characters."""
    order = np.random.default_rng([seed, 1]).permutation(len(docs))
    target, held, held_chars = holdout * sum(len(d.text) for d in docs), set(), 0
    for i in order:
        if held_chars >= target:
            break
        held.add(int(i))
        held_chars += len(docs[i].text)
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


def _question(doc: Document) -> str:
    if doc.kind == "topic":
        return f"Tell me about {doc.text.splitlines()[0].strip()}."
    if doc.kind == "function":
        return f"What does {doc.name}() do?"
    return f"What is the {doc.name} {doc.kind}?"


def format_document(doc: Document) -> str:
    """Half the documents (by name) become one ChatML question/answer turn, the rest plain text."""
    if zlib.crc32(doc.name.encode()) % 2:
        return doc.text + ENDOFTEXT
    return (f"{IM_START}user\n{_question(doc)}{IM_END}\n"
            f"{IM_START}assistant\n{doc.text}{IM_END}\n{ENDOFTEXT}")


# ---------------------------------------------------------------------------------------------
# tokenizer: byte-level BPE with llama.cpp's "qwen2" pre-tokenizer split


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
    byte_map = _bytes_to_unicode()
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
        byte_map = _bytes_to_unicode()
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
        """The token dict make_test_model's writer layout uses."""
        n_normal = len(self.tokens) - len(SPECIAL_TOKENS)
        return {
            "tokens": self.tokens,
            "types": [_TOKEN_NORMAL] * n_normal + [_TOKEN_CONTROL] * len(SPECIAL_TOKENS),
            "merges": [f"{a} {b}" for a, b in self.merges],
            "bos_id": self.special[ENDOFTEXT],
            "eos_id": self.special[IM_END],
            "pad_id": self.special[ENDOFTEXT],
        }


# ---------------------------------------------------------------------------------------------
# model: llama.cpp's qwen3moe graph (src/models/qwen3moe.cpp, build_moe_ffn in llama-graph.cpp)


def rope(x: torch.Tensor, base: float) -> torch.Tensor:
    """NEOX-style rotary embedding (pairs i, i + d/2) of x [batch, tokens, heads, head_dim]."""
    d = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, d // 2, dtype=torch.float64) * 2 / d)
    angle = torch.arange(x.shape[1], dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = angle.cos().float()[None, :, None, :], angle.sin().float()[None, :, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Block(nn.Module):
    def __init__(self, s: Settings):
        super().__init__()
        self.s = s
        E, HD, X, FF = s.embd, s.head_dim, s.experts, s.ff
        self.attn_norm = RMSNorm(E, s.rms_eps)
        self.attn_q = nn.Linear(E, s.heads * HD, bias=False)
        self.attn_k = nn.Linear(E, s.kv_heads * HD, bias=False)
        self.attn_v = nn.Linear(E, s.kv_heads * HD, bias=False)
        self.attn_output = nn.Linear(s.heads * HD, E, bias=False)
        self.attn_q_norm = RMSNorm(HD, s.rms_eps)
        self.attn_k_norm = RMSNorm(HD, s.rms_eps)
        self.ffn_norm = RMSNorm(E, s.rms_eps)
        self.ffn_gate_inp = nn.Linear(E, X, bias=False)
        self.ffn_gate_exps = nn.Parameter(torch.empty(X, FF, E))
        self.ffn_up_exps = nn.Parameter(torch.empty(X, FF, E))
        self.ffn_down_exps = nn.Parameter(torch.empty(X, E, FF))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns the block output, the aux load-balancing loss and the selected experts."""
        s = self.s
        B, T, E = x.shape
        h = self.attn_norm(x)
        q = self.attn_q_norm(self.attn_q(h).view(B, T, s.heads, s.head_dim))
        k = self.attn_k_norm(self.attn_k(h).view(B, T, s.kv_heads, s.head_dim))
        v = self.attn_v(h).view(B, T, s.kv_heads, s.head_dim)
        q, k = rope(q, s.rope_base), rope(k, s.rope_base)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
        )
        x = x + F.dropout(self.attn_output(a.transpose(1, 2).reshape(B, T, s.heads * s.head_dim)),
                          s.dropout, self.training)

        h = self.ffn_norm(x).view(B * T, E)
        y, aux, chosen = moe_ffn(h, self.ffn_gate_inp, self.ffn_gate_exps, self.ffn_up_exps,
                                 self.ffn_down_exps, s.used)
        return x + F.dropout(y.view(B, T, E), s.dropout, self.training), aux, chosen.view(B, T, s.used)


class DemoMoE(nn.Module):
    """Token embedding (tied with the output head), blocks, final norm."""

    def __init__(self, s: Settings):
        super().__init__()
        self.s = s
        self.token_embd = nn.Embedding(s.vocab, s.embd)
        self.blocks = nn.ModuleList(Block(s) for _ in range(s.layers))
        self.output_norm = RMSNorm(s.embd, s.rms_eps)
        self._init_weights()

    def _init_weights(self) -> None:
        out_std = 0.02 / math.sqrt(2 * self.s.layers)
        for name, p in self.named_parameters():
            if p.ndim < 2:
                continue
            std = out_std if name.endswith(("attn_output.weight", "ffn_down_exps")) else 0.02
            nn.init.normal_(p, std=std)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        x = self.token_embd(tokens)
        aux, chosen = x.new_zeros(()), []
        for block in self.blocks:
            x, a, c = block(x)
            aux = aux + a
            chosen.append(c)
        logits = self.output_norm(x) @ self.token_embd.weight.T
        return logits, aux / len(self.blocks), chosen


# ---------------------------------------------------------------------------------------------
# training


def batch_at(stream: np.ndarray, step: int, s: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of the training stream; depends only on (seed, step), so resuming is exact."""
    rng = np.random.default_rng([s.seed, 2, step])
    starts = rng.integers(0, len(stream) - s.seq_len - 1, size=s.batch)
    windows = np.stack([stream[i : i + s.seq_len + 1] for i in starts]).astype(np.int64)
    t = torch.from_numpy(windows)
    return t[:, :-1], t[:, 1:]


def lr_at(step: int, s: Settings) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: DemoMoE, s: Settings) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=s.lr, betas=(0.9, 0.95),
    )


@torch.no_grad()
def heldout_nll(model: DemoMoE, stream: np.ndarray, seq_len: int, max_windows: int = 0) -> float:
    """Mean next-token negative log-likelihood over consecutive windows of the held-out stream."""
    total, count = 0.0, 0
    n_windows = (len(stream) - 1) // seq_len
    if max_windows:
        n_windows = min(n_windows, max_windows)
    for w in range(n_windows):
        chunk = torch.from_numpy(stream[w * seq_len : (w + 1) * seq_len + 1].astype(np.int64))
        logits, _, _ = model(chunk[None, :-1])
        total += F.cross_entropy(logits[0], chunk[1:], reduction="sum").item()
        count += seq_len
    return total / max(1, count)


def train(model: DemoMoE, train_stream: np.ndarray, held_stream: np.ndarray, s: Settings,
          work_dir: pathlib.Path, checkpoint_every: int, eval_every: int) -> dict:
    """Train to s.steps, resuming from work_dir/checkpoint.pt when its settings match."""
    opt = make_optimizer(model, s)
    ckpt_path = work_dir / "checkpoint.pt"
    step, seconds = 0, 0.0
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=False)
        if ckpt["settings"] == dataclasses.asdict(s):
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            step, seconds = ckpt["step"], ckpt["seconds"]
            print(f"resuming at step {step} ({seconds / 60:.1f} min trained)", flush=True)
    model.train()
    t_last = time.perf_counter()
    while step < s.steps:
        inputs, targets = batch_at(train_stream, step, s)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, s)
        if s.arch == "qwen35moe":
            hidden, aux, _ = model.trunk(inputs)
            logits = hidden @ model.token_embd.weight.T
            # the head reads the trunk's states without training them; the tied embedding learns from both
            mtp_logits, mtp_aux = model.mtp_logits(inputs, hidden.detach())
            mtp = F.cross_entropy(mtp_logits.reshape(-1, s.vocab), targets.reshape(-1))
            extra, aux = s.mtp_loss * mtp, aux + mtp_aux / s.layers
        else:
            logits, aux, _ = model(inputs)
            extra = mtp = logits.new_zeros(())
        loss = F.cross_entropy(logits.reshape(-1, s.vocab), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        (loss + extra + s.aux_loss * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        now = time.perf_counter()
        seconds += now - t_last
        t_last = now
        if step % 10 == 0 or step == s.steps:
            print(f"step {step}/{s.steps} loss {loss.item():.3f} mtp {mtp.item():.3f} aux {aux.item():.3f} "
                  f"lr {lr_at(step - 1, s):.2e} {seconds / step:.2f} s/step", flush=True)
        if eval_every and (step % eval_every == 0 or step == s.steps):
            model.eval()
            nll = heldout_nll(model, held_stream, s.seq_len, max_windows=16)
            model.train()
            print(f"step {step} held-out loss {nll:.3f} (perplexity {math.exp(nll):.1f})", flush=True)
            t_last = time.perf_counter()
        if step % checkpoint_every == 0 or step == s.steps:
            tmp = ckpt_path.with_suffix(".tmp")
            torch.save({"settings": dataclasses.asdict(s), "model": model.state_dict(),
                        "optimizer": opt.state_dict(), "step": step, "seconds": seconds}, tmp)
            os.replace(tmp, ckpt_path)
            t_last = time.perf_counter()
    model.eval()
    return {"train_seconds": round(seconds, 1), "seconds_per_step": round(seconds / max(1, step), 3)}


# ---------------------------------------------------------------------------------------------
# export


def gguf_tensors(model: DemoMoE) -> Iterator[tuple[str, np.ndarray]]:
    """The weights under llama.cpp's qwen3moe names; numpy shapes are ggml's ne reversed."""
    yield "token_embd.weight", model.token_embd.weight
    for i, b in enumerate(model.blocks):
        for name in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm",
                     "attn_k_norm", "ffn_norm", "ffn_gate_inp"):
            yield f"blk.{i}.{name}.weight", getattr(b, name).weight
        for name in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
            yield f"blk.{i}.{name}.weight", getattr(b, name)
    yield "output_norm.weight", model.output_norm.weight


def write_gguf(path: pathlib.Path, model: DemoMoE | Qwen35MoE, tok: Tokenizer, quant: str, meta: dict) -> None:
    """Write the model (f32 or f16 weights; q8_0 goes through llama.cpp's quantizer) atomically."""
    s = model.s
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(folder, path.name, ".tmp")
    tmp_f32 = _tmp_path(folder, path.name, ".f32.tmp") if quant == "q8_0" else None
    try:
        f16 = quant == "f16"
        w = gguf.GGUFWriter(tmp_f32 or tmp, s.arch)
        w.add_name("rotary-gguf demo MoE" if s.arch == "qwen3moe" else f"rotary-gguf demo {s.arch}")
        w.add_description(meta["description"])
        w.add_license("MIT")
        w.add_file_type(_FTYPE_MOSTLY_F16 if f16 else _FTYPE_ALL_F32)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_string(SETTINGS_KEY, json.dumps(dataclasses.asdict(s), sort_keys=True))
        w.add_string(CORPUS_SHA_KEY, meta["corpus_sha256"])
        w.add_context_length(s.seq_len)
        w.add_embedding_length(s.embd)
        if s.arch == "qwen35moe":
            add_hparams(w, s)
        else:
            w.add_block_count(s.layers)
        w.add_head_count(s.heads)
        w.add_head_count_kv(s.kv_heads)
        w.add_key_length(s.head_dim)
        w.add_value_length(s.head_dim)
        w.add_layer_norm_rms_eps(s.rms_eps)
        w.add_rope_freq_base(s.rope_base)
        w.add_feed_forward_length(s.ff * s.used)
        w.add_expert_feed_forward_length(s.ff)
        w.add_expert_count(s.experts)
        w.add_expert_used_count(s.used)
        vocab = tok.gguf_vocab()
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(PRE_TOKENIZER)
        w.add_token_list(vocab["tokens"])
        w.add_token_types(vocab["types"])
        w.add_token_merges(vocab["merges"])
        w.add_bos_token_id(vocab["bos_id"])
        w.add_eos_token_id(vocab["eos_id"])
        w.add_eot_token_id(vocab["eos_id"])
        w.add_pad_token_id(vocab["pad_id"])
        w.add_add_bos_token(False)
        w.add_chat_template(CHAT_TEMPLATE)
        for name, p in model.gguf_tensors() if s.arch == "qwen35moe" else gguf_tensors(model):
            arr = p.detach().float().numpy()
            if f16 and not _keep_f32(name, arr):
                arr = arr.astype(np.float16)
            w.add_tensor(name, np.ascontiguousarray(arr))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        if tmp_f32 is not None:
            _quantize(tmp_f32, tmp, _FTYPE_MOSTLY_Q8_0)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # the temp file was created private
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        if tmp_f32 is not None:
            tmp_f32.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# report


def unigram_nll(train_stream: np.ndarray, held_stream: np.ndarray, vocab: int) -> float:
    """Held-out NLL of add-one-smoothed token frequencies of the training stream."""
    counts = np.bincount(train_stream, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[held_stream[1:]].mean())


def routing_skew(path: pathlib.Path, stream: np.ndarray, seq_len: int) -> list[dict]:
    """Per block, over the held-out text as llama.cpp runs the file (the project's routing
    telemetry): entropy of the expert-selection distribution (bits), the share of selections taken
    by the busiest 10% of experts, and the experts never selected."""
    from rotary_gguf.engine import Engine
    from rotary_gguf.telemetry import RoutingTelemetry

    telemetry = RoutingTelemetry.for_model(path)
    with Engine.load(path, n_ctx=seq_len, n_batch=seq_len, n_threads=1, telemetry=telemetry,
                     all_outputs=True) as engine:
        engine.output_every_token = True  # else the last block routes only the last token
        for start in range(0, len(stream) - seq_len + 1, seq_len):
            engine.reset()
            engine.eval(stream[start : start + seq_len].tolist())
    counts = telemetry.counts()
    top = max(1, round(0.1 * telemetry.n_expert))
    out = []
    for layer in telemetry.layers:
        c = counts[layer]
        p = c[c > 0] / c.sum()
        out.append({
            "layer": int(layer),
            "entropy_bits": round(float(-(p * np.log2(p)).sum()), 2),
            "max_entropy_bits": round(math.log2(telemetry.n_expert), 2),
            "top10pct_share": round(float(np.sort(c)[::-1][:top].sum() / c.sum()), 3),
            "top10pct_uniform_share": round(top / telemetry.n_expert, 3),
            "unused_experts": int((c == 0).sum()),
        })
    return out


@torch.no_grad()
def next_token_reuse(model: DemoMoE, stream: np.ndarray, seq_len: int) -> list[float]:
    """Per block, over the held-out text (torch forward): how often an expert chosen for one token
    is chosen again for the next (burstiness; by chance it would be used/experts)."""
    s = model.s
    hits, total = np.zeros(s.layers), np.zeros(s.layers)
    for start in range(0, len(stream) - seq_len + 1, seq_len):
        _, _, chosen = model(torch.from_numpy(stream[start : start + seq_len].astype(np.int64))[None])
        for layer, c in enumerate(chosen):
            sel = np.zeros((seq_len, s.experts), dtype=bool)
            np.put_along_axis(sel, c[0].numpy(), True, axis=1)
            hits[layer] += (sel[1:] & sel[:-1]).sum()
            total[layer] += sel[:-1].sum()
    return [round(float(h / t), 3) for h, t in zip(hits, total)]


@torch.no_grad()
def logit_check(path: pathlib.Path, model: DemoMoE, tokens: list[int]) -> dict:
    """llama.cpp's logits for each position (one decode per token) against the torch forward."""
    from rotary_gguf.engine import Engine

    ref = model(torch.tensor([tokens]))[0][0].numpy()
    with Engine.load(path, n_ctx=len(tokens), n_threads=1) as engine:  # within the model's trained context
        got = []
        for t in tokens:
            engine.eval([t])
            got.append(engine.logits())
    got = np.stack(got)
    diff = np.abs(got - ref)
    return {
        "tokens": len(tokens),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "logit_range": float(np.abs(ref).max()),
        "argmax_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean()),
    }


def samples(path: pathlib.Path, prompts: list[str], n_tokens: int, seed: int) -> list[dict]:
    """Greedy and sampled continuations from llama.cpp, plus one chat answer."""
    from rotary_gguf.engine import Engine, SamplingParams

    out = []
    with Engine.load(path, n_threads=1) as engine:  # the model's own context
        def run(prompt: str, sampling: SamplingParams) -> str:
            events = engine.generate(engine.tokenize(prompt), max_tokens=n_tokens, sampling=sampling)
            return "".join(e.text for e in events)

        greedy = SamplingParams(repeat_penalty=1.1)
        sampled = SamplingParams(temperature=0.8, top_p=0.95, repeat_penalty=1.1, seed=seed)
        for prompt in prompts:
            out.append({"prompt": prompt, "greedy": run(prompt, greedy), "sampled": run(prompt, sampled)})
        chat = f"{IM_START}user\nWhat does a for loop do?{IM_END}\n{IM_START}assistant\n"
        out.append({"prompt": chat, "greedy": run(chat, greedy), "sampled": run(chat, sampled)})
    return out


def tokenizer_agreement(path: pathlib.Path, tok: Tokenizer, texts: list[str]) -> dict:
    """Does llama.cpp tokenize the held-out documents exactly as the trainer does?"""
    from rotary_gguf.engine import Engine

    with Engine.load(path, n_ctx=16, n_threads=1) as engine:  # tokenizing only: the least context
        mismatched = [i for i, t in enumerate(texts) if engine.tokenize(t, add_special=False) != tok.encode(t)]
    return {"documents": len(texts), "mismatched": len(mismatched)}


# ---------------------------------------------------------------------------------------------


def sha256_file(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Train the built-in demo MoE model on CPU and export it as GGUF.")
    d = Settings()
    ap.add_argument("-o", "--output", type=pathlib.Path, help="output .gguf (default: the shipped file of --arch)")
    ap.add_argument("--work-dir", type=pathlib.Path,
                    help="checkpoints, tokenizer, F32 copy and report.json (default: build/ per --arch)")
    ap.add_argument("--quant", choices=QUANTS, default="q8_0", help="weight type of the output file")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    ap.add_argument("--eval-every", type=int, default=250, help="steps between held-out evaluations (0: never)")
    ap.add_argument("--no-report", action="store_true", help="skip samples, routing and logit checks")
    for f in dataclasses.fields(Settings):
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(d, f.name)), default=getattr(d, f.name),
                        choices=tuple(DEFAULT_OUTPUTS) if f.name == "arch" else None)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    s = Settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)})
    torch.set_num_threads(args.threads)
    if s.arch == "qwen35moe" and s.layers < 4:
        raise SystemExit("error: --arch qwen35moe needs --layers 4 or more (block 3 is its first full-attention block)")
    torch.manual_seed(s.seed)
    args.output = args.output or DEFAULT_OUTPUTS[s.arch]
    work_dir = args.work_dir or DEFAULT_WORK_DIRS[s.arch]
    work_dir.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    docs = load_documents(s.text_limit)
    corpus_sha = hashlib.sha256("\0".join(d.text for d in docs).encode()).hexdigest()
    train_docs, held_docs = split_documents(docs, s.holdout, s.seed)
    tok = build_tokenizer(train_docs, s, work_dir, corpus_sha)
    train_stream, held_stream = encode_stream(tok, train_docs), encode_stream(tok, held_docs)
    print(f"text: {len(docs)} documents, {sum(len(d.text) for d in docs)} characters; "
          f"{len(train_stream)} training and {len(held_stream)} held-out tokens; "
          f"vocabulary {len(tok)} ({time.perf_counter() - t0:.0f} s)", flush=True)

    model = Qwen35MoE(s) if s.arch == "qwen35moe" else DemoMoE(s)
    n_params = sum(p.numel() for p in model.parameters())
    n_moe_blocks = s.layers + (s.arch == "qwen35moe")  # and the MTP head's
    n_active = n_params - n_moe_blocks * 3 * (s.experts - s.used) * s.ff * s.embd
    print(f"model: {n_params / 1e6:.2f} M parameters, {n_active / 1e6:.2f} M active per token", flush=True)
    report: dict = {"settings": dataclasses.asdict(s), "parameters": n_params, "active_parameters": n_active,
                    "documents": len(docs), "train_tokens": len(train_stream), "heldout_tokens": len(held_stream),
                    "python": platform.python_version(), "corpus_sha256": corpus_sha}
    report |= train(model, train_stream, held_stream, s, work_dir, args.checkpoint_every, args.eval_every)
    epochs = s.steps * s.batch * s.seq_len / len(train_stream)
    report["epochs"] = round(epochs, 2)

    nll = heldout_nll(model, held_stream, s.seq_len)
    uni = unigram_nll(train_stream, held_stream, s.vocab)
    report["heldout_perplexity"] = round(math.exp(nll), 2)
    report["unigram_perplexity"] = round(math.exp(uni), 2)
    print(f"held-out perplexity {math.exp(nll):.2f}; unigram baseline {math.exp(uni):.2f}", flush=True)
    if s.arch == "qwen35moe":
        report["mtp_heldout"] = mtp_heldout(model, held_stream, s.seq_len)
        print(f"MTP head: {report['mtp_heldout']}", flush=True)

    description = (f"Demo MoE trained by rotary-gguf's tools/train_demo_model.py on CPython's documentation "
                   f"(pydoc_data topics and stdlib docstrings, PSF License; Python {report['python']}), "
                   f"{s.steps} steps, seed {s.seed}; held-out perplexity {math.exp(nll):.1f} "
                   f"(unigram {math.exp(uni):.1f}).")
    meta = {"description": description, "corpus_sha256": corpus_sha}
    f32_path = work_dir / f"{args.output.stem}-f32.gguf"
    write_gguf(f32_path, model, tok, "f32", meta)
    if args.quant != "f32":
        write_gguf(args.output, model, tok, args.quant, meta)
    else:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        os.replace(f32_path, args.output)
        f32_path = args.output
    report["file_bytes"] = args.output.stat().st_size
    report["file_sha256"] = sha256_file(args.output)
    print(f"wrote {args.output} ({report['file_bytes'] / 1e6:.1f} MB, {args.quant}) sha256 {report['file_sha256']}")

    if not args.no_report:
        check_tokens = held_stream[: min(128, s.seq_len)].tolist()
        report["logits_f32"] = logit_check(f32_path, model, check_tokens)
        report["logits_output"] = logit_check(args.output, model, check_tokens)
        if s.arch == "qwen35moe":
            report["mtp_logits_f32"] = mtp_logit_check(f32_path, model, check_tokens)
            report["mtp_logits_output"] = mtp_logit_check(args.output, model, check_tokens)
            prompts = [tok.encode(format_document(d))[:32] for d in held_docs[:8]]
            report["mtp_acceptance"] = mtp_acceptance(args.output, prompts, 64)
        report["tokenizer"] = tokenizer_agreement(args.output, tok, [format_document(d) for d in held_docs])
        report["routing"] = routing_skew(args.output, held_stream, s.seq_len)
        for entry, reuse in zip(report["routing"], next_token_reuse(model, held_stream, s.seq_len)):
            entry |= {"next_token_reuse": reuse, "reuse_by_chance": round(s.used / s.experts, 3)}
        prompts = ["The return value", "A list is", "In Python, a function", "The following example"]
        report["samples"] = samples(args.output, prompts, 48, s.seed)
    (work_dir / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "settings"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
