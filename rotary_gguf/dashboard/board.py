"""The dashboard of one engine: a reading of its figures, laid out in a fixed `Layout` of views.

`sample()` takes a reading (memory, the engine's live figures, the routing telemetry, the expert
cache's snapshot); `live()` shows it in a rich `Live` that samples a few times a second.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import numpy as np
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.layout import Layout
from rich.live import Live
from rich.segment import Segment

from ..stats import Snapshot
from .memory import AcceleratorMemory, MemoryProbe
from .views import (CacheView, CompactView, HeaderView, HeatMapView, HottestView, MemoryView, PlanView, Section,
                    ServingView, SpeedView, memory_rows, sections)

SAMPLE_SECONDS = 0.5  # a new reading (and drawing) twice a second
LIVE_REFRESH_PER_SECOND = 4  # redraws of a line streamed above the dashboard (its drawing is reused)
HISTORY = 48  # sparkline samples kept
BOXED_MIN_HEIGHT = 20  # below this the sections drop their borders
FIXED_ROWS = ("header", "figures", "plan", "cache", "serving")  # the layout's parts of fixed height
MIN_HOTTEST = 5  # rows of the routing section, also for models with fewer MoE blocks


@dataclass(frozen=True, eq=False)
class Reading:
    """Everything the dashboard shows, taken at one moment (each one a new drawing)."""

    at: float
    accelerators: tuple[AcceleratorMemory, ...]  # one per accelerator of the placement; none on the CPU
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
    last_request: str = ""  # the server's latest access-log line

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Dashboard:
    """The dashboard of one engine. `telemetry` (a RoutingTelemetry) feeds the heat map, `plan`
    the plan view; `serving` adds the request figures and the last of `requests` (access-log
    lines); the engine's expert cache, when it has one, its own view and the resident marks on
    the heat map. `height` limits it to that many lines (default: the terminal's)."""

    def __init__(self, engine, *, telemetry=None, plan=None, serving: bool = False, title: str = "", requests=(),
                 height: int | None = None):
        self.engine, self.telemetry, self.plan, self.serving = engine, telemetry, plan, serving
        self.requests = requests  # the server's access-log lines, newest last (access_log.Recent)
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
            accelerators=tuple(self.memory.accelerators()),
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
            last_request=self.requests[-1] if self.requests else "",
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
        figures.split_row(Layout(Section(MemoryView(self), gutter=2), name="memory"),
                          Layout(Section(SpeedView(self)), name="speed"))
        routing = Layout(name="routing")
        routing.split_row(Layout(Section(HeatMapView(self), gutter=2), name="heatmap"),
                          Layout(Section(HottestView(self)), name="hottest", size=18))
        layout.split_column(
            Layout(HeaderView(self), name="header", size=1),
            figures,
            Layout(Section(PlanView(self)), name="plan"),
            Layout(Section(CacheView(self)), name="cache"),
            Layout(Section(ServingView(self)), name="serving", visible=self.serving),
            routing,
        )
        return layout

    def _fit(self, width: int, height: int) -> int:
        """Size the sections for a width x height area (borders only where there is room); the
        height the dashboard needs of it."""
        boxed = height >= BOXED_MIN_HEIGHT
        frame = 2 if boxed else 0
        for section in sections(self.layout):
            section.boxed = boxed
        self.layout["figures"].size = max(3, 2 + memory_rows(len(self.reading.accelerators), boxed)) + frame
        self.layout["plan"].size = (2 if self.plan is not None and width >= 100 else 1) + frame
        self.layout["serving"].size = (2 if self.reading.last_request else 1) + frame
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

    def compact(self) -> CompactView:
        """The latest reading in one line (memory, average speed, cache hits): see `CompactView`."""
        return CompactView(self)

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

