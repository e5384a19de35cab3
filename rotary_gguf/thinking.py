"""Thinking control during generation: whether the model is inside its think block, and the
tokens that close the block for it once its budget is spent."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Thinking:
    """How a reply may think: `open` when the prompt ends inside a think block (else the model may
    open one with `start` as its first words); after `budget` tokens of thinking, `close` is written
    for the model and the reply goes on. A grammar applies only once thinking is over."""

    open: bool
    start: str = "<think>"
    end: str = "</think>"
    close: str = "\n</think>\n\n"
    budget: int | None = None


class ThinkTracker:
    """Follows one reply's think block from the text of its tokens; `tokenize` turns the closing
    text into the tokens written for the model."""

    def __init__(self, thinking: Thinking | None, tokenize: Callable[[str], list[int]]):
        self._thinking, self._tokenize = thinking, tokenize
        self.active = bool(thinking and thinking.open)  # the model is thinking now
        self._undecided = bool(thinking and not thinking.open)  # the model may still open a block
        self._text, self._spent = "", 0
        self._forced: list[int] | None = None  # the closing tokens, once the budget is spent

    def saw(self, piece: str) -> None:
        """The text of the token just generated (or written)."""
        if self._thinking is None:
            return
        self._text += piece
        if self._undecided:
            head = self._text.lstrip()
            if head.startswith(self._thinking.start):
                self._undecided, self.active, self._text = False, True, head[len(self._thinking.start) :]
            elif head and not self._thinking.start.startswith(head):
                self._undecided = False
            return
        if self.active:
            self._spent += 1
            if self._thinking.end in self._text:
                self.active = False
            self._text = self._text[-len(self._thinking.end) :]

    def forced_token(self) -> int | None:
        """The next token to write for the model, when its thinking budget is spent."""
        budget = self._thinking.budget if self._thinking else None
        if self._forced is None and self.active and budget is not None and self._spent >= budget:
            self._forced = self._tokenize(self._thinking.close)
        return self._forced.pop(0) if self._forced else None
