"""The dashboard's views: one per panel (memory, speed, plan, serving, heat map, hottest experts,
expert cache), each drawn from the dashboard's latest reading, framed by a `Section` when there is
room."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.layout import Layout
from rich.segment import Segment
from rich.text import Text

from ..units import human_bytes
from .cells import (HEAT_CHARS, HEAT_STYLES, RESIDENT_CHARS, RESIDENT_MARK, RESIDENT_STYLES, bar, fit, heat_rows,
                    hottest, rate_bars, resident_cells, runs, sparkline)
from .memory import AcceleratorMemory

if TYPE_CHECKING:
    from .board import Dashboard

WORST_BLOCKS = 3  # blocks named by their cache hit rate
MAX_ACCELERATOR_ROWS = 4  # memory bars, one per accelerator, in a framed memory view
BORDER_STYLE = "grey50"


class Section:
    """A titled part of the dashboard: framed when there is room, else its lines under nothing.
    The frame is drawn here rather than by rich's Panel, which costs several times more."""

    def __init__(self, body: "View", gutter: int = 0):
        self.body, self.boxed, self.gutter = body, True, gutter  # blank columns on its right when unframed
        body.section = self

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if not self.boxed:
            if not self.gutter:
                yield self.body
                return
            gap, new_line = Segment(" " * self.gutter), Segment.line()
            inner = options.update(width=max(1, options.max_width - self.gutter))
            for line in console.render_lines(self.body, inner, pad=True):
                yield from line
                yield gap
                yield new_line
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


def sections(layout: Layout) -> list[Section]:
    """The sections in `layout`, hidden ones too (they may show at the next size)."""
    found = [layout.renderable] if isinstance(layout.renderable, Section) else []
    for child in layout._children:  # `children` leaves out the hidden ones
        found += sections(child)
    return found


class View:
    name = ""
    section: Section | None = None  # set by the section that frames it

    def __init__(self, dashboard: Dashboard):
        self.dashboard = dashboard

    def title(self) -> str:
        return self.name

    @property
    def boxed(self) -> bool:
        return self.section is not None and self.section.boxed


class HeaderView(View):
    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        d = self.dashboard
        inv = d.engine.inventory
        state = (" · generating", "bold green") if d.reading.generating else (" · idle", "dim")
        uptime = int(d.reading.at - d.started)
        experts = [(f" · {inv.n_expert} experts, top {inv.n_expert_used}", "")] if inv.n_expert else []
        yield fit(options.max_width, [("rotary-gguf ", "bold"), (d.title or d.engine.path.name, "bold cyan"), state],
                  [(f" · {inv.arch} · {inv.n_layer} blocks", "")], experts,
                  [(f" · up {uptime // 3600}:{uptime // 60 % 60:02d}:{uptime % 60:02d}", "dim")])


def memory_rows(accelerators: int, boxed: bool) -> int:
    """Lines the memory view gives accelerators: one each, up to MAX_ACCELERATOR_ROWS when framed
    (else 2); with more devices than lines, the last line sums the rest."""
    return max(1, min(accelerators, MAX_ACCELERATOR_ROWS if boxed else 2))


class MemoryView(View):
    """A bar per accelerator (one "VRAM" line for a single device), then the host's RAM and this
    process's RSS."""

    name = "memory"

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        r = self.dashboard.reading
        accs = r.accelerators
        width = options.max_width
        shown = grouped_accelerators(accs, memory_rows(len(accs), self.boxed)) if len(accs) > 1 else []
        label = max([5] + [len(acc.name) + 1 for acc in shown])  # the labels' width, bars aligned
        if not accs:
            yield fit(width, [("VRAM ", "bold"), ("none", "dim")], [(": everything on the CPU", "dim")])
        elif len(accs) == 1:
            acc = accs[0]
            notes = (f"placed on {acc.name}", acc.name) if acc.source == "placed" else (acc.name,)
            yield self._usage("VRAM ", acc.used, acc.total, notes, width)
        else:
            for acc in shown:
                notes = ("placed",) if acc.source == "placed" else ()
                yield self._usage(acc.name.ljust(label), acc.used, acc.total, notes, width)
        yield self._usage("RAM".ljust(label), r.ram_used, r.ram_total, (), width)
        c = r.checkpoints  # a hybrid model's prompt checkpoints, in this process's memory
        held = f" · checkpoints {human_bytes(c['bytes'])} / {human_bytes(c['max_bytes'])} ({c['count']})" if c else " this process"
        yield fit(width, [("RSS".ljust(label), "bold"), (human_bytes(r.rss), "")], [(held, "dim")])

    @staticmethod
    def _usage(label: str, used: int, total: int, notes: tuple[str, ...], width: int) -> Text:
        """label, a bar of 4 to 20 columns, the figures and the longest of `notes` that fits; the
        bar goes before the figures do."""
        figures = f" {human_bytes(used)} / {human_bytes(total)}"
        for note in (*notes, ""):
            room = width - len(label) - len(figures) - (len(note) + 1 if note else 0)
            if room >= 4:
                return Text.assemble((label, "bold"), bar(used, total, min(20, room)), figures,
                                     (f" {note}" if note else "", "dim"), no_wrap=True)
        return fit(width, [(label, "bold"), (figures.lstrip(), "")])


