#!/usr/bin/env python3
"""Benchmark the serving path: what HTTP and the engine's own loop cost per generated token.

Three greedy decodes of the same chat prompt, on the same model and placement:

* bare:   llama-cpp-python's low-level API only (llama_decode + a greedy sampler), no engine;
* engine: `Engine.generate`, consumed in-process;
* http:   a `rotary-gguf serve` process, streamed over SSE by a client in this process.

Ratios: engine/bare (goal >= 0.97) and http/engine (goal >= 0.95). Decode speed is measured the
way a consumer sees it: tokens per second between the first and the last token delivered. For
http vs engine both count from the first token that carries text (a token that ends inside a
character arrives with the next one), so the two are measured alike. CPU time per token is shown
too: it stays meaningful on a machine where other work makes the speeds noisy.

Without MODEL a synthetic qwen35moe model (tools/make_test_model.py) is generated.

Usage: python tools/bench_serve.py [MODEL] [--rpc HOST:PORT] [--vram SIZE] [--mode MODE]
                                   [--tokens 256] [--rounds 5] [--threads 1] [--ctx 2048]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import llama_cpp
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic_models import make_model  # noqa: E402

from rotary_gguf.cli import plan_or_cpu  # noqa: E402
from rotary_gguf.plan import ContextSettings  # noqa: E402
from rotary_gguf.engine import Engine  # noqa: E402
from rotary_gguf.experts.cache import ExpertCache  # noqa: E402
from rotary_gguf.inventory import read_inventory  # noqa: E402

CLI = str(Path(sys.executable).with_name("rotary-gguf"))
MESSAGES = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
# ~270 MB; about 10 ms a token on one CPU thread (the target model decodes at 25-50 ms a token)
BENCH_MODEL = dict(arch="qwen35moe", layers=8, experts=16, used=4, embd=1024, ff=512, quant="q8_0")


def bare_tps(engine: Engine, prompt: list[int], n: int) -> float:
    """Greedy decode with llama-cpp-python's low-level calls on the engine's own context.
    Marks mirror Engine.generate: a token counts as delivered once it is sampled."""
    ctx = engine._ctx  # the bare loop needs the raw handles; nothing else of the engine is used
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    engine._cached = []  # the context no longer holds what the engine thinks it cached
    batch = (llama_cpp.llama_token * len(prompt))(*prompt)
    if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(batch, len(prompt))) != 0:
        raise RuntimeError("llama_decode failed on the prompt")
    sampler = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    llama_cpp.llama_sampler_chain_add(sampler, llama_cpp.llama_sampler_init_greedy())
    one = (llama_cpp.llama_token * 1)()
    marks = []
    try:
        for i in range(n):
            if i and llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(one, 1)) != 0:
                raise RuntimeError("llama_decode failed")
            one[0] = llama_cpp.llama_sampler_sample(sampler, ctx, -1)
            marks.append(time.perf_counter())
    finally:
        llama_cpp.llama_sampler_free(sampler)
    return (n - 1) / (marks[-1] - marks[0])


def engine_tps(engine: Engine, prompt: list[int], n: int) -> tuple[float, float, float, str]:
    """(token-level t/s, text-level t/s, the engine's own decode_tps, text) of Engine.generate."""
    engine.reset()
    marks, text_marks, texts = [], [], []
    for event in engine.generate(prompt, max_tokens=n):
        now = time.perf_counter()
        marks.append(now)
        texts.append(event.text)
        if event.text or text_marks:
            text_marks.append(now)
    stats = event.stats
    assert stats.completion_tokens == n, "the model stopped early: pick a prompt that does not end"
    return (n - 1) / (marks[-1] - marks[0]), (n - 1) / (text_marks[-1] - text_marks[0]), stats.decode_tps, "".join(texts)


def http_tps(url: str, n: int) -> tuple[float, str, int]:
    """(text-level t/s, text, completion tokens) of one streamed chat completion."""
    body = {"messages": MESSAGES, "max_tokens": n, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    marks, texts, usage = [], [], None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            for choice in event["choices"]:
                piece = choice["delta"].get("content")
                if piece or (marks and choice["finish_reason"]):
                    marks.append(time.perf_counter())
                    texts.append(piece or "")
    return (n - 1) / (marks[-1] - marks[0]), "".join(texts), usage["completion_tokens"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(model: Path, args: argparse.Namespace) -> Iterator[tuple[str, psutil.Process]]:
    """A `rotary-gguf serve` process on `model`; yields its URL and process."""
    port = free_port()
    command = [CLI, "serve", str(model), "--port", str(port), "--ctx", str(args.ctx), "--threads", str(args.threads)]
    for option in ("rpc", "vram", "mode"):
        if getattr(args, option):
            command += [f"--{option}", getattr(args, option)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.2)
        http_tps(url, 8)  # warm-up
        yield url, psutil.Process(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@contextlib.contextmanager
def in_process(model: Path, args: argparse.Namespace) -> Iterator[tuple[Engine, list[int], str]]:
    """The engine on `model` with the placement `serve` uses, the benchmark's prompt, and the
    text every decode must produce (from a warm-up run)."""
    the_plan = plan_or_cpu(model, vram=args.vram, mode=args.mode or "auto", context=ContextSettings(args.ctx), rpc=args.rpc,
                           expert_cache="auto")  # as `serve` plans by default
    placement = the_plan.placement if the_plan else None
    cache = ExpertCache.for_plan(the_plan, read_inventory(model))
    with Engine.load(model, placement, n_ctx=args.ctx, n_threads=args.threads, expert_cache=cache) as engine:
        prompt = engine.chat_prompt(MESSAGES)
        yield engine, prompt, engine_tps(engine, prompt, args.tokens)[3]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", type=Path, help="a GGUF file (default: a generated qwen35moe model)")
    ap.add_argument("--rpc", metavar="HOST:PORT", help="place as `serve --rpc` does, on this ggml-rpc device")
    ap.add_argument("--vram", help="as `serve --vram`")
    ap.add_argument("--mode", help="as `serve --mode`")
    ap.add_argument("--tokens", type=int, default=256, help="tokens per decode")
    ap.add_argument("--rounds", type=int, default=5, help="decodes per measurement (median and best are shown)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for llama.cpp")
    ap.add_argument("--ctx", type=int, default=2048)
    args = ap.parse_args()

    runs: dict[str, list[float]] = {name: [] for name in ROWS}
    cpu: dict[str, list[float]] = {name: [] for name in ("bare", "engine", "server", "client")}  # ms per token
    expected = ""

    def per_token_ms(seconds: float) -> float:
        return 1000 * seconds / args.tokens

    def bare_round(engine: Engine, prompt: list[int]) -> None:
        t = time.process_time()
        runs["bare"].append(bare_tps(engine, prompt, args.tokens))
        cpu["bare"].append(per_token_ms(time.process_time() - t))

    def engine_round(engine: Engine, prompt: list[int]) -> None:
        t = time.process_time()
        token_level, text_level, own, text = engine_tps(engine, prompt, args.tokens)
        cpu["engine"].append(per_token_ms(time.process_time() - t))
        assert text == expected, "the engine's greedy output changed between runs"
        runs["engine"].append(token_level)
        runs["engine_text"].append(text_level)
        runs["engine_own"].append(own)

    def http_round(url: str, server: psutil.Process) -> None:
        t, server_t = time.process_time(), sum(server.cpu_times()[:2])
        tps, text, completion_tokens = http_tps(url, args.tokens)
        cpu["server"].append(per_token_ms(sum(server.cpu_times()[:2]) - server_t))
        cpu["client"].append(per_token_ms(time.process_time() - t))
        assert text == expected and completion_tokens == args.tokens, "HTTP output differs from the engine's"
        runs["http"].append(tps)

    def rotated(steps: list, rounds: int) -> None:
        """Run `steps` `rounds` times, starting each round one step later: no measurement always
        runs first or always follows the same other one."""
        for r in range(rounds):
            for step in steps[r % len(steps):] + steps[: r % len(steps)]:
                step()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or make_model(Path(tmp) / "bench.gguf", **BENCH_MODEL)
        print(f"model {model.name}, {args.tokens} tokens x {args.rounds} rounds, {args.threads} thread(s), "
              + (f"experts on host and the rest on RPC {args.rpc}" if args.rpc else "all on the CPU")
              + f"; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
        if args.rpc:  # an RPC device serves one client at a time: in-process first, then the server
            with in_process(model, args) as (engine, prompt, expected):
                rotated([lambda: bare_round(engine, prompt), lambda: engine_round(engine, prompt)], args.rounds)
            with serving(model, args) as (url, server):
                rotated([lambda: http_round(url, server)], args.rounds)
        else:  # interleaved, so that all three see the same load
            with serving(model, args) as (url, server), in_process(model, args) as (engine, prompt, expected):
                rotated([lambda: bare_round(engine, prompt), lambda: engine_round(engine, prompt),
                         lambda: http_round(url, server)], args.rounds)

    # Other load only slows a run down, so the best run is the steadier estimate; both are shown.
    med = statistics.median
    print(f"{'':32}{'median t/s':>12}{'best t/s':>10}   rounds")
    for key, name in ROWS.items():
        print(f"{name:32}{med(runs[key]):12.1f}{max(runs[key]):10.1f}   " + " ".join(f"{v:.1f}" for v in runs[key]))
    print("CPU ms per token (median): " + ", ".join(f"{k} {med(v):.3f}" for k, v in cpu.items())
          + "  (server: the whole serve process; client: this process reading the stream)")
    for label, a, b, goal in [("engine / bare loop", "engine", "bare", 0.97), ("HTTP / engine", "http", "engine_text", 0.95)]:
        print(f"{label + ':':20}{med(runs[a]) / med(runs[b]):.3f} median, {max(runs[a]) / max(runs[b]):.3f} best"
              f"  (goal >= {goal})")


ROWS = {
    "bare": "bare llama-cpp-python loop",
    "engine": "engine (token to token)",
    "engine_text": "engine (text to text)",
    "engine_own": "engine's own decode_tps",
    "http": "HTTP streaming (text to text)",
}


if __name__ == "__main__":
    main()
