"""Figures turned into characters: sparklines, bars, the heat map's cells and the hottest experts."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from rich.text import Text

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


def bar(used: int, total: int, width: int) -> Text:
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


def runs(levels: list[int], width: int) -> list[tuple[int, int]]:
    """[(level, how many columns)] of `levels` stretched over `width` columns (a few experts on a
    wide terminal): one segment per run of equal cells keeps drawing cheap."""
    stretched = np.asarray(levels)[np.arange(width) * len(levels) // width]
    starts = np.flatnonzero(np.diff(stretched, prepend=-1))
    return list(zip(stretched[starts].tolist(), np.diff(starts, append=width).tolist()))


Part = tuple[str, str]  # (text, style)


def fit(width: int, first: Sequence[Part], *more: Sequence[Part]) -> Text:
    """One line of at most `width` characters: `first` (cut with an ellipsis only if it alone is
    too long), then each group of `more` that still fits, whole, in order: a label never runs
    into the next column and no value is cut mid-word."""
    text = Text.assemble(*first, no_wrap=True, overflow="ellipsis")
    for group in more:
        length = sum(len(part) for part, _ in group)
        if text.cell_len + length <= width:
            text.append_text(Text.assemble(*group))
    text.truncate(width, overflow="ellipsis")
    return text
