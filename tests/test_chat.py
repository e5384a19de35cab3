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
        # A COLUMNS/LINES inherited from the test run would override the pane's own size.
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, check=True,
                              env=env).stdout

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-S", "-200")

    def visible(self) -> str:
        """What the terminal shows now (no scrollback)."""
        return self._tmux("capture-pane", "-p")

    def send(self, *keys: str) -> None:
        self._tmux("send-keys", *keys)

    def wait_for(self, predicate, timeout: float = 60, visible: bool = False) -> str:
        """The screen (with its scrollback, or only what is `visible`) once `predicate` holds."""
        deadline = time.monotonic() + timeout
        while True:
            screen = self.visible() if visible else self.screen()
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


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux to read chat's screen in a real terminal")
@pytest.mark.parametrize("width,height", [(80, 24), (60, 15)])
def test_chat_screen_at_small_sizes_and_ctrl_c_mid_answer(test_model, width, height):
    """The screen as a person sees it: the live dashboard laid out below the answer while it
    streams; after Ctrl-C the answer's lines each once, then its figures and the machine's."""
    from test_dashboard import assert_laid_out

    model = test_model(layers=40)
    term = Terminal(f"{CLI} chat {model} --threads 1 --temperature 0 --max-tokens 800 --ctx 4096", width, height)
    try:
        term.wait_for(lambda s: prompts_shown(s) == 1)
        term.send("Tell me a long story", "Enter")
        live = term.wait_for(lambda s: "\nrotary-gguf " in s and re.search(r"^L\d+-\d+ ", s, re.M)
                             and re.search(r"decode +[\d.]+ t/s", s), visible=True)
        screen = live.splitlines()
        dashboard = screen[next(i for i, line in enumerate(screen) if line.startswith("rotary-gguf ")):]
        assert_laid_out([line.rstrip() for line in dashboard], width, height)
        assert "RAM" in live and "L0" in live
        time.sleep(0.5)
        term.send("C-c")
        done = term.wait_for(lambda s: "· stopped" in s and prompts_shown(s) == 2)
        assert "routing" not in done and "decode" not in done, "the live view leaves when the answer ends"
        lines = [line for line in done.splitlines() if line.strip()]
        answer = lines[lines.index(next(line for line in lines if line.startswith("model ›"))):]
        answer = answer[: next(i for i, line in enumerate(answer) if SUMMARY.search(line))]
        assert answer and len(answer) == len(set(answer)), f"a streamed line shows twice:\n{done}"
        figures = lines[next(i for i, line in enumerate(lines) if SUMMARY.search(line)) + 1]
        assert re.match(r"CPU only · RAM [\d.]+ [KMG]iB / [\d.]+ [KMG]iB · avg [\d.]+ t/s", figures), done
        assert max(map(len, done.splitlines())) <= width
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
    assert_one_line_error(run_cli("chat", test_model(), "--vram", "8GiB"), "no GPU")


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
