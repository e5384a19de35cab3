"""The engine's generation layer on real llama.cpp with generated models: chat template, sampling,
stop strings, UTF-8 across tokens, context limits, cancellation, prefix reuse and live stats."""

from __future__ import annotations

import random
import threading
import time

import pytest

from rotary_gguf.chat_template import render_chat_template
from rotary_gguf.engine import (
    Engine,
    PromptError,
    SamplingParams,
    StopFilter,
)

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def engine(test_model):
    with Engine.load(test_model(), n_ctx=512, n_threads=1) as e:
        yield e


def run(engine: Engine, prompt: str | list[int], **kwargs):
    """(text, token ids, final stats) of one generation."""
    tokens = engine.tokenize(prompt) if isinstance(prompt, str) else prompt
    events = list(engine.generate(tokens, **kwargs))
    return "".join(e.text for e in events), [e.token for e in events if e.token is not None], events[-1].stats


def test_chat_prompt_uses_the_models_template(engine):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    expected = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    expected += "<|im_start|>assistant\n"
    tokens = engine.chat_prompt(messages)
    assert tokens == engine.tokenize(expected, add_special=True, parse_special=True)
    # the markers are single special tokens, not their spelling in bytes
    assert engine.tokenize("<|im_start|>", add_special=False) == [tokens[0]]


def test_chat_template_features_and_refusals():
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools') }}"
        "{% endif %}{{ m.content | tojson }}{% if loop.last %}{% break %}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}>{% endif %}"
    )
    out = render_chat_template(template, [{"role": "user", "content": "é<"}], bos_token="<s>")
    assert out == '<s>"é<">'
    # what Qwen-style templates use: namespace, reversed slices, string methods, whitespace control
    qwen_like = (
        "{%- set ns = namespace(last_user=-1) %}\n"
        "{%- for m in messages[::-1] %}{% if ns.last_user < 0 and m.role == 'user' %}"
        "{% set ns.last_user = messages|length - 1 - loop.index0 %}{% endif %}{% endfor %}\n"
        "{%- for m in messages %}\n"
        "  {{- m.role ~ ':' ~ m.content.strip().split('|')[0] | trim }}{{ '*' if loop.index0 == ns.last_user }}\n"
        "{% endfor %}"
    )
    messages = [{"role": "user", "content": " a|x "}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert render_chat_template(qwen_like, messages) == "user:a\nassistant:b\nuser:c*\n"
    with pytest.raises(PromptError, match="no tools"):
        render_chat_template(template, [{"role": "tool", "content": "x"}])
    with pytest.raises(PromptError, match="does not parse"):
        render_chat_template("{% for %}", [])
    with pytest.raises(PromptError):  # the sandbox refuses to reach Python internals
        render_chat_template("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}", [])


def test_greedy_is_deterministic_and_counts_tokens(engine):
    text, tokens, stats = run(engine, PROMPT, max_tokens=20)
    again, tokens_again, _ = run(engine, PROMPT, max_tokens=20)
    assert (text, tokens) == (again, tokens_again)
    assert tokens == engine.greedy(engine.tokenize(PROMPT), 20)
    assert stats.completion_tokens == len(tokens) == 20
    assert stats.prompt_tokens == len(engine.tokenize(PROMPT))
    assert stats.finish_reason == "length"
    assert stats.ttft_seconds > 0 and stats.decode_tps > 0 and stats.prompt_tps > 0


def test_text_is_utf8_decoded_across_tokens(engine):
    """Every token of the test vocabulary is one byte: characters of two or more bytes span tokens,
    and events whose byte ends mid-character carry no text until it completes."""
    events = list(engine.generate(engine.tokenize("The quick brown fox"), max_tokens=200))
    text = "".join(e.text for e in events)
    raw = b"".join(engine.token_bytes(e.token) for e in events if e.token is not None)
    assert text == raw.decode("utf-8", errors="replace")
    assert any(ord(c) > 127 and c != "\ufffd" for c in text), "no multi-byte character was generated"
    assert any(e.text == "" for e in events)


def test_stop_strings_cut_the_text(engine):
    full, _, _ = run(engine, PROMPT, max_tokens=40)
    stop = full[10:13]  # three characters, usually from more than one token
    text, tokens, stats = run(engine, PROMPT, max_tokens=40, stop=[stop, "never in the text \x01\x02"])
    assert text == full[: full.index(stop)]
    assert stats.finish_reason == "stop"
    assert stats.completion_tokens == len(tokens) < 40


def test_stop_filter_holds_back_a_possible_stop():
    f = StopFilter(["END"])
    assert f.feed("abcE") == ("abc", False)
    assert f.feed("N") == ("", False)
    assert f.feed("x") == ("ENx", False)
    assert f.feed("zzEN") == ("zz", False)
    assert f.feed("D tail") == ("", True)
    g = StopFilter(["END"])
    assert g.feed("aEN") == ("a", False)
    assert g.flush() == "EN"


def first_stop(stops: list[str], text: str) -> tuple[str, bool]:
    """Reference: the text up to the stop string that ends first, by brute force."""
    for end in range(1, len(text) + 1):
        for s in stops:
            if text[:end].endswith(s):
                return text[: end - len(s)], True
    return text, False


def test_stop_filter_agrees_with_brute_force_however_the_text_is_split():
    rng = random.Random(19)
    for _ in range(2000):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 20)))
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 4))))
        f, out, hit = StopFilter(stops), "", False
        for a, b in zip([0, *cuts], [*cuts, len(text)]):
            emitted, hit = f.feed(text[a:b])
            out += emitted
            if hit:
                break
        if not hit:
            out += f.flush()
        assert (out, hit) == first_stop(stops, text), (stops, text, cuts)


