"""The expert order a routing profile asks for: experts selected together sit side by side, so
llama.cpp uploads a token's experts in fewer runs (`order_experts`), and the copies that saves."""

from __future__ import annotations

import numpy as np

from ..profile_io import Profile


def order_experts(pair_weight: np.ndarray, heat: np.ndarray) -> list[int]:
    """An order of the experts (position -> original id) that keeps experts selected together
    adjacent.

    A token's experts are copied as runs of adjacent ids, so its copies are n_used minus the number
    of adjacent pairs it selected both of. Maximising the summed `pair_weight` (how often a and b
    are selected by the same token) over adjacent pairs therefore minimises the expected copies per
    token: a maximum-weight Hamiltonian path, for which greedy edge joining followed by 2-opt is
    the standard heuristic. With co-activation counts it follows the pairs that really fire
    together, which per-expert counts cannot show. With counts only (pair weight p_a * p_b) it
    puts the hottest experts next to each other, the hottest in their middle, which covers more
    likely pairs than a falling hottest-first sort.

    Among equal weights, experts with nearby original ids are joined first, so a block without
    information keeps the original order, and the result depends on the profile alone, not on the
    order of the file it is applied to. The hotter half of the path comes first.
    """
    n = len(pair_weight)
    if n < 2:
        return list(range(n))
    path = _greedy_path(pair_weight)
    path = _two_opt(path, pair_weight)
    positions = np.arange(n)
    if float(heat[path] @ positions) > float(heat[path] @ positions[::-1]):
        path = path[::-1]
    return [int(p) for p in path]


def _greedy_path(w: np.ndarray) -> np.ndarray:
    """Join the heaviest pairs first, never making a cycle or a node of degree 3."""
    n = len(w)
    i, j = np.triu_indices(n, 1)
    ranked = np.lexsort((i, j - i, -w[i, j]))  # heaviest; then closest in original ids
    root = list(range(n))

    def find(a: int) -> int:
        while root[a] != a:
            root[a] = root[root[a]]
            a = root[a]
        return a

    degree = [0] * n
    links: list[list[int]] = [[] for _ in range(n)]
    joined = 0
    for k in ranked:
        a, b = int(i[k]), int(j[k])
        if degree[a] < 2 and degree[b] < 2 and find(a) != find(b):
            root[find(a)] = find(b)
            degree[a] += 1
            degree[b] += 1
            links[a].append(b)
            links[b].append(a)
            joined += 1
            if joined == n - 1:
                break
    start = min(k for k in range(n) if degree[k] == 1)
    path, prev = [start], -1
    while len(path) < n:
        nxt = next(x for x in links[path[-1]] if x != prev)
        prev = path[-1]
        path.append(nxt)
    return np.array(path)


def _two_opt(path: np.ndarray, w: np.ndarray, max_passes: int = 100) -> np.ndarray:
    """Reverse path segments while that raises the summed weight of adjacent pairs."""
    n = len(path)
    eps = 1e-12 * max(float(w.max()), 1.0)
    for _ in range(max_passes):
        improved = False
        for i in range(n - 1):
            # reversing path[i..j] turns the pairs (a, b), (c, d) into (a, c), (b, d), where
            # a, b = path[i-1], path[i] and c, d = path[j], path[j+1], for every j at once
            b, c = path[i], path[i + 1 :]
            d = np.append(path[i + 2 :], -1)
            has_d = d >= 0
            gain = np.where(has_d, w[b, np.maximum(d, 0)] - w[c, np.maximum(d, 0)], 0.0)
            if i > 0:
                a = path[i - 1]
                gain = gain + w[a, c] - w[a, b]
            best = int(np.argmax(gain))
            if gain[best] > eps:
                j = i + 1 + best
                path[i : j + 1] = path[i : j + 1][::-1].copy()
                improved = True
        if not improved:
            break
    return path


def pair_probabilities(profile: Profile, layer: int) -> np.ndarray:
    """P(a and b selected by the same token): measured when the profile has co-activation counts,
    else estimated from the counts as if experts were picked independently."""
    entry = profile.layers[layer]
    tokens = max(profile.tokens, 1)
    if entry.coactivation is not None:
        w = entry.coactivation.astype(np.float64) / tokens
    else:
        p = entry.counts.astype(np.float64) / tokens
        w = np.outer(p, p)
    np.fill_diagonal(w, 0.0)
    return w


def copies_per_token(order: list[int], pair_p: np.ndarray, n_used: int) -> float:
    """Expected copies per token and expert tensor for experts stored in `order` (original ids)."""
    o = np.asarray(order)
    return n_used - float(pair_p[o[:-1], o[1:]].sum())
