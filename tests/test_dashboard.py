"""The dashboard rendered into a recording rich Console after real generations: it fits the
terminal, shows the engine's figures, the plan and memory, the expert cache, and a heat map of the
right shape that marks the experts holding cache slots."""

from __future__ import annotations

import io
import re
import shutil

import httpx
import numpy as np
import pytest
from rich.console import Console

from conftest import CLI, free_port
from synthetic_models import hot_experts
from test_chat import Terminal
from rotary_gguf.experts import cache as ec
from rotary_gguf import native
from rotary_gguf.arch import expert_pattern
from rotary_gguf.convert import convert
from rotary_gguf.dashboard import AcceleratorMemory, Dashboard, heat_rows, hottest, rate_bars, resident_cells, sparkline
from rotary_gguf.dashboard.views import grouped_accelerators, memory_rows
from rotary_gguf.engine import Engine
from rotary_gguf.experts.cache import ExpertCache
from rotary_gguf.inventory import read_inventory
from rotary_gguf.plan import ModelFigures, Placement, make_plan
from rotary_gguf.telemetry import RoutingTelemetry, record_profile, write_profile
from rotary_gguf.units import human_bytes

PROMPT = "The river bends twice before it reaches the sea, and"
HEAT_ROW = re.compile(r"^(?:│ )?(L(\d+)(?:-(\d+))?) ")
HOTTEST_ROW = re.compile(r"L(\d+) +#(\d+) +(■?) *(\d+)%")


def render(dashboard: Dashboard, width: int, height: int) -> list[str]:
    console = Console(width=width, height=height, record=True, file=io.StringIO(), force_terminal=True)
    dashboard.sample()
    console.print(dashboard)
    return console.export_text().splitlines()


def heat_map(lines: list[str], layers: list[int]) -> dict[str, str]:
    """label -> the row's cells, read from the rendered text."""
    label_width = len(f"L{max(layers)}-{max(layers)}") + 1
    rows = {}
    for line in lines:
        m = HEAT_ROW.match(line)
        if m:
            cells = line[m.start(1) + label_width :].split("│")[0]
            rows[m.group(1)] = cells[:-1] if line.count("│") else cells.rstrip()
    return rows


@pytest.fixture(scope="module")
def skewed(test_model):
    """An engine on a skewed 4-block model, with telemetry, after two generations."""
    path = test_model(router_skew=2.0)
    telemetry = RoutingTelemetry.for_model(path)
    with Engine.load(path, n_ctx=256, n_threads=1, telemetry=telemetry) as engine:
        dashboard = Dashboard(engine, telemetry=telemetry, serving=True)
        for _ in range(2):
            engine.greedy(engine.tokenize(PROMPT), 40)
        yield engine, telemetry, dashboard


def test_fits_80x24_and_shows_the_figures(skewed):
    engine, telemetry, dashboard = skewed
    lines = render(dashboard, 80, 24)
    assert len(lines) <= 24 and max(map(len, lines)) <= 80
    text = "\n".join(lines)
    s = engine.live.snapshot()
    assert f"{s.last_decode_tps:.1f} t/s" in text
    assert f"avg {s.avg_decode_tps:.1f}" in text
    assert f"{s.prompt_tokens + s.completion_tokens:,}" in text
    assert f"{s.prompt_tokens:,} in · {s.completion_tokens:,} out" in text
    assert s.cached_prompt_tokens > 0  # the second generation reused the first one's prompt
    assert f"2 done · {s.cached_prompt_tokens:,} prompt tokens cached" in text
    assert re.search(r"decode .*t/s .*[▁▂▃▄▅▆▇█]", text), "no decode sparkline"
    assert "0 in flight · 0 queued" in text and "2 done" in text
    assert re.search(r"[1-9][\d.]* req/min", text)
    assert "everything on the CPU" in text and "RSS" in text and "RAM" in text
    assert f"routing · last {min(telemetry.window, telemetry.tokens)} tokens" in text


