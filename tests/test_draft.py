"""Multi-token-prediction drafts on real llama.cpp: qwen35moe test models with an MTP block, whose
greedy and seeded output must be the same token for token as without drafts, on the CPU, with the
experts on the host next to the simulated accelerator, and through the expert cache."""

from __future__ import annotations

import re

import pytest
from conftest import assert_one_line_error, run_cli

from rotary_gguf import native
from rotary_gguf.engine import Engine, SamplingParams
from rotary_gguf.errors import UserError
from rotary_gguf.experts.cache import ExpertCache
from rotary_gguf.inventory import read_inventory
from rotary_gguf.plan import ModelFigures, Placement
from test_dashboard import render
from test_expert_cache import FOLLOW_UP, PROMPT, host_experts

from rotary_gguf.dashboard import Dashboard

MIRROR = dict(arch="qwen35moe", mtp="mirror", router_skew=1.5)  # a head the model often agrees with
RANDOM = dict(arch="qwen35moe", mtp="random")  # a head whose drafts are nearly all rejected
AGREEABLE = dict(MIRROR, trunk_gain=0.1)  # a trunk that adds little: most drafts are accepted
MODELS = {"mirror": MIRROR, "random": RANDOM, "agreeable": AGREEABLE}
N = 40


def turns(engine: Engine, sampling: SamplingParams | None = None) -> tuple[list[list[int]], list]:
    """Two turns (the second reuses the first's context) and their stats."""
    prompt = engine.tokenize(PROMPT)
    out, stats = [], []
    for _ in range(2):
        events = list(engine.generate(prompt, max_tokens=N, sampling=sampling))
        out.append([e.token for e in events if e.token is not None])
        stats.append(events[-1].stats)
        prompt = prompt + out[-1] + engine.tokenize(FOLLOW_UP, add_special=False)
    return out, stats


def assert_stats_add_up(stats) -> None:
    assert stats.drafted_tokens == stats.draft_accepted + stats.draft_rejected
    assert stats.draft_rounds > 0 and stats.drafted_tokens >= stats.draft_rounds
    assert stats.mean_accepted == pytest.approx(stats.draft_accepted / stats.draft_rounds)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("draft_max", [1, 3])
def test_greedy_output_is_the_same_with_drafts_on_the_cpu(test_model, model, draft_max):
    path = test_model(**MODELS[model])
    with Engine.load(path, n_ctx=256, n_threads=1) as engine:
        reference, _ = turns(engine)
    with Engine.load(path, n_ctx=256, n_threads=1, draft="mtp", draft_max=draft_max) as engine:
        got, stats = turns(engine)
    assert got == reference
    for s in stats:
        assert_stats_add_up(s)
        assert s.drafted_tokens <= draft_max * s.draft_rounds
    accepted, drafted = sum(s.draft_accepted for s in stats), sum(s.drafted_tokens for s in stats)
    if model == "mirror":  # both accepted and rejected drafts were exercised
        assert 0 < accepted < drafted
    if model == "agreeable":  # most drafts are accepted, whole rounds of them
        assert accepted > drafted / 2 and max(s.mean_accepted for s in stats) > (1.0 if draft_max > 1 else 0.5)


def test_greedy_output_is_the_same_with_experts_on_the_host_of_the_rpc_device(test_model, rpc_endpoint):
    path = test_model(**MIRROR)
    placement = host_experts(native.add_rpc_device(rpc_endpoint))
    with Engine.load(path, placement, n_ctx=256, n_threads=1) as engine:
        reference, _ = turns(engine)
    with Engine.load(path, placement, n_ctx=256, n_threads=1, draft="mtp") as engine:
        got, stats = turns(engine)
    assert got == reference
    assert_stats_add_up(stats[0])


def test_greedy_output_is_the_same_through_the_split_expert_cache(test_model, rpc_endpoint):
    path = test_model(**MIRROR)
    rpc = native.add_rpc_device(rpc_endpoint)
    figures, inv = ModelFigures.from_inventory(read_inventory(path)), read_inventory(path)

    def cache() -> ExpertCache:
        return ExpertCache(figures.n_layer, inv.n_expert, inv.n_expert_used, inv.n_expert // 2, rpc.buffer_type,
                           split=True, n_threads=1)

    with Engine.load(path, host_experts(rpc), n_ctx=256, n_threads=1, expert_cache=cache()) as engine:
        reference, _ = turns(engine)
    with Engine.load(path, host_experts(rpc), n_ctx=256, n_threads=1, expert_cache=cache(), draft="mtp") as engine:
        got, stats = turns(engine)
        snapshot = engine.expert_cache.snapshot()
    assert got == reference
    assert snapshot["enabled"] and snapshot["hits"] > 0 and snapshot["misses"] > 0
    assert stats[0].draft_accepted > 0


