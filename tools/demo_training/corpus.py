"""The training text: CPython's documentation (pydoc_data's topics and the prose of the standard
library's docstrings) as documents, the held-out split, and each document's plain or ChatML form."""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import re
import sysconfig
import zlib
from typing import Iterator

import numpy as np

from synthetic_models.tokenizer import SPECIAL_TOKENS

ENDOFTEXT, IM_START, IM_END = SPECIAL_TOKENS


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