def grouped_accelerators(accs: tuple[AcceleratorMemory, ...], rows: int) -> list[AcceleratorMemory]:
    """`accs` in `rows` lines: the first ones each, the last line the sum of those left ("2 more")."""
    if len(accs) <= rows:
        return list(accs)
    rest = accs[rows - 1 :]
    sources = {acc.source for acc in rest}
    return [*accs[: rows - 1], AcceleratorMemory(f"{len(rest)} more", sum(a.used for a in rest), sum(a.total for a in rest),
                                                 sources.pop() if len(sources) == 1 else "mixed")]


class SpeedView(View):
    name = "speed"

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        r, width = self.dashboard.reading, options.max_width
        for label, now, avg, history, style in (("decode ", f"{r.decode_tps:>7.1f}", f"{r.avg_decode_tps:<7.1f}", r.decode_history, "green"),
                                                ("prompt ", f"{r.prompt_tps:>7.0f}", f"{r.avg_prompt_tps:<7.0f}", r.prompt_history, "cyan")):
            text = fit(width, [(label, "bold"), (f"{now} t/s", "")], [(f" avg {avg} ", "dim")])
            text.append(sparkline(history, width - text.cell_len), style)
            yield text
        live = r.live  # MTP drafts: the share accepted and the mean accepted per round, ahead of in/out
        drafts = ([("  drafts ", "bold"), (f"{live.draft_accepted / live.drafted_tokens:.0%} accepted · "
                                           f"{live.mean_accepted:.1f}/round", "")] if live.drafted_tokens else [])
        yield fit(width, [("tokens ", "bold"), (f"{r.tokens:>7,}", "")], drafts,
                  [(f"     {r.prompt_tokens:,} in · {r.completion_tokens:,} out", "dim")])


class PlanView(View):
    name = "plan"

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        d = self.dashboard
        plan, placement = d.plan, d.engine.placement
        if plan is not None:
            layers = [i for i in range(plan.model.n_layer) if plan.model.expert_bytes(i)]
            resident = [i for i in layers if i in plan.resident]
            text = fit(options.max_width, [("experts ", "bold"), (f"{len(resident)}/{len(layers)} blocks resident", "")],
                       [(" · host: ", ""), (plan.mode, "bold")], [(f" · budget {human_bytes(plan.budget)}", "")],
                       [(f" · margin {human_bytes(plan.margin)}", "")])
            strip = Text("".join("■" if i in plan.resident else "□" for i in layers), style="magenta")
            yield Group(text, strip) if options.height and options.height > 1 else text
            return
        if not placement.devices:
            yield Text("everything on the CPU (no accelerator)", style="dim")
            return
        host = ", ".join(f"{pattern} -> {buft}" for pattern, buft in placement.overrides) or "none"
        n = len(placement.overrides)
        yield fit(options.max_width, [(f"on {', '.join(placement.devices)}", "")], [(f"; host overrides: {host}", "")]
                  if len(host) + 20 <= options.max_width else [(f"; {n} host override{'s' * (n != 1)}", "")])


