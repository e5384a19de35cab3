"""Prompt reuse on hybrid models: checkpoints of the recurrent state at turn boundaries let a
conversation whose template rewrites earlier turns (Qwen3.5 drops their thinking) evaluate only
the new turn, with the same tokens as a fresh context."""

from __future__ import annotations

import pytest

from test_dashboard import render
from conftest import assert_one_line_error, run_cli
from test_serve import API_KEY, Server
from rotary_gguf.dashboard import Dashboard
from rotary_gguf.units import human_bytes
from rotary_gguf.api.reply import ReplyParser
from rotary_gguf.engine import Engine
from rotary_gguf.prompt_cache import CheckpointStore
from rotary_gguf.thinking import Thinking

CTX = 4096
TURNS = 5


@pytest.fixture(scope="module")
def model(test_model):
    return test_model(arch="qwen35moe", chat_template="qwen3.5")


def greedy(engine: Engine, prompt: list[int], n: int, **kwargs) -> tuple[list[int], int]:
    events = list(engine.generate(prompt, max_tokens=n, **kwargs))
    return [e.token for e in events if e.token is not None], events[-1].stats.cached_prompt_tokens


def test_restart_from_a_checkpoint_gives_the_fresh_tokens(model):
    with Engine.load(model, n_ctx=512, n_threads=1) as engine:
        a = engine.tokenize("The first part of the talk")
        b = engine.tokenize(" and one ending", add_special=False)
        c = engine.tokenize(" but another ending, longer", add_special=False)
        greedy(engine, a + b, 6, checkpoint_at=[len(a)])
        assert engine.checkpoints.snapshot()["count"] == 1
        reused_tokens, reused = greedy(engine, a + c, 6)
        assert reused == len(a)  # the context held a+b+reply: only the checkpoint's prefix is reusable
        held = engine.checkpoints.snapshot()
        text = "\n".join(render(Dashboard(engine, serving=True), 120, 30))
        assert held["count"] == 1 and f"checkpoints {human_bytes(held['bytes'])} / 512.0 MiB (1)" in text
        engine.reset()
        fresh_tokens, fresh = greedy(engine, a + c, 6)
        assert fresh == 0 and reused_tokens == fresh_tokens
        # without a checkpoint within the shared prefix, the whole prompt is evaluated again
        assert greedy(engine, a[:3] + c, 2)[1] == 0


def test_checkpoint_memory_is_bounded():
    store = CheckpointStore(max_bytes=250)
    for n in range(1, 5):
        store.add(tuple(range(n)), bytes(100))
    snap = store.snapshot()
    assert (snap["count"], snap["bytes"]) == (2, 200)  # the least recently used went first
    assert store.best([0, 1, 2, 3, 9], usable=5).tokens == (0, 1, 2, 3)
    assert store.best([0, 1, 2, 7], usable=5).tokens == (0, 1, 2)
    assert store.best([0, 1, 2, 3], usable=2) is None
    store.add(tuple(range(9)), bytes(300))  # larger than the budget: not kept
    assert store.snapshot()["count"] == 2


def run_conversation(server: Server) -> list[tuple[list[dict], dict]]:
    """Five turns with thinking; each turn sends the earlier replies back (reasoning included)."""
    messages: list[dict] = [{"role": "system", "content": "You are terse."}]
    turns = []
    for turn in range(TURNS):
        messages.append({"role": "user", "content": f"Question {turn}: and what about the weather there?"})
        body = {"messages": messages, "max_tokens": 24, "temperature": 0, "thinking_budget": 8}
        reply = server.post("/v1/chat/completions", json=body).json()
        turns.append(([dict(m) for m in messages], reply))
        message = reply["choices"][0]["message"]
        messages.append({"role": "assistant", "content": message["content"],
                         "reasoning_content": message.get("reasoning_content")})
    return turns


def test_five_turns_with_thinking_evaluate_only_the_new_turn(tmp_path, model):
    server = Server(tmp_path, model, "--ctx", str(CTX), "--api-key", API_KEY, "--checkpoint-memory", "1MiB")
    try:
        turns = run_conversation(server)
        metrics = server.metrics()
    finally:
        server.stop()
    with Engine.load(model, n_ctx=CTX, n_threads=1) as engine:
        previous_turn_start = 0
        for i, (messages, reply) in enumerate(turns):
            prompt = engine.chat_prompt(messages)
            head = engine.chat_prompt(messages, add_generation_prompt=False)
            usage = reply["usage"]
            assert usage["prompt_tokens"] == len(prompt)
            evaluated = usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"]
            # after the first turn: exactly the tokens after the last turn's boundary
            assert evaluated == (len(prompt) if i == 0 else len(prompt) - previous_turn_start)
            previous_turn_start = len(head)
            # and the reply is the one a fresh context gives
            engine.reset()
            parser = ReplyParser(thinking=True, may_think=True)
            parser.feed("".join(e.text for e in engine.generate(prompt, max_tokens=24, thinking=Thinking(open=True, budget=8))))
            parser.finish()
            reasoning, content, _ = parser.message()
            assert (reply["choices"][0]["message"]["content"], reply["choices"][0]["message"].get("reasoning_content")) \
                == (content, reasoning or None)
    assert metrics["rotary_gguf_prompt_checkpoints"] >= 1 and metrics["rotary_gguf_prompt_checkpoint_max_bytes"] == 2**20
    assert 0 < metrics["rotary_gguf_prompt_checkpoint_bytes"] <= 2**20


def test_a_bad_checkpoint_memory_is_one_line(model):
    assert_one_line_error(run_cli("serve", model, "--checkpoint-memory", "lots"), "bad size 'lots'")


def test_turn_start_is_where_the_generation_prompt_begins(test_model, model):
    messages = [{"role": "user", "content": "Hi"}]
    with Engine.load(model, n_ctx=512, n_threads=1) as engine:
        prompt = engine.chat_prompt(messages)
        [start] = engine.turn_start(messages, prompt)
        assert prompt[start:] == engine.tokenize("<|im_start|>assistant\n<think>\n", add_special=False)
    with Engine.load(test_model(chat_template="qwen3.5"), n_ctx=512, n_threads=1) as attention_only:
        assert attention_only.checkpoints is None
        assert attention_only.turn_start(messages, attention_only.chat_prompt(messages)) == ()
