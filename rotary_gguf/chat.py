"""`rotary-gguf chat`: a multi-turn terminal chat in the model's chat template. Answers stream
above the live dashboard, which then leaves two lines: the answer's figures and the machine's
(memory, average speed, cache hits). Ctrl-C stops the answer, not the chat."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

from rich.console import Console, ConsoleOptions, RenderResult
from rich.text import Text

from .dashboard import Dashboard
from .engine import Engine, GenerationStats, PromptError, SamplingParams
from .errors import UserError

COMMANDS = {"/reset": "start a new conversation", "/stats": "show the whole dashboard", "/exit": "leave (or Ctrl-D)"}
ANSWER_LABEL = ("model › ", "bold magenta")
PROMPT_LABEL = "[bold green]you › [/]"


class StreamedLines:
    """An answer as it streams: finished text is handed on to be printed above the live display,
    which shows only the unfinished tail (at most two rows): a live region taller than the
    terminal would leave copies of itself in the scrollback."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.pending = Text.assemble(ANSWER_LABEL)

    def feed(self, text: str) -> Iterator[Text]:
        *done, rest = text.split("\n")
        for piece in done:
            line, self.pending = self.pending, Text()
            line.append(piece)
            yield line
        self.pending.append(rest)
        if len(self.pending) > 2 * self.width:  # a long paragraph: print all but its tail
            cut = self.pending.plain.rfind(" ", 0, len(self.pending) - self.width)
            cut = cut if cut > 0 else len(self.pending) - self.width
            line, self.pending = self.pending[:cut], self.pending[cut:]
            self.pending.plain = self.pending.plain.lstrip(" ")
            yield line

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.pending


def dashboard_height(console: Console) -> int:
    """Lines the dashboard takes below a streaming answer: the rest stays for the conversation."""
    return max(8, min(console.height - 10, 24))


def run(engine: Engine, dashboard: Dashboard, console: Console, *, max_tokens: int, sampling: SamplingParams,
        system: str | None = None) -> None:
    """The chat loop, until /exit or end of input."""
    if engine.chat_template is None:
        raise UserError(f"{engine.path.name} has no chat template; `rotary-gguf generate` continues plain text")
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    opening = [{"role": "system", "content": system}] if system else []
    messages = list(opening)
    console.print(f"[bold]chatting with {engine.path.name}[/] [dim]· {' '.join(COMMANDS)} · Ctrl-C stops an answer[/]")
    while True:
        try:
            line = console.input(PROMPT_LABEL).strip()
        except EOFError:
            console.print()
            return
        except KeyboardInterrupt:
            console.print("\n[dim]Ctrl-C stops an answer; /exit or Ctrl-D leaves[/]")
            continue
        if not line:
            continue
        if line.startswith("/"):
            command = line.split()[0].lower()
            if command in ("/exit", "/quit"):
                return
            if command == "/reset":
                messages = list(opening)
                engine.reset()
                console.print("[dim]new conversation[/]")
            elif command == "/stats":
                dashboard.height = max(8, console.height - 2)
                dashboard.sample()
                console.print(dashboard)
            else:
                known = " · ".join(f"{c} {what}" for c, what in COMMANDS.items())
                console.print(f"[yellow]unknown command {command}[/]: {known}")
            continue
        messages.append({"role": "user", "content": line})
        try:
            reply, stats = answer(engine, dashboard, console, messages, max_tokens=max_tokens, sampling=sampling)
        except PromptError as e:
            messages.pop()
            console.print(f"[red]{e}[/]")
            continue
        if stats.finish_reason == "cancelled" and not reply.strip():
            messages.pop()  # stopped before it said anything: as if it was never asked
        else:
            messages.append({"role": "assistant", "content": reply})
        console.print(f"[dim]{summary(stats)}[/]")
        if console.is_terminal:  # the live view may have come and gone too fast to be read
            dashboard.sample()
            console.print(dashboard.compact())


def answer(engine: Engine, dashboard: Dashboard, console: Console, messages: list[dict], *, max_tokens: int,
           sampling: SamplingParams) -> tuple[str, GenerationStats]:
    """Stream the model's reply to `messages` above the live dashboard. Ctrl-C ends it early."""
    prompt = engine.chat_prompt(messages)
    if len(prompt) >= engine.n_ctx:
        raise PromptError(f"the conversation is {len(prompt)} tokens, more than the context holds ({engine.n_ctx}, "
                          "--ctx); /reset starts a new one")
    cancel = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: cancel.set())
    stream = StreamedLines(console.width)
    parts: list[str] = []
    stats = GenerationStats(prompt_tokens=len(prompt))
    dashboard.height = dashboard_height(console)
    try:
        with _no_echo(), dashboard.live(console, above=stream, transient=True) as live:
            for event in engine.generate(prompt, max_tokens=max_tokens, sampling=sampling, cancel=cancel,
                                         checkpoint_at=engine.turn_start(messages, prompt)):
                parts.append(event.text)
                for line in stream.feed(event.text):
                    live.console.print(line, highlight=False)
                stats = event.stats
        console.print(stream.pending, highlight=False)
    finally:
        signal.signal(signal.SIGINT, previous)
    if stats.finish_reason is None:  # stopped before the first token
        stats.finish_reason = "cancelled"
    return "".join(parts), stats


@contextlib.contextmanager
def _no_echo() -> Iterator[None]:
    """The terminal does not echo keys (Ctrl-C's "^C" above all) while an answer streams: an echo
    moves the cursor under the live display, which then erases the wrong lines when it ends and
    leaves a copy of the last streamed line on the screen."""
    try:
        import termios
    except ImportError:  # Windows
        termios = None
    if termios is None or not sys.stdin.isatty():
        yield
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    quiet = list(saved)
    quiet[3] &= ~(termios.ECHO | termios.ECHOCTL)
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


def summary(stats: GenerationStats, limit: str = "--max-tokens") -> str:
    """One line about an answer: its length, speeds, and why it ended if not by itself."""
    text = f"{stats.completion_tokens} tokens · {stats.decode_tps:.1f} t/s · prompt {stats.prompt_tps:.0f} t/s"
    if stats.cached_prompt_tokens:
        text += f" ({stats.cached_prompt_tokens} reused)"
    ending = {"cancelled": "stopped", "length": f"cut at {limit}"}.get(stats.finish_reason or "")
    return text + (f" · {ending}" if ending else "")