def test_sampled_output_keeps_the_seed_and_the_distribution(test_model):
    path = test_model(**MIRROR)
    sampling = SamplingParams(temperature=0.7, top_k=20, seed=11)
    with Engine.load(path, n_ctx=256, n_threads=1) as engine:
        reference, _ = turns(engine, sampling)
    with Engine.load(path, n_ctx=256, n_threads=1, draft="mtp", draft_max=4) as engine:
        got, stats = turns(engine, sampling)
        again, _ = turns(engine, sampling)
    # each token is drawn by the same sampler chain from the target's own logits: the same seed
    # gives the same text, draft or not
    assert got == reference == again
    assert_stats_add_up(stats[0])


def test_logprobs_come_from_the_verified_rows(test_model):
    path = test_model(**MIRROR)
    with Engine.load(path, n_ctx=256, n_threads=1) as engine:
        prompt = engine.tokenize(PROMPT)
        reference = [e.logprob.logprob for e in engine.generate(prompt, max_tokens=20, logprobs=0)]
    with Engine.load(path, n_ctx=256, n_threads=1, draft="mtp") as engine:
        events = list(engine.generate(prompt, max_tokens=20, logprobs=0))
    assert events[-1].stats.draft_accepted > 0
    assert [e.logprob.logprob for e in events] == pytest.approx(reference, abs=1e-3)


def test_a_model_without_an_mtp_block_is_refused(test_model):
    with pytest.raises(UserError, match="no multi-token-prediction"):
        Engine.load(test_model(arch="qwen35moe"), draft="mtp")
    with pytest.raises(UserError, match="between 1 and"):
        Engine.load(test_model(**MIRROR), draft="mtp", draft_max=0)


def test_cli_generate_reports_drafts_and_refuses_a_model_without_a_head(test_model):
    path = test_model(**MIRROR)
    plain = run_cli("generate", str(path), "-p", PROMPT, "-n", "24", "--draft", "off")
    drafted = run_cli("generate", str(path), "-p", PROMPT, "-n", "24", "--draft", "mtp", "--draft-max", "2")
    assert plain.returncode == drafted.returncode == 0, drafted.stderr
    summary = re.compile(r"\n(?=\d+ prompt tokens )")
    text, closing = summary.split(drafted.stdout)
    assert re.search(r"\d+ drafted, \d+ accepted \(\d+\.\d\d per round\)", " ".join(closing.split())), closing
    assert text == summary.split(plain.stdout)[0]
    assert_one_line_error(run_cli("generate", str(test_model(arch="qwen35moe")), "--draft", "mtp"), "no multi-token-prediction")
    assert_one_line_error(run_cli("generate", str(path), "--draft", "eagle"), "unknown draft mode")


def test_the_mtp_blocks_experts_stay_in_host_memory_beside_an_accelerator(test_model, rpc_endpoint):
    path = test_model(**MIRROR)
    inv = read_inventory(path)
    head = [t for t in inv.tensors if t.layer == ModelFigures.from_inventory(inv).n_layer]
    head_experts = sum(t.nbytes for t in head if "_exps." in t.name)
    everything_on_it = Placement(devices=(native.add_rpc_device(rpc_endpoint).name,), n_gpu_layers=-1, repack=False)
    with Engine.load(path, everything_on_it, n_ctx=256, n_threads=1) as engine:
        without = engine.load_report.weight_bytes
    with Engine.load(path, everything_on_it, n_ctx=256, n_threads=1, draft="mtp") as engine:
        drafting = engine.load_report.weight_bytes
        assert engine.greedy(engine.tokenize(PROMPT), 4)

    def accelerator(sizes: dict[str, int]) -> int:  # (a mapped host buffer spans the file, so not the host side)
        return sum(n for name, n in sizes.items() if not name.startswith("CPU"))

    growth, head_rest = accelerator(drafting) - accelerator(without), sum(t.nbytes for t in head) - head_experts
    assert 0 < growth <= head_rest + 16 * 1024 and head_rest < head_experts  # the block came, its experts did not


