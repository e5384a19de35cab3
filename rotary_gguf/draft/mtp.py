"""Multi-token prediction (MTP) drafts: the model's own NextN head proposes the next few tokens and
the model checks them all in one batch, so one pass over the host-resident experts can yield
several tokens.

The head runs in a second llama.cpp context of type MTP on the same model. It reads the target's
hidden state at position p-1 next to the token at p (llama.cpp's NextN layout), so every target
batch is queued for the head's own KV cache (`MtpDrafter.follow`) and read with the next draft,
less the drafts the target rejected. A draft round (`Speculation`)
takes the head's argmax `n` times, evaluates [token, drafts...] on the target with logits for every
row, and samples each next token from those rows: a draft is accepted while the target's own pick
equals it. The drafts are the head's argmax (a one-hot draft distribution), for which the standard
speculative-sampling rule (accept with probability min(1, p/q), else resample from max(0, p - q))
is exactly this: each token is a sample of the target's distribution, drawn by the same sampler
chain as without drafts, so greedy and seeded output are the same token for token.

Rejected drafts leave the target's memory by `llama_memory_seq_rm`: hybrid models (Gated
DeltaNet) keep `n_rs_seq` per-token snapshots of their recurrent state for that rollback.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import llama_cpp
import numpy as np

from .. import native
from ..errors import UserError


class MtpDrafter:
    """The MTP head's context on a loaded model, and the target hidden states it reads."""

    def __init__(self, model, target_ctx, cparams, n_max: int):
        if llama_cpp.llama_model_is_hybrid(model) and llama_cpp.llama_n_rs_seq(target_ctx) < n_max:
            raise UserError(f"this llama.cpp cannot roll {n_max} rejected drafts out of the model's recurrent state")
        cparams.ctx_type = llama_cpp.LLAMA_CONTEXT_TYPE_MTP
        cparams.cb_eval = type(cparams.cb_eval)()  # no eval callback: the expert cache watches the target only
        cparams.cb_eval_user_data = None
        cparams.n_rs_seq = 0
        self._ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not self._ctx:
            raise UserError("llama.cpp could not create the MTP head's context")
        self._target = target_ctx
        self.n_max = n_max
        self.n_embd = llama_cpp.llama_model_n_embd(model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        native.set_embeddings_nextn(target_ctx, True, False)  # a hidden state for every batch token
        native.set_embeddings_nextn(self._ctx, True, True)
        self._batch = llama_cpp.llama_batch_ext_init(self._ctx)
        self.n_batch = llama_cpp.llama_n_batch(self._ctx)
        self._rows = np.zeros((0, self.n_embd), dtype=np.float32)  # target hidden states of the last batch
        self._rows_start = 0  # the position of its first row
        # target tokens not yet in the head's KV cache, from position _queue_start, with their inputs
        self._queue: list[int] = []
        self._queue_inputs = np.zeros((0, self.n_embd), dtype=np.float32)
        self._queue_start = 0

    def close(self) -> None:
        if self._batch:
            llama_cpp.llama_batch_ext_free(self._batch)
            self._batch = None
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None

    def follow(self, tokens: Sequence[int], start: int) -> None:
        """Queue the target batch just decoded (`tokens` at positions from `start`) for the head's
        KV cache, each token next to the target's hidden state one position before it. The head
        reads them at the next draft, by then without the drafts the target rejected."""
        n = len(tokens)
        rows = np.ctypeslib.as_array(native.embeddings_nextn(self._target), shape=(n, self.n_embd)).copy()
        inputs = np.concatenate([self._hidden(start - 1)[None, :], rows[:-1]])
        self._rows, self._rows_start = rows, start
        kept = start - self._queue_start
        if not 0 <= kept <= len(self._queue):  # the target rewound before the queue: start it over
            self._queue_start, kept = start, 0
        self._queue = self._queue[:kept] + list(tokens)
        self._queue_inputs = np.concatenate([self._queue_inputs[:kept], inputs])

    def draft(self, token: int, pos: int, n: int) -> list[int]:
        """The head's `n` likeliest next tokens in turn after `token`, which goes at `pos` (the
        target has evaluated every position before it)."""
        kept = max(0, min(pos - self._queue_start, len(self._queue)))
        start = pos - kept
        tokens = self._queue[:kept] + [token]
        inputs = np.concatenate([self._queue_inputs[:kept], self._hidden(pos - 1)[None, :]])
        self._queue, self._queue_inputs, self._queue_start = [], inputs[:0], pos
        while len(tokens) > self.n_batch:  # the queue in batches; `token` ends the last, whose output is a draft
            self._decode(tokens[: self.n_batch], start, inputs[: self.n_batch], output_last=False)
            tokens, inputs, start = tokens[self.n_batch :], inputs[self.n_batch :], start + self.n_batch
        drafts: list[int] = []
        for _ in range(n):
            self._decode(tokens, start, inputs, output_last=True)
            drafts.append(int(np.argmax(self.logits())))
            h = np.ctypeslib.as_array(native.embeddings_nextn_ith(self._ctx, -1), shape=(self.n_embd,))
            tokens, start, inputs = drafts[-1:], start + len(tokens), h[None, :].copy()
        return drafts

    def logits(self) -> np.ndarray:
        """The head's logits for the last token of its last batch (a view, valid until its next)."""
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx, -1), shape=(self.n_vocab,))

    def _hidden(self, pos: int) -> np.ndarray:
        """The target's hidden state at `pos`, where the last batch has it; zeros elsewhere (the
        first position, or after the memory was rewound past it: a weaker draft, never a wrong token)."""
        i = pos - self._rows_start
        return self._rows[i] if 0 <= i < len(self._rows) else np.zeros(self.n_embd, dtype=np.float32)

    def _decode(self, tokens: Sequence[int], start: int, hidden: np.ndarray, output_last: bool) -> None:
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self._ctx), 0, start, -1)
        hidden = np.ascontiguousarray(hidden, dtype=np.float32)
        batch = self._batch
        llama_cpp.llama_batch_ext_clear(batch)
        for i, token in enumerate(tokens):
            idx = llama_cpp.llama_batch_ext_add_token(batch, 0, token)
            pos = llama_cpp.llama_pos(start + i)
            row = hidden[i].ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            if (idx != i or not llama_cpp.llama_batch_ext_set_pos(batch, idx, ctypes.byref(pos))
                    or not llama_cpp.llama_batch_ext_set_embd_token(batch, idx, llama_cpp.llama_embd(row, 1, self.n_embd))):
                raise RuntimeError(f"llama.cpp refused token {i} of an MTP batch")
            llama_cpp.llama_batch_ext_set_output_logits(batch, idx, output_last and i == len(tokens) - 1)
        rc = llama_cpp.llama_process(self._ctx, llama_cpp.LLAMA_PROCESS_TYPE_DECODE, batch)
        if rc != 0:
            raise RuntimeError(f"llama_process on the MTP context failed with code {rc}")