def test_heat_map_rows_are_blocks_and_the_hot_experts_glow(skewed):
    engine, telemetry, dashboard = skewed
    inv = engine.inventory
    hot = hot_experts(inv.n_layer, inv.n_expert, inv.n_expert_used, 0)
    rows = heat_map(render(dashboard, 80, 24), telemetry.layers)
    assert list(rows) == [f"L{i}" for i in telemetry.layers]
    widths = {len(cells) for cells in rows.values()}
    assert len(widths) == 1 and widths.pop() >= inv.n_expert  # experts stretched over the width
    for i in telemetry.layers:
        cells = rows[f"L{i}"]
        glowing = {c * inv.n_expert // len(cells) for c, ch in enumerate(cells) if ch in "▓█"}
        assert glowing == set(hot[i]) and set(cells) <= set(" ░▓█"), (i, cells)
    top = hottest(telemetry.recent(), telemetry.layers, inv.n_expert_used, 3)
    assert all(expert in hot[layer] for layer, expert, _ in top)


def test_uses_a_large_terminal_and_shrinks_for_chat(test_model):
    path = test_model(layers=40)
    telemetry = RoutingTelemetry.for_model(path)
    with Engine.load(path, n_ctx=256, n_threads=1, telemetry=telemetry) as engine:
        engine.greedy(engine.tokenize(PROMPT), 8)
        dashboard = Dashboard(engine, telemetry=telemetry)
        lines = render(dashboard, 160, 48)
        assert len(lines) == 48 and max(map(len, lines)) <= 160
        rows = heat_map(lines, telemetry.layers)
        # every block in exactly one row, in order; as many rows as fit
        spans = [(int(a), int(b or a)) for a, b in (re.match(r"L(\d+)(?:-(\d+))?", label).groups() for label in rows)]
        covered = [i for a, b in spans for i in range(a, b + 1)]
        assert covered == list(range(40)) and 30 <= len(rows) < 40
        assert {len(c) for c in rows.values()} == {max(len(c) for c in rows.values())} and len(next(iter(rows.values()))) > 100
        dashboard.height = 12
        compact = render(dashboard, 80, 24)
        assert len(compact) == 12 and "decode" in compact[1] and heat_map(compact, telemetry.layers)


def test_plan_and_placed_memory_on_the_simulated_accelerator(test_model, rpc_endpoint):
    path = test_model()
    accelerator = native.find_accelerator(rpc_endpoint)
    figures = ModelFigures.from_inventory(read_inventory(path))
    minimum = make_plan(figures, accelerator, 2**40, ctx=256, n_batch=64).minimum_budget
    plan = make_plan(figures, accelerator, minimum + 2 * figures.expert_bytes(0), ctx=256, n_batch=64)
    assert 0 < len(plan.resident) < figures.n_layer
    with Engine.load(path, plan.placement, n_ctx=256, n_batch=64, n_threads=1) as engine:
        report = engine.load_report
        placed = sum(n for sizes in (report.weight_bytes, report.kv_bytes, report.compute_bytes)
                     for buffer, n in sizes.items() if buffer == accelerator.buffer_type)
        text = "\n".join(render(Dashboard(engine, plan=plan), 100, 30))
    assert f"{human_bytes(placed)} / {human_bytes(plan.budget)} placed on RPC0" in text
    assert f"{len(plan.resident)}/{figures.n_layer} blocks resident · host: cpu" in text
    assert f"budget {human_bytes(plan.budget)} · margin {human_bytes(plan.margin)}" in text
    assert "".join("■" if i in plan.resident else "□" for i in range(figures.n_layer)) in text
    assert "routing" not in text  # no telemetry, no heat map


def test_many_accelerators_share_the_memory_lines():
    """One line per accelerator, up to 4 framed and 2 unframed; the last line then sums the rest."""
    MiB = 2**20
    accs = tuple(AcceleratorMemory(f"RPC{i}", (i + 1) * MiB, 4 * MiB, "placed") for i in range(5))
    assert [memory_rows(n, True) for n in (0, 1, 2, 4, 5)] == [1, 1, 2, 4, 4]
    assert [memory_rows(n, False) for n in (0, 1, 2, 5)] == [1, 1, 2, 2]
    assert grouped_accelerators(accs[:2], 2) == list(accs[:2])
    assert grouped_accelerators(accs, 4) == [*accs[:3], AcceleratorMemory("2 more", 9 * MiB, 8 * MiB, "placed")]
    mixed = (*accs[:2], AcceleratorMemory("CUDA0", MiB, 8 * MiB, "NVML"))
    assert grouped_accelerators(mixed, 2) == [accs[0], AcceleratorMemory("2 more", 3 * MiB, 12 * MiB, "mixed")]


def test_heat_levels_and_sparkline():
    uniform = np.full((4, 256), 10)
    rows = heat_rows(uniform, [0, 1, 2, 3], rows=2, columns=50)
    assert [label for label, _ in rows] == ["L0-1", "L2-3"]
    assert all(len(cells) == 50 and set(cells) == {2} for _, cells in rows)  # ratio 1.0: the middle level
    skewed = np.zeros((1, 8), dtype=np.int64)
    skewed[0, 3] = 100
    assert heat_rows(skewed, [0], rows=5, columns=8) == [("L0", [0, 0, 0, 4, 0, 0, 0, 0])]
    assert hottest(skewed, [0], 1, 2) == [(0, 3, 1.0)]
    assert sparkline([1, 2, 4, 8], 3) == "▃▅█" and sparkline([], 10) == "" and sparkline([5.0], 0) == ""


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux to watch the dashboard in a real terminal")
def test_serve_dashboard_follows_the_requests(test_model, tmp_path):
    """With stderr in a file the dashboard still draws on the terminal; the access log is quiet
    there, the dashboard showing the last request instead."""
    port, errors = free_port(), tmp_path / "serve.err"
    term = Terminal(f"{CLI} serve {test_model(router_skew=1.0)} --dashboard --port {port} --threads 1 2>{errors}", 100, 30)
    try:
        term.wait_for(lambda s: f"at http://127.0.0.1:{port}/v1 · idle" in s and "0 done" in s)
        for _ in range(2):
            reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30,
                               json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16})
            assert reply.status_code == 200
        usage = reply.json()["usage"]
        screen = term.wait_for(lambda s: "2 done" in s and re.search(r"0 in flight · 0 queued · [1-9][\d.]* req/min", s))
        assert "routing · last" in screen and "L0" in screen and "decode" in screen
        last = f"last POST /v1/chat/completions 200 prompt={usage['prompt_tokens']} completion={usage['completion_tokens']} "
        term.wait_for(lambda s: last in s)
        term.send("C-c")
        term.wait_for(lambda s: "EXIT=0" in s, timeout=30)
    finally:
        term.close()
    assert "/v1/chat/completions" not in errors.read_text()


