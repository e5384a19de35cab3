"""`rotary-gguf chat` driven like a person would: in a real terminal (tmux), and through a pipe."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

import pytest

from conftest import CLI, assert_one_line_error, run_cli
from rotary_gguf.demo import DEMO_MODEL

SUMMARY = re.compile(r"\d+ tokens · [\d.]+ t/s · prompt \d+ t/s")


class Terminal:
    """A program in a detached tmux pane of a private tmux server."""

    def __init__(self, command: str, width: int = 80, height: int = 24):
        self.socket = f"rotary-test-{os.getpid()}-{time.monotonic_ns()}"
        self._tmux("new-session", "-d", "-x", str(width), "-y", str(height), f"{command}; echo EXIT=$?; sleep 600")

    def _tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, check=True).stdout

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-S", "-200")

    def send(self, *keys: str) -> None:
        self._tmux("send-keys", *keys)

    def wait_for(self, predicate, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if predicate(screen):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; the terminal shows:\n{screen}")
            time.sleep(0.05)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


def prompts_shown(screen: str) -> int:
    return len(re.findall(r"^you ›", screen, flags=re.M))


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux to drive chat in a real terminal")
def test_chat_in_a_terminal_answers_streams_and_survives_ctrl_c(test_model):
    model = test_model(layers=40)  # slow enough on one thread to interrupt an answer midway
    term = Terminal(f"{CLI} chat {model} --threads 1 --temperature 0 --max-tokens 800 --ctx 4096")
    try:
        term.wait_for(lambda s: prompts_shown(s) == 1)
        term.send("C-c")  # at the prompt: a hint, not the end
        term.wait_for(lambda s: "Ctrl-C stops an answer; /exit or Ctrl-D leaves" in s and prompts_shown(s) == 2)

        term.send("Tell me a long story", "Enter")
        live = term.wait_for(lambda s: "model ›" in s and "routing · last" in s)
        assert re.search(r"decode +[\d.]+ t/s", live) and "L0" in live  # the dashboard below the answer
        done = term.wait_for(lambda s: SUMMARY.search(s) and prompts_shown(s) == 3)
        assert "routing · last" not in done, "the dashboard stays only while an answer streams"
        answer = done.split("model ›", 1)[1].split("\n")
        assert len("".join(answer).strip()) > 100, done

        term.send("And another one", "Enter")
        term.wait_for(lambda s: s.count("model ›") == 2 and "routing · last" in s)
        term.send("C-c")
        stopped = term.wait_for(lambda s: "· stopped" in s and prompts_shown(s) == 4)
        assert "routing · last" not in stopped

        term.send("/stats", "Enter")
        term.wait_for(lambda s: "hottest" in s and "blocks" in s and prompts_shown(s) == 5)
        term.send("/exit", "Enter")
        term.wait_for(lambda s: "EXIT=0" in s, timeout=30)
    finally:
        term.close()


def test_chat_through_a_pipe(test_model):
    """No terminal: answers are plain lines, nothing else."""
    result = subprocess.run(
        [CLI, "chat", str(test_model()), "--threads", "1", "--max-tokens", "8", "--temperature", "0"],
        input="Hello!\n/reset\nAgain\n/exit\n", capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("model › ") == 2 and "new conversation" in result.stdout
    assert len(SUMMARY.findall(result.stdout)) == 2


def test_chat_on_a_dense_model_has_no_heat_map(test_model):
    result = subprocess.run([CLI, "chat", str(test_model(arch="qwen3")), "--threads", "1", "--max-tokens", "4"],
                            input="Hi\n/stats\n/exit\n", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and SUMMARY.search(result.stdout) and "decode" in result.stdout
    assert "routing" not in result.stdout


def test_chat_bad_input_is_one_line(test_model, tmp_path):
    assert_one_line_error(run_cli("chat", tmp_path / "missing.gguf"), "no such file")
    assert_one_line_error(run_cli("chat", test_model(), "--vram", "1GiB"), "no GPU")


@pytest.mark.skipif(not DEMO_MODEL.exists(), reason="the built-in demo model is not built")
def test_chat_without_a_model_uses_the_demo_model():
    result = subprocess.run([CLI, "chat", "--max-tokens", "4"], input="/exit\n", capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and f"chatting with {DEMO_MODEL.name}" in result.stdout


def test_decode_speed_is_the_engines_own_time(test_model):
    """A front end that takes its time with each token (printing it, drawing a dashboard) does not
    lower the decode speed it reports: generate, chat and serve read the same figure."""
    from rotary_gguf.engine import Engine

    with Engine.load(test_model(), n_ctx=256, n_threads=1) as engine:
        events = 0
        for event in engine.generate(engine.tokenize("Hello"), max_tokens=10):
            time.sleep(0.05)
            events += 1
        stats = event.stats
    assert events == 10 and stats.completion_tokens == 10
    assert 0 < stats.decode_seconds < 0.2, stats  # the consumer held the tokens for 0.45 s of it
