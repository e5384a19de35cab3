"""llama.cpp's sampler chains (penalties, grammar) and the stop-string filter."""

from __future__ import annotations

from typing import TYPE_CHECKING

from collections.abc import Sequence

import llama_cpp

from ..errors import PromptError

from .events import SamplingParams

if TYPE_CHECKING:
    from . import Engine


class Sampler:
    """llama.cpp's sampler chain for one request; with a grammar, a second chain that starts with
    llama.cpp's grammar sampler, used once the caller says the reply is constrained."""

    def __init__(self, engine: Engine, params: SamplingParams, history: Sequence[int], grammar: str | None = None):
        self._engine = engine
        self._chain = self._build(params, None)
        self._constrained = self._build(params, grammar) if grammar is not None else None
        # Penalties remember the prompt; the grammar must only ever see the reply.
        for chain in filter(None, (self._chain, self._constrained) if _penalized(params) else ()):
            penalties = llama_cpp.llama_sampler_chain_get(chain, 1 if chain is self._constrained else 0)
            for token in history[-params.repeat_last_n :]:
                llama_cpp.llama_sampler_accept(penalties, token)

    def _build(self, params: SamplingParams, grammar: str | None):
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = lambda s: llama_cpp.llama_sampler_chain_add(chain, s)  # noqa: E731
        if grammar is not None:
            try:
                add(_grammar_sampler(self._engine._vocab, grammar))
            except PromptError:
                llama_cpp.llama_sampler_free(chain)
                self.close()
                raise
        if _penalized(params):
            add(
                llama_cpp.llama_sampler_init_penalties(
                    self._engine.n_vocab,
                    params.repeat_last_n,
                    params.repeat_penalty,
                    params.frequency_penalty,
                    params.presence_penalty,
                )
            )
        if params.temperature <= 0:
            add(llama_cpp.llama_sampler_init_greedy())
        else:
            if params.top_k > 0:
                add(llama_cpp.llama_sampler_init_top_k(params.top_k))
            if params.top_p < 1.0:
                add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
            if params.min_p > 0:
                add(llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
            add(llama_cpp.llama_sampler_init_temp(params.temperature))
            seed = params.seed if params.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED
            add(llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain

    def sample(self, constrained: bool = True, row: int = -1) -> int:
        """The next token after the last batch's token `row` (from the grammar's chain when there
        is one and `constrained`); both chains learn it."""
        use = self._constrained if constrained and self._constrained else self._chain
        token = llama_cpp.llama_sampler_sample(use, self._engine._ctx, row)
        if use is not self._chain:
            llama_cpp.llama_sampler_accept(self._chain, token)
        return token

    def accept(self, token: int) -> None:
        """A token written for the model (a closed think block): only the unconstrained chain
        learns it, since grammars start after thinking."""
        llama_cpp.llama_sampler_accept(self._chain, token)

    def close(self) -> None:
        for name in ("_chain", "_constrained"):
            if getattr(self, name, None):
                llama_cpp.llama_sampler_free(getattr(self, name))
                setattr(self, name, None)


def _penalized(params: SamplingParams) -> bool:
    return (params.repeat_penalty, params.frequency_penalty, params.presence_penalty) != (1.0, 0.0, 0.0)


def _grammar_sampler(vocab, grammar: str):
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    if not sampler:
        raise PromptError("llama.cpp's grammar parser refused the grammar built for this request")
    return sampler


class StopFilter:
    """Holds back text that could be the start of a stop string; cuts output at the first stop.

    Linear in the text and the stop strings' length: per stop string it keeps how much of it the
    text ends with (a Knuth-Morris-Pratt state), which each new character advances in amortised
    constant time, so a long stop string costs its length once, not once per token."""

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self._fallback = [_prefix_function(s) for s in self.stop]
        self._matched = [0] * len(self.stop)  # per stop string: how much of it the text ends with
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, whether a stop string was hit)."""
        start = len(self.pending)
        self.pending += text
        for at, char in enumerate(text, start + 1):
            for i, stop in enumerate(self.stop):
                k, fallback = self._matched[i], self._fallback[i]
                while k and stop[k] != char:
                    k = fallback[k - 1]
                k += stop[k] == char
                if k == len(stop):
                    out, self.pending = self.pending[: at - k], ""
                    self._matched = [0] * len(self.stop)
                    return out, True
                self._matched[i] = k
        keep = max(self._matched, default=0)
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(out) :]
        return out, False

    def flush(self, text: str = "") -> str:
        out, _ = self.feed(text)
        out, self.pending = out + self.pending, ""
        return out


def _prefix_function(s: str) -> list[int]:
    """For each prefix s[:i+1], the length of its longest proper prefix that is also its suffix."""
    fallback = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fallback[k - 1]
        k += s[i] == s[k]
        fallback[i] = k
    return fallback