def test_draft_rounds_stop_at_the_end_of_the_context(test_model):
    path = test_model(**AGREEABLE)
    with Engine.load(path, n_ctx=256, n_threads=1) as engine:
        prompt = engine.tokenize(PROMPT)
        room = engine.n_ctx - len(prompt)
        reference = engine.greedy(prompt, room + 8)
    with Engine.load(path, n_ctx=256, n_batch=8, n_threads=1, draft="mtp", draft_max=4) as engine:
        events = list(engine.generate(prompt, max_tokens=room + 8))
    assert len(reference) == room and [e.token for e in events if e.token is not None] == reference
    assert events[-1].stats.draft_accepted > 0


def test_a_micro_batch_too_small_for_a_round_is_refused(test_model):
    with pytest.raises(UserError, match="--ubatch"):
        Engine.load(test_model(**MIRROR), n_batch=8, n_ubatch=4, draft="mtp", draft_max=3)


def test_the_api_serves_the_same_replies_with_drafts(test_model):
    from fastapi.testclient import TestClient

    from rotary_gguf.serve import ServeOptions, create_app

    path = test_model(**AGREEABLE, chat_template="qwen3.5")
    messages = [{"role": "user", "content": "Tell me about the river."}]
    bodies = [{"messages": messages, "max_tokens": 24, "temperature": 0},
              {"messages": messages, "max_tokens": 24, "temperature": 0.8, "seed": 5},
              {"messages": messages, "max_tokens": 24, "temperature": 0, "stream": True}]

    metrics: dict[str, str] = {}

    def replies(**draft) -> list[str]:
        with Engine.load(path, n_ctx=256, n_threads=1, **draft) as engine:
            with TestClient(create_app(engine, ServeOptions("drafts", max_queue=2))) as client:
                out = [client.post("/v1/chat/completions", json=body) for body in bodies]
                assert all(r.status_code == 200 for r in out)
                metrics[draft.get("draft", "off")] = client.get("/metrics").text
            if draft:  # the dashboard shows the drafts of finished generations
                lines = render(Dashboard(engine), 120, 40)
                assert any(re.search(r"drafts \d+% accepted · \d+\.\d/round", line) for line in lines), lines
                return [r.text if body.get("stream") else r.json()["choices"][0]["message"] for r, body in zip(out, bodies)]
            return [r.text if body.get("stream") else r.json()["choices"][0]["message"] for r, body in zip(out, bodies)]

    plain, drafted = replies(), replies(draft="mtp")
    figures = {name: float(value) for name, value in re.findall(r'^rotary_gguf_(draft\S*) (\S+)$', metrics["mtp"], re.M)}
    accepted, rejected = figures['draft_tokens_total{outcome="accepted"}'], figures['draft_tokens_total{outcome="rejected"}']
    assert accepted > 0 and figures["draft_rounds_total"] > 0
    assert figures["draft_mean_accepted_length"] == pytest.approx(accepted / figures["draft_rounds_total"])
    assert 'rotary_gguf_draft_tokens_total{outcome="accepted"} 0' in metrics["off"] and rejected >= 0
    assert drafted[0] == plain[0] and drafted[1] == plain[1]
    assert any(plain[0].get(key) for key in ("content", "reasoning_content"))
    # streamed chunks carry ids and timestamps: compare the text they stream
    text = lambda sse: re.findall(r'"content":"((?:[^"\\]|\\.)*)"', sse)  # noqa: E731
    assert text(drafted[2]) == text(plain[2]) and text(plain[2])


def test_inspect_names_the_mtp_block(test_model):
    import json

    doc = json.loads(run_cli("inspect", test_model(**MIRROR), "--json").stdout)
    assert doc["n_mtp_layers"] == 1 and doc["attention"]["layers"][-1] == "mtp"
    assert doc["attention"]["full"] + doc["attention"]["linear"] == doc["n_layer"] - 1
    plain = json.loads(run_cli("inspect", test_model(arch="qwen35moe"), "--json").stdout)
    assert plain["n_mtp_layers"] == 0 and "mtp" not in plain["attention"]["layers"]