class ServingView(View):
    name = "serving"

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        r = self.dashboard.reading
        s = r.live
        yield fit(options.max_width,
                  [("" if self.boxed else "serving ", "bold"), (f"{s.in_flight}", "bold"), (" in flight · ", ""),
                   (f"{s.queue_length}", "bold"), (" queued", "")],
                  [(" · ", ""), (f"{r.requests_per_minute:.1f}", "bold"), (" req/min", "")],
                  [(f" · {s.requests_total} done", "")],
                  [(f" · {s.rejected} turned away" if s.rejected else "", "yellow")],
                  [(f" · {r.cached_prompt_tokens:,} prompt tokens cached", "dim")])
        if r.last_request and (options.height or 1) > 1:
            yield Text.assemble(("last ", "bold"), (r.last_request, "dim"), no_wrap=True, overflow="ellipsis")


class HeatMapView(View):
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
            for code, run in runs(cells, columns):
                yield Segment(chars[code] * run, styles[code])
            yield new_line


class HottestView(View):
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


class CacheView(View):
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
            yield fit(width, [("" if self.boxed else "split ", "bold"), ("on accel ", "bold"), (f"{c['hit_rate']:.1%}", "bold green")],
                      [(" · CPU ", "dim"), (f"{1 - c['hit_rate']:.1%}", "")],
                      [(" · CPU worker ", "dim"), (f"{c['cpu_seconds_per_token'] * 1e3:.2f} ms/token", "")],
                      [(f" (waited {c['cpu_wait_seconds_per_token'] * 1e3:.2f})", "dim")],
                      [(" · uploads ", "dim"), (f"{human_bytes(c['uploaded_bytes_per_token'])}/token", "")])
        else:
            yield fit(width, [("" if self.boxed else "cache ", "bold"), ("hits ", "bold"), (f"{c['hit_rate']:.1%}", "bold green")],
                      [(" · recent ", "dim"), (f"{c['recent_hit_rate']:.1%}", "")],
                      [(" · uploads ", "dim"), (f"{human_bytes(c['uploaded_bytes_per_s'])}/s", "")],
                      [(f" ({human_bytes(c['uploaded_bytes'])})", "dim")],
                      [(" · fallback calls ", "dim"), (f"{c['fallback_calls']:,}", "")])
        if not self.boxed:
            return
        rates = dict(sorted(c["layer_hit_rate"].items()))
        worst = sorted(rates, key=lambda layer: (rates[layer], layer))[:WORST_BLOCKS]
        named = " · worst " + ", ".join(f"L{layer} {rates[layer]:.0%}" for layer in worst) if len(rates) > 1 else ""
        legend = [(" · ", "dim"), (RESIDENT_MARK, RESIDENT_STYLES[0]), (" in a slot", "dim")] if d.telemetry is not None else []
        prefix = "per block "
        if len(prefix) + 4 + len(named) > width:
            named, legend = "", []
        room = width - len(prefix) - len(named) - sum(len(part) for part, _ in legend)
        if room < 4:
            legend, room = [], width - len(prefix) - len(named)
        yield fit(width, [(prefix, "bold"), (rate_bars(list(rates.values()), room), "green"), (named, "")], legend)


class CompactView(View):
    """The dashboard in one line, left on screen after each chat answer: memory, the average decode
    speed and the expert cache's hit rate (parts that do not fit are left out, last first)."""

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        r = self.dashboard.reading
        accs, c = r.accelerators, r.cache
        if not accs:
            first = [("CPU only", "bold")]
        elif len(accs) == 1:
            first = [(f"{accs[0].name} ", "bold"), (f"{human_bytes(accs[0].used)} / {human_bytes(accs[0].total)}", "")]
        else:  # several: their sum
            used, total = sum(a.used for a in accs), sum(a.total for a in accs)
            first = [(f"{len(accs)} accelerators ", "bold"), (f"{human_bytes(used)} / {human_bytes(total)}", "")]
        cache = []
        if c is not None:
            cache = ([(" · cache hits ", "dim"), (f"{c['hit_rate']:.1%}", "bold green"), (f" (recent {c['recent_hit_rate']:.1%})", "dim")]
                     if c["enabled"] else [(" · expert cache off", "dim")])
        yield fit(options.max_width, first, [(" · RAM ", "dim"), (f"{human_bytes(r.ram_used)} / {human_bytes(r.ram_total)}", "")],
                  [(" · avg ", "dim"), (f"{r.avg_decode_tps:.1f} t/s", "")], cache,
                  [(" · RSS ", "dim"), (human_bytes(r.rss), "")])
