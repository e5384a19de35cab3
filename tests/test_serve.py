"""`rotary-gguf serve` as users run it: a real server process on a generated model, spoken to with
the official `openai` client and raw HTTP. Outputs are compared with the engine's own."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import threading
import time

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from conftest import CLI, assert_one_line_error, free_port, run_cli
from rotary_gguf import native
from rotary_gguf.arch import expert_pattern
from rotary_gguf.engine import Engine
from rotary_gguf.experts.cache import ExpertCache
from rotary_gguf.inventory import read_inventory
from rotary_gguf.plan import Placement
from rotary_gguf.metrics import prometheus_text
from rotary_gguf.serve import ServeOptions, create_app

API_KEY = "sk-test-key"
CTX = 256
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": "Tell me a story."},
]


class Server:
    """A `rotary-gguf serve` subprocess; ready once /health answers."""

    def __init__(self, tmp_path, model, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / f"serve-{self.port}.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [CLI, "serve", str(model), "--port", str(self.port), "--threads", "1", *args],
                stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the server did not start:\n{self.log.read_text()}")
            time.sleep(0.1)

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0, **kwargs)

    def post(self, path: str, **kwargs) -> httpx.Response:
        headers = {"Authorization": f"Bearer {API_KEY}", **kwargs.pop("headers", {})}
        return httpx.post(self.url + path, headers=headers, timeout=30, **kwargs)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
        return {name: float(value) for name, value in re.findall(r"^(rotary_gguf_\S+) (\S+)$", text, re.M)}

    def wait_metric(self, name: str, predicate, timeout: float = 20) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while not predicate((m := self.metrics()).get(name, 0)):
            assert time.monotonic() < deadline, f"{name} stayed at {m.get(name)}"
            time.sleep(0.02)
        return m

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def engine_text(engine: Engine, prompt: list[int], n: int) -> str:
    return "".join(e.text for e in engine.generate(prompt, max_tokens=n))


# --- on the CPU ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(test_model):
    return test_model()


@pytest.fixture(scope="module")
def server(tmp_path_factory, model):
    s = Server(tmp_path_factory.mktemp("serve"), model, "--ctx", str(CTX), "--api-key", API_KEY)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def engine(model):
    with Engine.load(model, n_ctx=CTX, n_threads=1) as e:
        yield e


def test_health_and_models(server, model):
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"  # no key needed
    models = server.client().models.list().data
    assert [m.id for m in models] == [model.stem]


def test_chat_equals_engine_greedy_with_usage(server, engine):
    prompt = engine.chat_prompt(MESSAGES)
    reply = server.client().chat.completions.create(model="any", messages=MESSAGES, temperature=0, max_tokens=12)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == engine_text(engine, prompt, 12)
    assert reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt), 12)
    assert reply.usage.total_tokens == len(prompt) + 12


def test_chat_streaming(server, engine):
    prompt = engine.chat_prompt(MESSAGES[:2])
    stream = server.client().chat.completions.create(
        model="any", messages=MESSAGES[:2], temperature=0, max_completion_tokens=10, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == engine_text(engine, prompt, 10)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == len(prompt)
    assert chunks[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])


def test_sse_wire_format(server):
    body = {"messages": MESSAGES[:2], "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"


def test_completions(server, engine):
    prompt_text = "The quick brown fox"
    prompt = engine.tokenize(prompt_text)
    client = server.client()
    done = client.completions.create(model="any", prompt=prompt_text, temperature=0, max_tokens=15)
    assert done.choices[0].text == engine_text(engine, prompt, 15)
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (len(prompt), 15)
    streamed = client.completions.create(model="any", prompt=prompt_text, temperature=0, max_tokens=15, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == done.choices[0].text
    by_ids = client.completions.create(model="any", prompt=prompt, temperature=0, max_tokens=15)
    assert by_ids.choices[0].text == done.choices[0].text


def test_stop_and_seed(server, engine):
    client = server.client()
    full = client.completions.create(model="any", prompt="Once", temperature=0, max_tokens=30).choices[0].text
    stop = full[12:15]
    cut = client.completions.create(model="any", prompt="Once", temperature=0, max_tokens=30, stop=stop)
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < 30

    def sampled(seed: int) -> str:
        r = client.chat.completions.create(model="any", messages=MESSAGES, temperature=1.2, top_p=0.95, seed=seed, max_tokens=12)
        return r.choices[0].message.content

    assert sampled(5) == sampled(5)


def test_eight_concurrent_clients(server, engine):
    prompts = [[{"role": "user", "content": f"Question number {i}?"}] for i in range(8)]
    expected = [engine_text(engine, engine.chat_prompt(m), 16) for m in prompts]
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)

    async def ask(messages, stream: bool) -> str:
        if not stream:
            r = await client.chat.completions.create(model="any", messages=messages, temperature=0, max_tokens=16)
            return r.choices[0].message.content
        chunks = await client.chat.completions.create(model="any", messages=messages, temperature=0, max_tokens=16, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in chunks])

    async def main():
        return await asyncio.gather(*(ask(m, stream=i % 2 == 0) for i, m in enumerate(prompts)))

    assert asyncio.run(main()) == expected


def test_api_key(server):
    body = {"messages": MESSAGES[:2], "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert server.post("/v1/chat/completions", json=body).status_code == 200


def test_the_key_is_checked_before_anything_else(server):
    """Without the key, a broken body is 401 (not a validation error that describes the API), and
    the API's description itself (/docs, /openapi.json) is closed too."""
    for body in (b"{not json", b'{"messages": 5}'):
        r = httpx.post(f"{server.url}/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 401, r.text
    for path in ("/docs", "/openapi.json", "/redoc", "/no-such-page"):
        assert httpx.get(server.url + path).status_code == 401, path
    key = {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.get(f"{server.url}/openapi.json", headers=key).json()["info"]["title"] == "rotary-gguf"
    assert httpx.get(f"{server.url}/docs", headers=key).status_code == 200
    assert httpx.get(f"{server.url}/health").status_code == 200


def open_and_stall(url: str, sent: bytes, clients: int) -> list[socket.socket]:
    host, port = url.removeprefix("http://").split(":")
    socks = []
    for _ in range(clients):
        s = socket.create_connection((host, int(port)))
        s.sendall(sent)
        s.settimeout(10)
        socks.append(s)
    return socks


@pytest.mark.parametrize(
    "sent",
    [b"", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le",
     b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"prompt\""],
    ids=["nothing", "half-the-headers", "half-the-body"],
)
def test_stalled_connections_are_closed(tmp_path, model, sent):
    """50 clients that open a connection and stop sending: the server hangs up on each after
    --read-timeout, and still answers others meanwhile."""
    s = Server(tmp_path, model, "--ctx", str(CTX), "--read-timeout", "1")
    try:
        t0 = time.monotonic()
        socks = open_and_stall(s.url, sent, 50)
        assert httpx.get(f"{s.url}/health", timeout=5).status_code == 200
        for sock in socks:
            assert sock.recv(1024) == b""  # closed by the server, no answer
            sock.close()
        assert 0.9 < time.monotonic() - t0 < 5
    finally:
        s.stop()


def test_usage_errors_are_one_line(model):
    assert_one_line_error(run_cli("plan", model, "--ctx", "0"), "--ctx", "plan --help")
    assert_one_line_error(run_cli("serve", model, "--port", "80000"), "--port", "65535")
    assert_one_line_error(run_cli("inspect", "--no-such-option"), "--no-such-option")
    assert_one_line_error(run_cli("no-such-command"), "no-such-command")


@pytest.mark.parametrize(
    "path, body, fragment, param",
    [
        ("/v1/chat/completions", b'{"messages": [', "not valid JSON", None),
        ("/v1/chat/completions", b"[1, 2]", "request body", None),
        ("/v1/chat/completions", {"max_tokens": 3}, "messages: Field required", "messages"),
        ("/v1/chat/completions", {"messages": []}, "messages", "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "role", "messages.0.role"),
        ("/v1/chat/completions", {"messages": MESSAGES, "temperature": 3}, "temperature", "temperature"),
        ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 0}, "max_tokens", "max_tokens"),
        ("/v1/chat/completions", {"messages": MESSAGES, "n": 2}, "n=1", "n"),
        ("/v1/chat/completions", {"messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, "stop", "stop"),
        ("/v1/chat/completions", {"messages": MESSAGES, "stop": [1]}, "stop", "stop.0"),
        ("/v1/completions", {"prompt": "x", "stop": ["x" * 1001]}, "at most 1000 characters", "stop"),
        ("/v1/chat/completions", {"messages": MESSAGES, "tools": [{"type": "function"}]}, "required", "tools.0.function"),
        ("/v1/chat/completions", {"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]},
         "does not take tools", "tools"),
        ("/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, "needs logprobs", "top_logprobs"),
        ("/v1/completions", {"prompt": "x " * 400}, "context", "prompt"),
        ("/v1/completions", {"prompt": [5, 10**6]}, "vocabulary", "prompt"),
        ("/v1/completions", {"prompt": ["a", "b"]}, "one prompt", "prompt"),
        ("/v1/completions", {"prompt": "x", "echo": True}, "echo", "echo"),
        ("/v1/completions", {"prompt": ""}, "empty", "prompt"),
    ],
)
def test_bad_requests_get_openai_errors(server, path, body, fragment, param):
    kwargs = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = server.post(path, **kwargs)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert fragment in error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] == param


ODD_VALUES = [None, True, -1, 0, 2, 10**40, 1e308, "x", "", [], {}, [1], ["a"], [None], {"type": "x"}, "\ud800"]


def test_no_server_error_for_any_odd_field_value(server):
    """A small fuzz over every request field: whatever a client sends is a 200 or a 4xx with an
    OpenAI error body, never a 5xx."""
    fields = ["model", "messages", "prompt", "temperature", "top_p", "top_k", "min_p", "repeat_penalty",
              "frequency_penalty", "presence_penalty", "seed", "stop", "stream", "stream_options", "n", "logprobs",
              "logit_bias", "max_tokens", "max_completion_tokens", "tools", "response_format", "echo", "suffix"]
    bases = {"/v1/chat/completions": {"messages": MESSAGES[:2], "max_tokens": 2},
             "/v1/completions": {"prompt": "hi", "max_tokens": 2}}
    statuses = set()
    with httpx.Client(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as client:
        for path, base in bases.items():
            for name in fields:
                for value in ODD_VALUES:
                    body = json.dumps({**base, name: value})  # ASCII: a lone surrogate travels as \ud800
                    r = client.post(server.url + path, content=body, headers={"Content-Type": "application/json"})
                    statuses.add(r.status_code)
                    assert r.status_code < 500, (path, name, value, r.text)
                    if r.status_code != 200:
                        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
                    elif value is True and name == "stream":
                        assert r.text.rstrip().endswith("data: [DONE]")
            for role in ("tool", 1, None):
                r = client.post(server.url + path, json={**base, "messages": [{"role": role, "content": "x"}]})
                assert r.status_code < 500
    assert statuses >= {200, 400}


def test_prompt_longer_than_context_through_the_client(server):
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(model="any", messages=[{"role": "user", "content": "word " * 300}])
    assert e.value.code == "context_length_exceeded"
    assert f"context of {CTX} tokens" in e.value.message


def test_unknown_route_and_method(server):
    assert httpx.get(f"{server.url}/v1/nothing").status_code == 401  # with a key set, nothing is told without it
    key = {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.get(f"{server.url}/v1/nothing", headers=key).json()["error"]["message"] == "Not Found"
    assert httpx.delete(f"{server.url}/health").status_code == 405


def test_metrics(server):
    before = server.metrics()
    server.client().completions.create(model="any", prompt="Hi", temperature=0, max_tokens=7)
    after = server.metrics()
    assert after["rotary_gguf_completion_tokens_total"] - before["rotary_gguf_completion_tokens_total"] == 7
    assert after['rotary_gguf_requests_total{finish_reason="length"}'] == before['rotary_gguf_requests_total{finish_reason="length"}'] + 1
    assert after["rotary_gguf_decode_tokens_per_second"] > 0
    assert after["rotary_gguf_time_to_first_token_seconds_count"] > before["rotary_gguf_time_to_first_token_seconds_count"]
    assert after["rotary_gguf_queue_length"] == 0 and after["rotary_gguf_requests_in_flight"] == 0


# --- on the simulated accelerator (ggml-rpc): slower tokens, so requests can be caught in flight ---
@pytest.fixture(scope="module")
def rpc_model(test_model):
    return test_model(arch="qwen35moe", quant="q8_0")


@pytest.fixture(scope="module")
def rpc_server(tmp_path_factory, rpc_model, rpc_endpoint):
    s = Server(tmp_path_factory.mktemp("serve-rpc"), rpc_model, "--rpc", rpc_endpoint, "--ctx", "2048",
               "--max-queue", "1", "--api-key", API_KEY)
    yield s
    s.stop()


def long_stream(server: Server, max_tokens: int = 1900):
    """An open streaming response whose generation has started, and its line iterator (dropping
    the iterator would close the connection)."""
    client = httpx.Client(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    body = {"messages": MESSAGES[:2], "max_tokens": max_tokens, "temperature": 0, "stream": True}
    response = client.send(client.build_request("POST", f"{server.url}/v1/chat/completions", json=body), stream=True)
    assert response.status_code == 200
    lines = response.iter_lines()
    assert next(lines).startswith("data: ")
    return response, lines


def test_rpc_placement_gives_the_cpu_output(rpc_server, rpc_model):
    with Engine.load(rpc_model, n_ctx=2048, n_threads=1) as cpu:
        expected = engine_text(cpu, cpu.chat_prompt(MESSAGES), 20)
    reply = rpc_server.client().chat.completions.create(model="any", messages=MESSAGES, temperature=0, max_tokens=20)
    assert reply.choices[0].message.content == expected
    memory = rpc_server.metrics()
    assert memory['rotary_gguf_accelerator_memory_total_bytes{device="RPC0"}'] > 0
    # one device: the same names, one sample each; what the engine placed there within the plan's budget
    placed, budget = (memory[f'rotary_gguf_accelerator_{name}_bytes{{device="RPC0"}}'] for name in ("placed", "budget"))
    assert 0 < placed <= budget
    assert not any("RPC1" in name for name in memory)


def test_disconnect_cancels_the_generation(rpc_server):
    cancelled = 'rotary_gguf_requests_total{finish_reason="cancelled"}'
    before = rpc_server.metrics()
    response, lines = long_stream(rpc_server)
    received = [line for line in (next(lines) for _ in range(8)) if line]
    assert all(line.startswith("data: ") for line in received)
    response.close()
    after = rpc_server.wait_metric(cancelled, lambda v: v == before.get(cancelled, 0) + 1)
    generated = after["rotary_gguf_completion_tokens_total"] - before["rotary_gguf_completion_tokens_total"]
    # Typically one or two tokens beyond those read; the margin is for a loaded machine (~3 ms a token).
    assert generated <= len(received) + 30, f"{generated} of 1900 tokens were generated, {len(received)} read"
    assert after["rotary_gguf_requests_in_flight"] == 0


def test_full_queue_answers_503(rpc_server):
    running, _lines = long_stream(rpc_server)
    waiting: dict = {}
    thread = threading.Thread(target=lambda: waiting.update(r=rpc_server.post(
        "/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "temperature": 0})))
    thread.start()
    rpc_server.wait_metric("rotary_gguf_queue_length", lambda v: v == 1)
    refused = rpc_server.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert refused.status_code == 503
    assert refused.headers["retry-after"].isdigit()
    assert refused.json()["error"]["code"] == "queue_full"
    running.close()
    thread.join(timeout=30)
    assert waiting["r"].status_code == 200 and waiting["r"].json()["usage"]["completion_tokens"] == 2
    assert rpc_server.metrics()["rotary_gguf_requests_rejected_total"] >= 1


def test_sigterm_mid_stream_shuts_down_cleanly(rpc_server):
    """Last of the RPC tests: it stops the module's server."""
    response, lines = long_stream(rpc_server)
    next(lines)
    rpc_server.proc.send_signal(signal.SIGTERM)
    assert rpc_server.proc.wait(timeout=20) == 0
    rest = list(lines)  # the stream ends promptly, with an error event, not [DONE]
    assert "data: [DONE]" not in rest
    assert any("shutting down" in line for line in rest)
    response.close()
    assert "Traceback" not in rpc_server.log.read_text()


def test_serve_refuses_a_missing_model(tmp_path):
    assert_one_line_error(run_cli("serve", tmp_path / "missing.gguf", "--port", str(free_port())), "missing.gguf")


# --- the expert cache's figures on /metrics (in-process, on the simulated accelerator) -------------
PROMETHEUS_SAMPLE = re.compile(
    r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[a-zA-Z_][a-zA-Z0-9_]*="[^"\\\n]*"(?:,[a-zA-Z_][a-zA-Z0-9_]*="[^"\\\n]*")*\})? (\S+)$')


def parse_prometheus(text: str) -> dict[str, float]:
    """Samples (name{labels} -> value) of Prometheus' text format, checked on the way: each family
    has a HELP line, then a TYPE line, then only its own samples (counters named *_total), and no
    sample repeats."""
    samples: dict[str, float] = {}
    family = kind = None
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            _, _, family, help_text = line.split(" ", 3)
            assert help_text.strip() and family not in {k.split("{")[0] for k in samples}, line
            kind = None
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name == family and kind in ("counter", "gauge", "summary"), line
        else:
            m = PROMETHEUS_SAMPLE.match(line)
            assert m and kind is not None, line
            name, labels, value = m.groups()
            assert name in ({family, family + "_sum", family + "_count"} if kind == "summary" else {family}), line
            assert kind != "counter" or name.endswith("_total"), line
            assert name + (labels or "") not in samples, line
            samples[name + (labels or "")] = float(value)
    return samples


def cache_samples(snapshot: dict) -> dict[str, float]:
    """What /metrics should say of an expert cache snapshot."""
    expected = {
        "rotary_gguf_expert_cache_enabled": float(snapshot["enabled"]),
        "rotary_gguf_expert_cache_slots": snapshot["slots"],
        "rotary_gguf_expert_cache_hits_total": snapshot["hits"],
        "rotary_gguf_expert_cache_misses_total": snapshot["misses"],
        "rotary_gguf_expert_cache_hit_rate": snapshot["hit_rate"],
        "rotary_gguf_expert_cache_hit_rate_recent": snapshot["recent_hit_rate"],
        "rotary_gguf_expert_cache_fallback_calls_total": snapshot["fallback_calls"],
        "rotary_gguf_expert_cache_uploaded_bytes_total": snapshot["uploaded_bytes"],
        "rotary_gguf_expert_cache_upload_bytes_per_second": snapshot["uploaded_bytes_per_s"],
    }
    for layer, rate in snapshot["layer_hit_rate"].items():
        expected[f'rotary_gguf_expert_cache_layer_hit_rate{{layer="{layer}"}}'] = rate
    for layer, experts in snapshot["resident"].items():
        expected[f'rotary_gguf_expert_cache_resident_experts{{layer="{layer}"}}'] = len(experts)
    return expected


def test_metrics_say_nothing_of_an_expert_cache_there_is_none(server):
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    assert parse_prometheus(text) and "expert_cache" not in text


def test_metrics_show_the_expert_cache(test_model, rpc_endpoint):
    """After the RPC server tests above (an RPC server serves one client at a time): requests
    served through the app with a live expert cache; /metrics gives the cache's own figures."""
    path = test_model(arch="qwen3moe", router_skew=1.5)
    rpc = native.add_rpc_device(rpc_endpoint)
    placement = Placement(devices=(rpc.name,), n_gpu_layers=-1, overrides=((expert_pattern(), "CPU"),), repack=False)
    inv = read_inventory(path)
    cache = ExpertCache(inv.n_layer, inv.n_expert, inv.n_expert_used, inv.n_expert // 4, rpc.buffer_type)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with Engine.load(path, placement, n_ctx=CTX, n_threads=1, expert_cache=cache) as engine:
        with TestClient(create_app(engine, ServeOptions("cached", max_queue=2, api_key=API_KEY))) as client:
            for prompt in ("The quick brown fox", "Once upon a time"):
                body = {"prompt": prompt, "max_tokens": 24, "temperature": 0}
                reply = client.post("/v1/completions", headers=headers, json=body)
                assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 24
            served = parse_prometheus(client.get("/metrics", headers=headers).text)
        snapshot = cache.snapshot()
        text = prometheus_text(engine.live.snapshot(), engine.accelerator_memory(), snapshot)
    assert snapshot["enabled"] and 0 < snapshot["hit_rate"] < 1 and snapshot["fallback_calls"] > 0
    assert 0 < sum(map(len, snapshot["resident"].values())) <= len(snapshot["resident"]) * inv.n_expert // 4
    expected = cache_samples(snapshot)
    samples = parse_prometheus(text)
    assert {k: v for k, v in samples.items() if "expert_cache" in k} == expected
    # the route's figures, less the two that move with the clock
    moving = ("rotary_gguf_expert_cache_hit_rate_recent", "rotary_gguf_expert_cache_upload_bytes_per_second")
    assert {k: v for k, v in served.items() if "expert_cache" in k and k not in moving} == {
        k: v for k, v in expected.items() if k not in moving}
    assert served["rotary_gguf_completion_tokens_total"] == 48


# --- the access log ----------------------------------------------------------------------------------
ACCESS_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d 127\.0\.0\.1 (\S+) (\S+) (\d+|-) prompt=(\d+|-) completion=(\d+|-) (\d+) ms$", re.M)


def access_lines(text: str) -> list[tuple[str, ...]]:
    """(method, path, status, prompt tokens, completion tokens, ms) of each line, but the start-up's /health polls."""
    return [line for line in ACCESS_LINE.findall(text) if line[1] != "/health"]


def wait_for_lines(path, n: int, timeout: float = 10) -> list[tuple[str, ...]]:
    deadline = time.monotonic() + timeout
    while len(lines := access_lines(path.read_text())) < n:
        assert time.monotonic() < deadline, path.read_text()
        time.sleep(0.05)
    return lines


def test_access_log_has_a_line_per_request_with_its_tokens(server):
    """On stderr by default: method, path, status, the generation's tokens and the time taken."""
    seen = len(access_lines(server.log.read_text()))
    whole = server.client().chat.completions.create(model="m", messages=MESSAGES, max_tokens=7, temperature=0)
    stream = server.client().chat.completions.create(model="m", messages=MESSAGES, max_tokens=5, stream=True,
                                                     stream_options={"include_usage": True})
    usage = [chunk.usage for chunk in stream if chunk.usage][0]
    assert httpx.get(f"{server.url}/v1/models").status_code == 401  # no key
    assert server.post("/v1/nowhere", json={}).status_code == 404
    lines = wait_for_lines(server.log, seen + 4)[seen:]
    assert [line[:3] for line in lines] == [("POST", "/v1/chat/completions", "200"), ("POST", "/v1/chat/completions", "200"),
                                            ("GET", "/v1/models", "401"), ("POST", "/v1/nowhere", "404")]
    assert lines[0][3:5] == (str(whole.usage.prompt_tokens), str(whole.usage.completion_tokens))
    assert lines[1][3:5] == (str(usage.prompt_tokens), str(usage.completion_tokens))
    assert lines[2][3:5] == lines[3][3:5] == ("-", "-")  # no generation ran
    assert all(int(line[5]) >= 0 for line in lines)


def test_access_log_to_a_file_or_off(tmp_path, model):
    log_file = tmp_path / "access.log"
    for setting in (str(log_file), "off"):
        server = Server(tmp_path, model, "--ctx", str(CTX), "--access-log", setting)
        try:
            reply = server.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3})
            assert reply.status_code == 200
            if setting != "off":
                usage = reply.json()["usage"]
                lines = wait_for_lines(log_file, 1)
                assert lines == [("POST", "/v1/completions", "200", str(usage["prompt_tokens"]),
                                  str(usage["completion_tokens"]), lines[0][5])]
        finally:
            server.stop()
        assert not access_lines(server.log.read_text())  # nothing on stderr either way
    assert [line[1] for line in access_lines(log_file.read_text())].count("/v1/completions") == 1  # off wrote none


def test_access_log_file_that_cannot_be_written_is_one_line(model, tmp_path):
    assert_one_line_error(run_cli("serve", model, "--access-log", str(tmp_path / "missing" / "access.log")),
                          "--access-log")