def test_serve_dashboard_without_a_terminal_is_one_line(test_model):
    """Nothing to draw on (stdout and stderr redirected, no controlling terminal): said before loading."""
    import subprocess

    result = subprocess.run([CLI, "serve", str(test_model()), "--dashboard", "--port", str(free_port())],
                            capture_output=True, text=True, timeout=60, start_new_session=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: --dashboard needs a terminal") and len(result.stderr.strip().splitlines()) == 1


# --- the expert cache ------------------------------------------------------------------------------
def render_styled(dashboard: Dashboard, width: int, height: int) -> list[tuple[str, list[str | None]]]:
    """Each drawn line's text and the colour name of each of its characters."""
    console = Console(width=width, height=height, file=io.StringIO(), force_terminal=True)
    dashboard.sample()
    out = []
    for line in console.render_lines(dashboard, console.options.update(height=height), pad=False):
        colours = [s.style.color.name if s.style and s.style.color else None for s in line for _ in s.text]
        out.append(("".join(s.text for s in line), colours))
    return out


def marked_experts(lines: list[tuple[str, list[str | None]]], layers: list[int], n_expert: int) -> dict[int, set[int]]:
    """Block -> the experts whose heat-map cells are drawn in magenta (one block per row, experts
    stretched over the columns)."""
    label_width = len(f"L{max(layers)}-{max(layers)}") + 1
    marked = {}
    for text, colours in lines:
        m = HEAT_ROW.match(text)
        if m and m.group(3) is None:
            start = m.start(1) + label_width
            width = text[start:].index("│") - 1  # the frame's padding before its border
            marked[int(m.group(2))] = {c * n_expert // width for c in range(width) if colours[start + c] == "magenta"}
    return marked


@pytest.fixture(scope="module")
def reordered(test_model, tmp_path_factory):
    """The skewed qwen3moe model with its experts reordered by a routing profile: file positions
    are not original ids, so the cache's residents must be mapped to show in the right cells."""
    path = test_model(arch="qwen3moe", router_skew=1.5)
    folder = tmp_path_factory.mktemp("reordered")
    telemetry = RoutingTelemetry.for_model(path)
    with Engine.load(path, n_ctx=256, n_threads=1, telemetry=telemetry, all_outputs=True) as engine:
        write_profile(record_profile(engine, telemetry, [PROMPT, "def add(a, b):"], 16), folder / "profile.json")
    output = convert(path, folder / "reordered.gguf", profile=folder / "profile.json", show_progress=False).output
    inv = read_inventory(output)
    assert any(inv.expert_order(i) != list(range(inv.n_expert)) for i in range(inv.n_layer))
    return output


def cached_engine(path, rpc_endpoint, telemetry: RoutingTelemetry, slots: int) -> Engine:
    """An engine on the simulated accelerator whose host experts are served by an expert cache."""
    rpc = native.add_rpc_device(rpc_endpoint)
    placement = Placement(devices=(rpc.name,), n_gpu_layers=-1, overrides=((expert_pattern(), "CPU"),), repack=False)
    inv = telemetry.inventory
    cache = ExpertCache(inv.n_layer, inv.n_expert, inv.n_expert_used, slots, rpc.buffer_type)
    return Engine.load(path, placement, n_ctx=256, n_threads=1, telemetry=telemetry, expert_cache=cache)


def test_expert_cache_figures_and_resident_marks(reordered, rpc_endpoint):
    telemetry = RoutingTelemetry.for_model(reordered)
    inv = telemetry.inventory
    with cached_engine(reordered, rpc_endpoint, telemetry, slots=inv.n_expert // 4) as engine:
        engine.greedy(engine.tokenize(PROMPT), 32)
        dashboard = Dashboard(engine, telemetry=telemetry, serving=True)
        lines = render_styled(dashboard, 80, 24)
        snap, now = dashboard.reading.cache, engine.expert_cache.snapshot()
        assert (snap["hits"], snap["misses"], snap["resident"]) == (now["hits"], now["misses"], now["resident"])
        # the slots count in the memory placed on the simulated accelerator
        slot_bytes = engine.expert_cache.slot_bytes
        assert slot_bytes == sum(t.nbytes for t in inv.expert_tensors) // 4 > 0
        report = engine.load_report
        llama_placed = sum(n for sizes in (report.weight_bytes, report.kv_bytes, report.recurrent_bytes, report.compute_bytes)
                           for buffer, n in sizes.items() if buffer.startswith("RPC"))
        assert dashboard.reading.accelerators[0].used == llama_placed + slot_bytes
    text = "\n".join(t for t, _ in lines)
    assert len(lines) <= 24 and max(len(t) for t, _ in lines) <= 80
    assert snap["enabled"] and 0 < snap["hit_rate"] < 1 and snap["fallback_calls"] > 0
    assert f"expert cache · {inv.n_expert // 4} slots/block · lfu-decay" in text
    assert f"hits {snap['hit_rate']:.1%} · recent {snap['recent_hit_rate']:.1%}" in text
    assert f"/s ({human_bytes(snap['uploaded_bytes'])}) · fallback calls {snap['fallback_calls']:,}" in text
    worst = min(snap["layer_hit_rate"], key=lambda layer: (snap["layer_hit_rate"][layer], layer))
    assert f"worst L{worst} {snap['layer_hit_rate'][worst]:.0%}" in text
    # the heat map's magenta cells are the residents, mapped from file positions to original ids
    resident = {layer: set(telemetry.original_ids(layer, positions)) for layer, positions in snap["resident"].items()}
    assert resident != {layer: set(positions) for layer, positions in snap["resident"].items()}  # the map matters
    assert all(0 < len(r) <= inv.n_expert // 4 for r in resident.values())
    assert marked_experts(lines, telemetry.layers, inv.n_expert) == {i: resident[i] for i in telemetry.layers}
    # the hottest list marks its resident experts
    hot = [m.groups() for t, _ in lines for m in [HOTTEST_ROW.search(t)] if m]
    assert len(hot) >= 5 and any(mark for *_, mark, _ in hot)
    assert all((int(expert) in resident[int(layer)]) == (mark == "■") for layer, expert, mark, _ in hot), hot


def test_a_cache_that_turned_itself_off_says_why(test_model, rpc_endpoint, monkeypatch):
    path = test_model(arch="qwen3moe", router_skew=1.5)
    telemetry = RoutingTelemetry.for_model(path)
    monkeypatch.setattr(ec, "VERIFIED_LLAMA_CPP_PYTHON", ("0.0.1",))
    with cached_engine(path, rpc_endpoint, telemetry, slots=telemetry.n_expert // 4) as engine:
        engine.greedy(engine.tokenize(PROMPT), 8)
        reason = engine.expert_cache.disabled_reason
        dashboard = Dashboard(engine, telemetry=telemetry)
        wide = render_styled(dashboard, 120, 30)
        narrow = render(dashboard, 80, 24)
    assert "is not one the cache was verified with" in reason
    assert f"expert cache off: {reason}" in [t.strip() for t, _ in wide]
    assert "slots/block" not in "\n".join(t for t, _ in wide)
    assert not any(marked_experts(wide, telemetry.layers, telemetry.n_expert).values())
    off = [line for line in narrow if line.startswith("expert cache off: ")]
    assert len(off) == 1 and len(off[0]) <= 80 and len(narrow) <= 24


def test_resident_cells_follow_the_heat_map_grouping_and_rate_bars():
    resident = np.zeros((2, 4), dtype=bool)
    resident[0, [0, 1]] = resident[1, 0] = True
    assert resident_cells(resident, [0, 1], rows=2, columns=4) == resident.tolist()  # one pair per cell: exact
    assert resident_cells(resident, [0, 1], rows=1, columns=2) == [[True, False]]  # 3 of 4 pairs, then none
    resident[:] = False
    resident[0, 2] = resident[1, 3] = True
    assert resident_cells(resident, [0, 1], rows=1, columns=2) == [[False, True]]  # half of the pairs
    assert resident_cells(resident, [0, 1], rows=2, columns=2) == [[False, True], [False, True]]  # 1 of 2: half
    assert resident_cells(None, [0, 1], rows=2, columns=4) == []
    assert rate_bars([0.0, 0.5, 1.0], 10) == "▁▅█" and rate_bars([0.0, 1.0, 1.0, 1.0], 2) == "▅█"  # averaged to fit
    assert rate_bars([], 4) == "" and rate_bars([1.0], 0) == ""


# --- the layout at fixed terminal sizes ------------------------------------------------------------
# (width, height, dashboard height): whole terminals, and the part chat gives it below an answer
SIZES = [(80, 24, None), (60, 15, None), (120, 40, None), (80, 24, 14), (60, 15, 8)]
# Phrases the dashboard prints whole or not at all.
PHRASES = ["placed on RPC0", "this process", "in flight", "queued", "req/min", "prompt tokens cached",
           "fallback calls", "expert cache", "resident", "everything on the CPU"]
COLUMN_STARTS = ("decode", "prompt", "tokens", "hottest")


def assert_laid_out(lines: list[str], width: int, height: int) -> None:
    """Fits the area; no value runs into the next one or the next column; no phrase cut mid-word."""
    screen = "\n".join(lines)
    assert len(lines) <= height and max(map(len, lines)) <= width, screen
    assert not re.search(r"(?:[KMG]iB|t/s|%)[A-Za-z]", screen), screen  # e.g. "23.5 GiBtokens"
    for start in COLUMN_STARTS:  # the right-hand columns start after a blank or a border
        assert not re.search(rf"[^\s│]{start}", screen), (start, screen)
    for line in lines:  # the hottest list never touches the heat map
        if (m := HOTTEST_ROW.search(line)) and m.start() > 0:
            assert line[m.start() - 2 : m.start()] in ("  ", "│ "), line
    for phrase in PHRASES:
        for k in range(3, len(phrase)):
            if phrase[k - 1] != " " and phrase[k] != " ":
                assert not re.search(re.escape(phrase[:k]) + r"(?:[\s│…]|$)", screen, flags=re.M), (phrase, screen)
    assert "…" not in screen, screen


@pytest.mark.parametrize("width,height,rows", SIZES)
def test_layout_on_the_cpu(skewed, width, height, rows):
    engine, telemetry, dashboard = skewed
    dashboard.height = rows
    try:
        lines = render(dashboard, width, height)
    finally:
        dashboard.height = None
    assert_laid_out(lines, width, rows or height)
    text = "\n".join(lines)
    assert "decode" in text and "RAM" in text and "routing" in text
    assert ("hottest" in text) == (width >= 64)


@pytest.mark.parametrize("width,height,rows", SIZES)
def test_layout_on_the_simulated_accelerator_with_an_expert_cache(test_model, rpc_endpoint, width, height, rows):
    path = test_model(arch="qwen3moe", router_skew=1.5)
    telemetry = RoutingTelemetry.for_model(path)
    with cached_engine(path, rpc_endpoint, telemetry, slots=telemetry.n_expert // 4) as engine:
        engine.greedy(engine.tokenize(PROMPT), 16)
        dashboard = Dashboard(engine, telemetry=telemetry, serving=True, height=rows)
        lines = render(dashboard, width, height)
        snap = dashboard.reading.cache
    assert_laid_out(lines, width, rows or height)
    text = "\n".join(lines)
    assert "RPC0" in text and f"hits {snap['hit_rate']:.1%}" in text and "in flight" in text
    if width >= 120:
        assert "placed on RPC0" in text
