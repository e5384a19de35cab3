"""Checkpoints of a hybrid model's recurrent state, so a prompt that shares only a prefix with
what the context holds can restart from that prefix instead of from scratch.

Gated DeltaNet layers cannot drop tokens from the end of their state; a checkpoint is their state
after an exact token prefix (saved and restored by the engine through llama.cpp's partial state
API), taken at turn boundaries. The store only does the bookkeeping: which checkpoint serves a
prompt, and which go when the memory budget is spent (least recently used first).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

DEFAULT_CHECKPOINT_BYTES = 512 * 2**20


@dataclass
class Checkpoint:
    tokens: tuple[int, ...]  # the prefix whose recurrent state `state` is
    state: bytes


class CheckpointStore:
    """Checkpoints within `max_bytes` of host memory, least recently used evicted first."""

    def __init__(self, max_bytes: int = DEFAULT_CHECKPOINT_BYTES):
        self.max_bytes = max_bytes
        self._items: list[Checkpoint] = []  # least recently used first
        self._lock = threading.Lock()  # the dashboard and /metrics read from other threads
        self.restored = 0  # checkpoints that served a prompt

    def best(self, prompt: list[int], usable: int) -> Checkpoint | None:
        """The longest checkpoint whose tokens begin `prompt` and are at most `usable` long."""
        with self._lock:
            fits = [c for c in self._items if len(c.tokens) <= usable and tuple(prompt[: len(c.tokens)]) == c.tokens]
            best = max(fits, key=lambda c: len(c.tokens), default=None)
            if best is not None:
                self._items.remove(best)
                self._items.append(best)
                self.restored += 1
            return best

    def add(self, tokens: tuple[int, ...], state: bytes) -> None:
        """Keep `state` as the checkpoint after `tokens`; one larger than the budget is not kept."""
        if len(state) > self.max_bytes:
            return
        with self._lock:
            self._items = [c for c in self._items if c.tokens != tokens]
            while self._items and sum(len(c.state) for c in self._items) + len(state) > self.max_bytes:
                self._items.pop(0)
            self._items.append(Checkpoint(tokens, state))

    def retain(self, tokens: list[int]) -> None:
        """Drop the checkpoints that are not a prefix of `tokens`, the context's new contents: the
        KV cache they need is overwritten."""
        with self._lock:
            self._items = [c for c in self._items if tuple(tokens[: len(c.tokens)]) == c.tokens]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def snapshot(self) -> dict:
        """count, bytes, max_bytes, restored: for the dashboard and /metrics."""
        with self._lock:
            return {"count": len(self._items), "bytes": sum(len(c.state) for c in self._items),
                    "max_bytes": self.max_bytes, "restored": self.restored}
