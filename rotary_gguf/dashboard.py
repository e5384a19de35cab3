"""The live dashboard: memory, speed, the plan, the expert cache and a per-block expert heat map
of one engine.

`Dashboard` is one rich renderable: a fixed `Layout` of small views that all draw from the latest
`Reading`. `sample()` takes a reading (memory, the engine's live figures, the routing telemetry,
the expert cache's snapshot); `live()` shows it in a rich `Live` that samples a few times a second.
Figures come from the engine's stats stream (`LiveStats`), the telemetry and the expert cache; the
dashboard measures no speed itself.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import psutil
import pynvml
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.layout import Layout
from rich.live import Live
from rich.segment import Segment
from rich.text import Text

from .stats import Snapshot
from .units import human_bytes

SAMPLE_SECONDS = 0.5  # a new reading (and drawing) twice a second
LIVE_REFRESH_PER_SECOND = 4  # redraws of a line streamed above the dashboard (its drawing is reused)
SPARK = "▁▂▃▄▅▆▇█"
# Heat levels by an expert's share of selections relative to uniform routing (1.0 = its fair share).
HEAT_CHARS = " ░▒▓█"
HEAT_STYLES = ("", "blue", "cyan", "yellow", "bold red")
HEAT_BOUNDS = (0.0, 0.5, 1.5, 3.0)  # ratio > bound -> level index + 1
# Heat-map cells whose experts hold expert-cache slots: the same levels in the plan's colour for
# resident experts (an idle one shows a dot); the hottest list marks them with RESIDENT_MARK.
RESIDENT_CHARS = "·░▒▓█"
RESIDENT_STYLES = ("magenta",) * 4 + ("bold magenta",)
RESIDENT_MARK = "■"
WORST_BLOCKS = 3  # blocks named by their cache hit rate
HISTORY = 48  # sparkline samples kept
BORDER_STYLE = "grey50"
BOXED_MIN_HEIGHT = 20  # below this the sections drop their borders
FIXED_ROWS = ("header", "figures", "plan", "cache", "serving")  # the layout's parts of fixed height
MIN_HOTTEST = 5  # rows of the routing section, also for models with fewer MoE blocks


@dataclass(frozen=True)
class AcceleratorMemory:
    name: str
    used: int
    total: int
    source: str  # how `used` was measured: "NVML", "ggml", or "placed" (the bytes we put there)


class MemoryProbe:
    """Accelerator and host memory of one engine's process. NVML for CUDA devices; ggml's device
    memory for other GPUs; on an RPC device (which reports the server's RAM) the bytes llama.cpp
    and the expert cache placed there, out of the plan's budget."""

    def __init__(self, engine, plan=None):
        self._engine = engine
        self._process = psutil.Process()
        self._nvml = None
        self._placed: AcceleratorMemory | None = None
        name = next(iter(engine.placement.devices), None)
        self.device = name
        if name is None:
            return
        if name.startswith("CUDA"):
            self._nvml = _nvml_handle(int(name[4:] or 0))
        if name.startswith("RPC"):
            report = engine.load_report
            placed = sum(
                n
                for sizes in (report.weight_bytes, report.kv_bytes, report.recurrent_bytes, report.compute_bytes)
                for buffer, n in sizes.items()
                if buffer.startswith(name)
            )
            if engine.expert_cache is not None:
                placed += engine.expert_cache.slot_bytes
            total = plan.budget if plan is not None else engine.accelerator_memory().get(name, (0, 0))[1]
            self._placed = AcceleratorMemory(name, placed, total, "placed")

    def accelerator(self) -> AcceleratorMemory | None:
        if self.device is None:
            return None
        if self._placed is not None:
            return self._placed
        if self._nvml is not None:
            info = pynvml.nvmlDeviceGetMemoryInfo(self._nvml)
            return AcceleratorMemory(self.device, int(info.used), int(info.total), "NVML")
        used, total = self._engine.accelerator_memory().get(self.device, (0, 0))
        return AcceleratorMemory(self.device, used, total, "ggml")

    def host(self) -> tuple[int, int, int]:
        """(process RSS, system RAM used, system RAM total) in bytes."""
        ram = psutil.virtual_memory()
        return self._process.memory_info().rss, ram.total - ram.available, ram.total


def _nvml_handle(index: int):
    try:
        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetHandleByIndex(index)
    except pynvml.NVMLError:  # no driver library or no such GPU: ggml's figures then
        return None


@dataclass(frozen=True, eq=False)
class Reading:
    """Everything the dashboard shows, taken at one moment (each one a new drawing)."""

    at: float
    accelerator: AcceleratorMemory | None
    rss: int
    ram_used: int
    ram_total: int
    live: Snapshot
    generating: bool
    prompt_tokens: int
    completion_tokens: int
    decode_tps: float  # the running generation's, else the last one's
    prompt_tps: float
    avg_decode_tps: float
    avg_prompt_tps: float
    decode_history: tuple[float, ...]
    prompt_history: tuple[float, ...]
    requests_per_minute: float
    recent: np.ndarray | None = None  # [n_layer, n_expert] by original expert id
    routed_tokens: int = 0  # tokens in `recent` (per block)
    cache: dict | None = None  # the expert cache's snapshot (ExpertCache.snapshot())
    cached_prompt_tokens: int = 0  # prompt tokens reused from the context instead of evaluated
    checkpoints: dict | None = None  # the prompt checkpoints' snapshot (CheckpointStore.snapshot())
    resident: np.ndarray | None = None  # [n_layer, n_expert] bool by original id: holds a cache slot

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Dashboard:
    """The dashboard of one engine. `telemetry` (a RoutingTelemetry) feeds the heat map, `plan`
    the plan view; `serving` adds the request figures; the engine's expert cache, when it has
    one, its own view and the resident marks on the heat map. `height` limits it to that many
    lines (default: the terminal's)."""

    def __init__(self, engine, *, telemetry=None, plan=None, serving: bool = False, title: str = "",
                 height: int | None = None):
        self.engine, self.telemetry, self.plan, self.serving = engine, telemetry, plan, serving
        self.title = title
        self.height = height
        self.memory = MemoryProbe(engine, plan)
        self.started = time.monotonic()
        self._decode_history: deque[float] = deque(maxlen=HISTORY)
        self._prompt_history: deque[float] = deque(maxlen=HISTORY)
        self._requests: deque[tuple[float, int]] = deque()
        self._seen_requests = 0
        self._prompt_recorded: object = None  # the running generation whose prompt speed is recorded
        self.reading = self.sample()
        self.layout = self._make_layout()
        self._frame_key: tuple | None = None
        self._frame: list[list[Segment]] = []

    # --- data ------------------------------------------------------------------------------------
    def sample(self) -> Reading:
        """Take a new reading (and return it); the views draw the latest one."""
        now = time.monotonic()
        live, running = self.engine.live.snapshot(), self.engine.live.running()
        prompt_tokens, completion_tokens = live.prompt_tokens, live.completion_tokens
        decoded, decode_seconds = live.completion_tokens - live.ttft_count, live.decode_seconds
        evaluated = live.prompt_tokens - live.cached_prompt_tokens
        prompt_seconds = live.prompt_seconds
        decode_tps, prompt_tps = live.last_decode_tps, live.last_prompt_tps
        cached_prompt_tokens = live.cached_prompt_tokens
        if running is not None:
            prompt_tokens += running.prompt_tokens
            completion_tokens += running.completion_tokens
            if running.prompt_seconds > 0:
                cached_prompt_tokens += running.cached_prompt_tokens
                prompt_tps = running.prompt_tps
                evaluated += running.prompt_tokens - running.cached_prompt_tokens
                prompt_seconds += running.prompt_seconds
                if self._prompt_recorded is not running:
                    self._prompt_history.append(prompt_tps)
                    self._prompt_recorded = running
            if running.completion_tokens > 1:
                decode_tps = running.decode_tps
                decoded += running.completion_tokens - 1
                decode_seconds += running.decode_seconds
                self._decode_history.append(decode_tps)
        if live.requests_total != self._seen_requests:  # generations that ended since the last reading
            if running is None and live.last_decode_tps:
                self._decode_history.append(live.last_decode_tps)
            if self._prompt_recorded is None and live.last_prompt_tps:
                self._prompt_history.append(live.last_prompt_tps)
            self._prompt_recorded = None
            self._seen_requests = live.requests_total
        self._requests.append((now, live.requests_total))
        while now - self._requests[0][0] > 60:
            self._requests.popleft()
        span = max(now - self._requests[0][0], 1.0)
        rss, ram_used, ram_total = self.memory.host()
        recent, routed = None, 0
        if self.telemetry is not None:
            recent = self.telemetry.recent()
            routed = int(min(self.telemetry.layer_tokens()[self.telemetry.layers].max(), self.telemetry.window))
        cache = self.engine.expert_cache.snapshot() if self.engine.expert_cache is not None else None
        self.reading = Reading(
            at=now,
            accelerator=self.memory.accelerator(),
            rss=rss,
            ram_used=ram_used,
            ram_total=ram_total,
            live=live,
            generating=running is not None,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            decode_tps=decode_tps,
            prompt_tps=prompt_tps,
            avg_decode_tps=decoded / decode_seconds if decoded > 0 and decode_seconds > 0 else 0.0,
            avg_prompt_tps=evaluated / prompt_seconds if evaluated > 0 and prompt_seconds > 0 else 0.0,
            decode_history=tuple(self._decode_history),
            prompt_history=tuple(self._prompt_history),
            requests_per_minute=(live.requests_total - self._requests[0][1]) * 60 / span,
            recent=recent,
            routed_tokens=routed,
            cache=cache,
            resident=self._resident(cache),
            cached_prompt_tokens=cached_prompt_tokens,
            checkpoints=self.engine.checkpoints.snapshot() if self.engine.checkpoints is not None else None,
        )
        return self.reading

    def _resident(self, cache: dict | None) -> np.ndarray | None:
        """The experts holding a cache slot, by original id (for the heat map's marks)."""
        if cache is None or not cache["enabled"] or self.telemetry is None:
            return None
        resident = np.zeros((self.telemetry.inventory.n_layer, self.telemetry.n_expert), dtype=bool)
        for layer, positions in cache["resident"].items():
            resident[layer, self.telemetry.original_ids(layer, positions)] = True
        return resident

    # --- layout ----------------------------------------------------------------------------------
    def _make_layout(self) -> Layout:
        layout = Layout(name="dashboard")
        figures = Layout(name="figures")
        figures.split_row(Layout(_Section(MemoryView(self)), name="memory"),
                          Layout(_Section(SpeedView(self)), name="speed"))
        routing = Layout(name="routing")
        routing.split_row(Layout(_Section(HeatMapView(self)), name="heatmap"),
                          Layout(_Section(HottestView(self)), name="hottest", size=18))
        layout.split_column(
            Layout(HeaderView(self), name="header", size=1),
            figures,
            Layout(_Section(PlanView(self)), name="plan"),
            Layout(_Section(CacheView(self)), name="cache"),
            Layout(_Section(ServingView(self)), name="serving", visible=self.serving),
            routing,
        )
        return layout

    def _fit(self, width: int, height: int) -> int:
        """Size the sections for a width x height area (borders only where there is room); the
        height the dashboard needs of it."""
        boxed = height >= BOXED_MIN_HEIGHT
        frame = 2 if boxed else 0
        for section in _sections(self.layout):
            section.boxed = boxed
        self.layout["figures"].size = 3 + frame
        self.layout["plan"].size = (2 if self.plan is not None and width >= 100 else 1) + frame
        self.layout["serving"].size = 1 + frame
        cache = self.reading.cache  # on: two framed lines, or one unframed; off: one line saying why
        cache_framed = boxed and cache is not None and cache["enabled"]
        self.layout["cache"].visible = cache is not None
        self.layout["cache"].renderable.boxed = cache_framed
        self.layout["cache"].size = 2 + frame if cache_framed else 1
        self.layout["hottest"].visible = width >= 64
        fixed = sum(self.layout[n].size for n in FIXED_ROWS if self.layout[n].visible)
        routing = frame + (0 if boxed else 1)  # borders, or a title line
        self.layout["routing"].visible = self.telemetry is not None and height - fixed >= routing + 1
        if not self.layout["routing"].visible:
            return fixed
        wanted = routing + max(len(self.telemetry.layers), MIN_HOTTEST)
        return min(height, fixed + wanted)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        """The latest reading, drawn once per reading and size (a Live redraws it more often)."""
        height = self.height or options.height or console.height
        width = options.max_width
        key = (self.reading, width, height)
        if self._frame_key != key:
            height = self._fit(width, height)
            self._frame = console.render_lines(self.layout, options.update(width=width, height=height))
            self._frame_key = key
        new_line = Segment.line()
        for line in self._frame:
            yield from line
            yield new_line

    # --- running ---------------------------------------------------------------------------------
    def live(self, console: Console, *, above: object = None, transient: bool = False) -> Live:
        """A rich Live showing the dashboard, below `above` (e.g. the line being streamed, then
        redrawn LIVE_REFRESH_PER_SECOND times a second). A new reading every SAMPLE_SECONDS."""

        def frame():
            if time.monotonic() - self.reading.at >= SAMPLE_SECONDS:
                self.sample()
            return Group(above, self) if above is not None else self

        rate = LIVE_REFRESH_PER_SECOND if above is not None else 1 / SAMPLE_SECONDS
        return Live(get_renderable=frame, console=console, refresh_per_second=rate, transient=transient,
                    redirect_stdout=False, redirect_stderr=False)


# --- the views -------------------------------------------------------------------------------------
class _Section:
    """A titled part of the dashboard: framed when there is room, else its lines under nothing.
    The frame is drawn here rather than by rich's Panel, which costs several times more."""

    def __init__(self, body: "_View"):
        self.body, self.boxed = body, True
        body.section = self

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if not self.boxed:
            yield self.body
            return
        width, height = options.max_width, options.height or console.height
        if width < 5 or height < 3:
            return
        border, title_style, new_line = console.get_style(BORDER_STYLE), console.get_style("bold"), Segment.line()
        title = f" {self.body.title()} "[: width - 4]
        yield Segment("╭─", border)
        yield Segment(title, title_style)
        yield Segment("─" * (width - 3 - len(title)) + "╮", border)
        yield new_line
        side_left, side_right = Segment("│ ", border), Segment(" │", border)
        for line in console.render_lines(self.body, options.update(width=width - 4, height=height - 2), pad=True):
            yield side_left
            yield from line
            yield side_right
            yield new_line
        yield Segment("╰" + "─" * (width - 2) + "╯", border)
        yield new_line


def _sections(layout: Layout) -> list[_Section]:
    found = [layout.renderable] if isinstance(layout.renderable, _Section) else []
    for child in layout.children:
        found += _sections(child)
    return found


class _View:
    name = ""
    section: _Section | None = None  # set by the section that frames it

    def __init__(self, dashboard: Dashboard):
        self.dashboard = dashboard

    def title(self) -> str:
        return self.name

    @property
    def boxed(self) -> bool:
        return self.section is not None and self.section.boxed


class HeaderView(_View):
    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        d = self.dashboard
        inv = d.engine.inventory
        text = Text.assemble(("rotary-gguf ", "bold"), (d.title or d.engine.path.name, "bold cyan"))
        text.append(" · generating" if d.reading.generating else " · idle",
                    style="bold green" if d.reading.generating else "dim")
        text.append(f" · {inv.arch} · {inv.n_layer} blocks")
        if inv.n_expert:
            text.append(f" · {inv.n_expert} experts, top {inv.n_expert_used}")
        uptime = int(d.reading.at - d.started)
        text.append(f" · up {uptime // 3600}:{uptime // 60 % 60:02d}:{uptime % 60:02d}", style="dim")
        text.truncate(options.max_width, overflow="ellipsis")
        yield text


class MemoryView(_View):
    name = "memory"

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        r = self.dashboard.reading
        acc = r.accelerator
        if acc is None:
            yield Text.assemble(("VRAM ", "bold"), ("none: everything on the CPU", "dim"))
        else:
            where = f"placed on {acc.name}" if acc.source == "placed" else acc.name
            yield self._usage("VRAM ", acc.used, acc.total, where, options.max_width)
        yield self._usage("RAM  ", r.ram_used, r.ram_total, "", options.max_width)
        c = r.checkpoints  # a hybrid model's prompt checkpoints, in this process's memory
        held = f" · checkpoints {human_bytes(c['bytes'])} / {human_bytes(c['max_bytes'])} ({c['count']})" if c else " this process"
        yield Text.assemble(("RSS  ", "bold"), human_bytes(r.rss), (held, "dim"), no_wrap=True)

    @staticmethod
    def _usage(label: str, used: int, total: int, note: str, width: int) -> Text:
        figures = f" {human_bytes(used)} / {human_bytes(total)} "
        bar_width = max(4, min(20, width - len(label) - len(figures) - len(note)))
        return Text.assemble((label, "bold"), _bar(used, total, bar_width), figures, (note, "dim"), no_wrap=True)


class SpeedView(_View):
    name = "speed"

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        r = self.dashboard.reading
        spark = max(0, options.max_width - 31)
        yield Text.assemble(("decode ", "bold"), f"{r.decode_tps:>7.1f} t/s", (f" avg {r.avg_decode_tps:<7.1f} ", "dim"),
                            (sparkline(r.decode_history, spark), "green"), no_wrap=True)
        yield Text.assemble(("prompt ", "bold"), f"{r.prompt_tps:>7.0f} t/s", (f" avg {r.avg_prompt_tps:<7.0f} ", "dim"),
                            (sparkline(r.prompt_history, spark), "cyan"), no_wrap=True)
        yield Text.assemble(("tokens ", "bold"), f"{r.tokens:>7,}", (f"     {r.prompt_tokens:,} in · {r.completion_tokens:,} out", "dim"), no_wrap=True)


class PlanView(_View):
    name = "plan"

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        d = self.dashboard
        plan, placement = d.plan, d.engine.placement
        if plan is not None:
            layers = [i for i in range(plan.model.n_layer) if plan.model.expert_bytes(i)]
            resident = [i for i in layers if i in plan.resident]
            text = Text.assemble(
                ("experts ", "bold"), f"{len(resident)}/{len(layers)} blocks resident · host: ",
                (plan.mode, "bold"), f" · budget {human_bytes(plan.budget)} · margin {human_bytes(plan.margin)}")
            strip = Text("".join("■" if i in plan.resident else "□" for i in layers), style="magenta")
            yield Group(text, strip) if options.height and options.height > 1 else text
            return
        if not placement.devices:
            yield Text("everything on the CPU (no accelerator)", style="dim")
            return
        host = ", ".join(f"{pattern} -> {buft}" for pattern, buft in placement.overrides) or "none"
        yield Text(f"on {', '.join(placement.devices)}; host overrides: {host}", overflow="ellipsis", no_wrap=True)


class ServingView(_View):
    name = "serving"

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        r = self.dashboard.reading
        s = r.live
        yield Text.assemble(
            ("" if self.boxed else "serving ", "bold"), (f"{s.in_flight}", "bold"), " in flight · ", (f"{s.queue_length}", "bold"), " queued · ",
            (f"{r.requests_per_minute:.1f}", "bold"), " req/min · ", f"{s.requests_total} done",
            (f" · {s.rejected} turned away" if s.rejected else "", "yellow"),
            (f" · {r.cached_prompt_tokens:,} prompt tokens cached", "dim"), no_wrap=True,
        )


class HeatMapView(_View):
    """Blocks as rows, experts (bucketed to fit the width) as columns; each cell is the bucket's
    share of the block's recent selections relative to uniform routing. With an expert cache,
    cells whose experts hold slots (see `resident_cells`) take RESIDENT_CHARS/RESIDENT_STYLES."""

    name = "routing"

    def title(self) -> str:
        r = self.dashboard.reading
        return f"routing · last {r.routed_tokens} tokens"

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        d = self.dashboard
        r, telemetry = d.reading, d.telemetry
        rows = (options.height or console.height) - (0 if self.boxed else 1)
        if not self.boxed:
            yield Text(self.title(), style="bold")
        label_width = len(f"L{max(telemetry.layers)}-{max(telemetry.layers)}") + 1
        columns = max(1, options.max_width - label_width)
        # Plain segments, one per run of equal cells: the map is most of what is drawn.
        chars = HEAT_CHARS + RESIDENT_CHARS  # a cell's level, + len(HEAT_CHARS) when resident
        styles = [console.get_style(name, default="") for name in HEAT_STYLES + RESIDENT_STYLES]
        dim, new_line = console.get_style("dim"), Segment.line()
        marks = resident_cells(r.resident, telemetry.layers, rows, columns)
        for index, (label, cells) in enumerate(heat_rows(r.recent, telemetry.layers, rows, columns)):
            if marks:
                cells = [level + len(HEAT_CHARS) * held for level, held in zip(cells, marks[index])]
            yield Segment(label.ljust(label_width)[: options.max_width], dim)
            for code, run in _runs(cells, columns):
                yield Segment(chars[code] * run, styles[code])
            yield new_line


class HottestView(_View):
    name = "hottest"

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        d = self.dashboard
        rows = (options.height or console.height) - (0 if self.boxed else 1)
        if not self.boxed:
            yield Text(self.name, style="bold")
        resident = d.reading.resident
        for layer, expert, share in hottest(d.reading.recent, d.telemetry.layers, d.telemetry.n_expert_used, rows):
            mark = "" if resident is None else RESIDENT_MARK if resident[layer, expert] else " "
            yield Text.assemble((f"L{layer:<3}", "dim"), f"#{expert:<4}", (mark, RESIDENT_STYLES[0]),
                                (f"{share:>4.0%}", "bold"))


class CacheView(_View):
    """The expert cache: hit rates (since the start and recent), uploads, decode calls that fell
    back to llama.cpp's own path, and each block's hit rate as a bar with the worst blocks named.
    One line when unframed; one dim line saying why when the cache turned itself off."""

    name = "expert cache"

    def title(self) -> str:
        c = self.dashboard.reading.cache
        kind = " · split compute (accelerator share per block below)" if c.get("split") else ""
        return f"{self.name} · {c['slots']} slots/block · {c['policy']}{kind}"

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        d = self.dashboard
        c, width = d.reading.cache, options.max_width
        if not c["enabled"]:
            yield Text(f"{self.name} off: {c['disabled_reason'] or 'turned off'}", style="dim", no_wrap=True,
                       overflow="ellipsis")
            return
        if c.get("split"):  # hits ran on the accelerator, misses on the CPU worker at the same time
            yield Text.assemble(
                ("" if self.boxed else "split ", "bold"),
                ("on accel ", "bold"), (f"{c['hit_rate']:.1%}", "bold green"), (" · CPU ", "dim"), f"{1 - c['hit_rate']:.1%}",
                (" · CPU worker ", "dim"), f"{c['cpu_seconds_per_token'] * 1e3:.2f} ms/token",
                (f" (waited {c['cpu_wait_seconds_per_token'] * 1e3:.2f})", "dim"),
                (" · uploads ", "dim"), f"{human_bytes(c['uploaded_bytes_per_token'])}/token",
                no_wrap=True, overflow="ellipsis")
        else:
            yield Text.assemble(
                ("" if self.boxed else "cache ", "bold"),
                ("hits ", "bold"), (f"{c['hit_rate']:.1%}", "bold green"), (" · recent ", "dim"), f"{c['recent_hit_rate']:.1%}",
                (" · uploads ", "dim"), f"{human_bytes(c['uploaded_bytes_per_s'])}/s",
                (f" ({human_bytes(c['uploaded_bytes'])})", "dim"), (" · fallback calls ", "dim"), f"{c['fallback_calls']:,}",
                no_wrap=True, overflow="ellipsis")
        if not self.boxed:
            return
        rates = dict(sorted(c["layer_hit_rate"].items()))
        worst = sorted(rates, key=lambda layer: (rates[layer], layer))[:WORST_BLOCKS]
        named = " · worst " + ", ".join(f"L{layer} {rates[layer]:.0%}" for layer in worst) if len(rates) > 1 else ""
        legend = [(" · ", "dim"), (RESIDENT_MARK, RESIDENT_STYLES[0]), (" in a slot", "dim")] if d.telemetry is not None else []
        prefix = "per block "
        room = width - len(prefix) - len(named) - sum(len(part) for part, _ in legend)
        yield Text.assemble((prefix, "bold"), (rate_bars(list(rates.values()), room), "green"), named, *legend,
                            no_wrap=True, overflow="ellipsis")


# --- figures -> characters -------------------------------------------------------------------------
def sparkline(values: Sequence[float], width: int) -> str:
    """The last `width` values as bars, scaled to their maximum."""
    values = list(values)[-width:] if width > 0 else []
    top = max(values, default=0.0)
    if top <= 0:
        return ""
    return "".join(SPARK[min(len(SPARK) - 1, int(v / top * (len(SPARK) - 1) + 0.5))] for v in values)


def rate_bars(rates: Sequence[float], width: int) -> str:
    """Rates in 0..1 as bars on an absolute scale, one per rate; averaged in groups to fit `width`."""
    if not rates or width < 1:
        return ""
    edges = np.linspace(0, len(rates), min(len(rates), width) + 1).round().astype(int)
    means = np.add.reduceat(np.asarray(rates, dtype=np.float64), edges[:-1]) / np.diff(edges)
    return "".join(SPARK[min(len(SPARK) - 1, int(v * (len(SPARK) - 1) + 0.5))] for v in means)


def _bar(used: int, total: int, width: int) -> Text:
    share = used / total if total else 0.0
    filled = min(width, round(share * width))
    style = "red" if share > 0.9 else "yellow" if share > 0.75 else "green"
    return Text.assemble(("█" * filled, style), ("·" * (width - filled), "grey39"))


def heat_rows(recent: np.ndarray | None, layers: Sequence[int], rows: int, columns: int) -> list[tuple[str, list[int]]]:
    """(label, heat levels) of each row of the heat map: blocks grouped to fit `rows`, experts
    grouped into at most `columns` buckets. A cell's level grows with its experts' share of the
    selections relative to uniform routing (ratio 1.0); 0 means no selection."""
    if recent is None or rows < 1 or not layers:
        return []
    counts = recent[list(layers)].astype(np.float64)
    n_expert = counts.shape[1]
    row_edges, bucket_edges = _cells(len(layers), n_expert, rows, columns)
    groups = np.add.reduceat(counts, row_edges[:-1], axis=0)  # [rows, n_expert]
    per_bucket = np.add.reduceat(groups, bucket_edges[:-1], axis=1) / np.diff(bucket_edges)
    totals = groups.sum(axis=1, keepdims=True)
    ratio = np.divide(per_bucket * n_expert, totals, out=np.zeros_like(per_bucket), where=totals > 0)
    levels = np.where(ratio > 0, 1 + np.searchsorted(HEAT_BOUNDS[1:], ratio, side="right"), 0)
    labels = [f"L{layers[a]}" if b - a == 1 else f"L{layers[a]}-{layers[b - 1]}" for a, b in zip(row_edges[:-1], row_edges[1:])]
    return list(zip(labels, levels.tolist()))


def resident_cells(resident: np.ndarray | None, layers: Sequence[int], rows: int, columns: int) -> list[list[bool]]:
    """Per cell of `heat_rows` (same grouping): whether at least half of its (block, expert)
    pairs hold an expert-cache slot. With one block and one expert per cell, exactly whether
    that expert is resident; blocks the cache does not serve count as not resident."""
    if resident is None or rows < 1 or not layers:
        return []
    held = resident[list(layers)].astype(np.int64)
    row_edges, bucket_edges = _cells(len(layers), held.shape[1], rows, columns)
    per_cell = np.add.reduceat(np.add.reduceat(held, row_edges[:-1], axis=0), bucket_edges[:-1], axis=1)
    return (2 * per_cell >= np.outer(np.diff(row_edges), np.diff(bucket_edges))).tolist()


def _cells(n_layers: int, n_expert: int, rows: int, columns: int) -> tuple[np.ndarray, np.ndarray]:
    """The heat map's grid: edges of its row groups (of blocks) and of its buckets (of experts)."""
    row_edges = np.linspace(0, n_layers, min(rows, n_layers) + 1).round().astype(int)
    bucket_edges = np.linspace(0, n_expert, min(n_expert, columns) + 1).round().astype(int)
    return row_edges, bucket_edges


def hottest(recent: np.ndarray | None, layers: Sequence[int], n_used: int, n: int) -> list[tuple[int, int, float]]:
    """The `n` (block, expert, share of the block's recent tokens that chose it) most often
    selected, across blocks."""
    if recent is None or n < 1:
        return []
    counts = recent[list(layers)]
    tokens = counts.sum(axis=1, keepdims=True) / max(n_used, 1)
    share = np.divide(counts, tokens, out=np.zeros(counts.shape), where=tokens > 0)
    top = np.argsort(share, axis=None)[::-1][:n]
    return [(layers[i // counts.shape[1]], int(i % counts.shape[1]), float(share.flat[i]))
            for i in top if share.flat[i] > 0]


def _runs(levels: list[int], width: int) -> list[tuple[int, int]]:
    """[(level, how many columns)] of `levels` stretched over `width` columns (a few experts on a
    wide terminal): one segment per run of equal cells keeps drawing cheap."""
    stretched = np.asarray(levels)[np.arange(width) * len(levels) // width]
    starts = np.flatnonzero(np.diff(stretched, prepend=-1))
    return list(zip(stretched[starts].tolist(), np.diff(starts, append=width).tolist()))