def test_a_long_stop_string_costs_its_length_once():
    """Matching is linear: a 1 MB stop string over 5,000 tokens that keep almost matching it."""
    stop = "ab" * 2**19 + "!"
    f = StopFilter([stop])
    t0 = time.perf_counter()
    for _ in range(5000):
        assert f.feed("ab") == ("", False)  # held back: it could still become the stop string
    assert f.feed("c") == ("ab" * 5000 + "c", False)
    assert time.perf_counter() - t0 < 2  # the quadratic matcher took minutes


def test_context_limits(engine):
    n_ctx = engine.n_ctx  # what llama.cpp made of the requested size (it rounds up to 256)
    prompt = engine.tokenize("a" * (n_ctx - 5), add_special=False)
    text, tokens, stats = run(engine, prompt, max_tokens=100)
    assert stats.finish_reason == "length"
    assert len(prompt) + len(tokens) == n_ctx  # the reply fills the context
    with pytest.raises(PromptError, match=f"context of {n_ctx} tokens"):
        list(engine.generate(prompt * 2, max_tokens=1))
    with pytest.raises(PromptError, match="empty"):
        list(engine.generate([], max_tokens=1))


def test_sampling_parameters(engine):
    prompt = engine.tokenize(PROMPT)
    greedy = engine.greedy(prompt, 16)
    hot = SamplingParams(temperature=1.5, seed=7)
    _, a, _ = run(engine, prompt, max_tokens=16, sampling=hot)
    _, b, _ = run(engine, prompt, max_tokens=16, sampling=hot)
    assert a == b, "the same seed gives the same tokens"
    assert a != greedy
    _, top1, _ = run(engine, prompt, max_tokens=16, sampling=SamplingParams(temperature=1.5, top_k=1, seed=3))
    assert top1 == greedy, "top_k=1 is greedy at any temperature"
    _, penalized, _ = run(engine, prompt, max_tokens=16, sampling=SamplingParams(repeat_penalty=1.5))
    _, presence, _ = run(engine, prompt, max_tokens=16, sampling=SamplingParams(presence_penalty=1.5))
    assert len(set(penalized)) >= len(set(greedy)) and len(set(presence)) >= len(set(greedy))


def test_cancel_stops_between_tokens_and_live_stats_add_up(test_model):
    with Engine.load(test_model(), n_ctx=256, n_threads=1) as e:
        cancel = threading.Event()
        prompt = e.tokenize(PROMPT)
        seen = 0
        for event in e.generate(prompt, max_tokens=100, cancel=cancel):
            seen += 1
            if seen == 3:
                cancel.set()
        assert seen == 3 and event.stats.finish_reason == "cancelled"
        _, _, done = run(e, prompt, max_tokens=5)
        abandoned = e.generate(prompt, max_tokens=50)
        next(abandoned)
        abandoned.close()  # a consumer that stops reading
        finished = e.generate(prompt, max_tokens=2)
        next(finished), next(finished)
        finished.close()  # stops right after the last token: that is no cancellation
        _, _, done = run(e, prompt, max_tokens=5)

        s = e.live.snapshot()
        assert s.requests == {"cancelled": 2, "length": 3}
        assert s.in_flight == 0
        assert s.completion_tokens == 3 + 5 + 1 + 2 + 5
        assert s.prompt_tokens == 5 * len(prompt)
        assert s.last_decode_tps == done.decode_tps and s.avg_decode_tps > 0
        assert s.ttft_count == 5 and s.avg_ttft_seconds > 0


@pytest.mark.parametrize("arch", ["qwen3moe", "qwen35moe"])
def test_prefix_reuse_gives_the_same_tokens(test_model, arch):
    """A second turn that extends the first reuses the cached state (recurrent layers included)."""
    with Engine.load(test_model(arch=arch), n_ctx=256, n_threads=1) as e:
        first = e.tokenize("Hello there")
        _, reply, _ = run(e, first, max_tokens=8)
        second = first + reply[:-1] + e.tokenize(" and then", add_special=False)
        _, reused, stats = run(e, second, max_tokens=8)
        assert stats.cached_prompt_tokens == len(first) + len(reply) - 1
        e.reset()
        _, fresh, fresh_stats = run(e, second, max_tokens=8)
        assert fresh_stats.cached_prompt_tokens == 0
        assert reused == fresh


def test_the_prompt_time_is_the_prompts_on_an_asynchronous_accelerator(test_model, rpc_endpoint):
    """llama_decode returns before a ggml-rpc device (or CUDA) has computed the batch. A long
    prompt's compute must count as prompt time, not land in the first token's decode time: a
    400-token prompt takes longer than one decoded token, not the ~1 ms its launch takes."""
    from rotary_gguf import native
    from rotary_gguf.plan import Placement

    device = native.add_rpc_device(rpc_endpoint).name
    with Engine.load(test_model(), Placement(devices=(device,), n_gpu_layers=-1), n_ctx=512, n_threads=1) as engine:
        prompt = (engine.tokenize("The river bends past the old mill. ") * 80)[:400]
        stats = list(engine.generate(prompt, max_tokens=8))[-1].stats
    assert stats.completion_tokens == 8
    assert stats.prompt_seconds > 2 * stats.decode_seconds / stats.completion_tokens