class Speculation:
    """One generation's draft rounds on `engine`: where the next token's logits are, and what
    happens once a token is chosen (`advance`, in place of evaluating it)."""

    def __init__(self, engine, stats):
        self._engine, self._stats = engine, stats
        self._drafter: MtpDrafter = engine.drafter
        self._pending: list[int] = []  # drafts evaluated on the target, not yet checked
        self._length = self._drafter.n_max  # this round's draft length, adapted to acceptance
        self.row = -1  # logits row of the next token in the last target batch

    def advance(self, token: int, room: int) -> None:
        """`token` was chosen from row `row`: accept it as the next draft, or evaluate it with a new
        round of at most `room` - 1 drafts (`room`: tokens the generation may still use)."""
        stats = self._stats
        if self._pending and token == self._pending[0]:
            self._pending.pop(0)
            stats.draft_accepted += 1
            self.row += 1
            if not self._pending:
                self._length = min(self._length + 1, self._drafter.n_max)
            return
        if self._pending:
            self._length = max(1, self._length - 1)
            if not self._drop_pending():
                raise RuntimeError("llama.cpp could not roll the rejected drafts back")
        engine = self._engine
        n = max(0, min(self._length, room - 1, engine.n_ctx - len(engine._cached) - 1))
        drafts = self._drafter.draft(token, len(engine._cached), n) if n else []
        engine.eval([token, *drafts], every_row=bool(drafts))
        self._pending = drafts
        self.row = 0 if drafts else -1
        stats.draft_rounds += bool(drafts)
        stats.drafted_tokens += len(drafts)

    def finish(self) -> None:
        """Drop the drafts still unchecked when the generation ends (they count as rejected)."""
        if self._pending and not self._drop_pending():
            self._engine.reset()  # the next generation starts over rather than from a wrong state

    def _drop_pending(self) -> bool:
        """Take the unchecked drafts out of the target's memory; False where it cannot."""
        engine = self._engine
        self._stats.draft_rejected += len(self._pending)
        dropped = engine._trim(len(engine._cached) - len(self._pending))
        self._pending = []
        return dropped
