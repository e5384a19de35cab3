"""Speeds measured on this machine with ggml itself: host -> device uploads, CPU expert matmuls."""

from __future__ import annotations

import ctypes
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import UserError
from ..plan import Accelerator, LinkFigures
from .backends import Device, cpu_device, cpu_weight_buffer_type, device_by_name
from .ggml import (_GGML_TYPE_F32, _GGML_TYPE_I32, _add, _alloc_ctx_tensors, _backend_free, _buffer_base, _buffer_clear,
                   _buffer_free, _buft_alloc_buffer, _build_forward_expand, _cpu_set_n_threads, _dev_init, _first_tensor,
                   _gated_delta_net, _graph_compute, _metadata_context, _mul, _mul_mat, _mul_mat_id, _new_graph,
                   _new_tensor_2d, _new_tensor_3d, _row_size, _swiglu_split, _tensor_get, _tensor_set, _view_2d)


@contextmanager
def _device_tensor(dev: Device, nbytes: int) -> Iterator[int]:
    """A tensor of `nbytes` in `dev`'s memory, for timing copies into it."""
    with _metadata_context(1) as ctx:
        tensor = _new_tensor_2d(ctx, _GGML_TYPE_F32, nbytes // 4, 1)
        buf = _alloc_ctx_tensors(ctx, dev.buffer_type)
        if not buf:
            raise UserError(f"could not allocate {nbytes} bytes on {dev.name} to measure copies to it")
        try:
            yield tensor
        finally:
            _buffer_free(buf)


def upload_bytes_per_s(dev: Device, nbytes: int = 256 * 2**20, repeats: int = 3, pinned: bool = True,
                       copy_bytes: int | None = None) -> float:
    """Measured host -> device copy speed, from the device's pinned host memory where it has one
    (and `pinned`), else from ordinary (pageable) host memory: `nbytes` in one copy, or in copies
    of `copy_bytes` one after another (as an expert cache uploads one expert's projection at a
    time: a copy's fixed cost, and on some links a size-dependent speed, show there)."""
    src_buft = (dev.host_buffer_type if pinned else None) or cpu_device().buffer_type
    src = _buft_alloc_buffer(src_buft, nbytes)
    if not src:
        raise UserError(f"could not allocate {nbytes} bytes of host memory to measure uploads to {dev.name}")
    step = min(copy_bytes or nbytes, nbytes)
    offsets = range(0, nbytes - step + 1, step)

    def copy() -> None:
        base = _buffer_base(src)
        for offset in offsets:
            _tensor_set(tensor, base + offset, offset, step)

    try:
        with _device_tensor(dev, nbytes) as tensor:
            return len(offsets) * step / _typical_time(repeats, copy)
    finally:
        _buffer_free(src)


@contextmanager
def _backend(dev: Device, n_threads: int | None) -> Iterator[int]:
    backend = _dev_init(dev.handle, None)
    if not backend:
        raise UserError(f"could not start a {dev.name} backend to measure it")
    try:
        if dev.type == "cpu" and n_threads:
            _cpu_set_n_threads(backend, n_threads)
        yield backend
    finally:
        _backend_free(backend)


def _timed_graph(dev: Device, n_threads: int | None, build, repeats: int, prepare=None, min_seconds: float = 0.0) -> float:
    """Median time of computing the graph `build(ctx, weights_ctx)` returns the output of, or the
    outputs (tensors made in `weights_ctx` are weights, zeroed), and reading 4 bytes of the last
    output back: the read waits for backends that compute asynchronously (ggml-rpc, CUDA). The
    CPU's weights are in the layout llama.cpp gives them (repacked, for the types that have one).
    `prepare(i)` runs before the i-th computation (0: the warm-up), untimed (to set inputs that
    must not be zero, or that change between runs). Runs go on past `repeats` until they have
    taken `min_seconds`."""
    out = ctypes.create_string_buffer(4)
    weight_buft = cpu_weight_buffer_type() if dev.type == "cpu" else dev.buffer_type
    with _backend(dev, n_threads) as backend, _metadata_context(GRAPH_TENSORS) as ctx, _metadata_context(3) as wctx:
        outputs = build(ctx, wctx)
        outputs = outputs if isinstance(outputs, list) else [outputs]
        graph = _new_graph(ctx)
        for output in outputs:
            _build_forward_expand(graph, output)
        result = outputs[-1]
        bufs = [_alloc_ctx_tensors(c, buft) for c, buft in ((ctx, dev.buffer_type), (wctx, weight_buft))]
        try:
            if not bufs[0] or (_first_tensor(wctx) and not bufs[1]):  # a context without tensors gets no buffer
                raise UserError(f"could not allocate test tensors on {dev.name} to measure it; free some of its memory")
            for buf in bufs:
                if buf:
                    _buffer_clear(buf, 0)  # zero blocks are valid in every format

            def run() -> None:
                _graph_compute(backend, graph)
                _tensor_get(result, out, 0, 4)

            return _typical_time(repeats, run, prepare, min_seconds)
        finally:
            for buf in bufs:
                if buf:
                    _buffer_free(buf)


MAX_CHAIN = 64  # ops in the longest graph `op_seconds` times
# Independent Gated DeltaNet states updated in one timed decode graph: 32 MiB at Qwen3.6's widths,
# as many as half of its linear-attention blocks hold; enough work that a slow round trip to the
# device (ggml-rpc on a busy machine) does not pass for a slow update.
RECURRENT_STATES = 16
EXPERT_OPS = 16  # decode's expert ops timed in one graph
PROMPT_EXPERT_REPEATS = 9  # a prompt's expert FFN runs alone in its graph: more runs to take the median of
# How long a decode figure's runs take at least: a few milliseconds' runs fall in one state of a
# machine whose speed drifts (on a shared host); a tenth of a second holds tens of them.
DECODE_SAMPLE_SECONDS = 0.1
# Tensor slots of a timed graph's context (metadata only): the largest graphs are op_seconds's
# MAX_CHAIN additions and RECURRENT_STATES updates of seven tensors each.
GRAPH_TENSORS = 512


def matmul_seconds(dev: Device, ggml_type: int, n_embd: int, rows: int, batch: int = 1, n_threads: int | None = None,
                   repeats: int = 5, min_seconds: float = 0.0) -> float:
    """Median time of `dev` multiplying a [n_embd, rows] weight of `ggml_type` by `batch` activation
    vectors (1: what decode does, more: prompt processing), one graph computed and synchronised."""
    return _timed_graph(dev, n_threads, lambda ctx, wctx: _mul_mat(ctx, _new_tensor_2d(wctx, ggml_type, n_embd, rows),
                                                                   _new_tensor_2d(ctx, _GGML_TYPE_F32, n_embd, batch)),
                        repeats, min_seconds=min_seconds)


def expert_bytes_per_s(dev: Device, ggml_type: int, n_embd: int, n_ff: int, n_used: int, n_threads: int | None = None,
                       nbytes: int = 64 * 2**20) -> float:
    """Expert weight bytes per second `dev` reads in the op a MoE block runs its experts with at
    decode (MUL_MAT_ID): one token selecting `n_used` distinct experts of [n_embd, n_ff] from
    enough to fill `nbytes`, other experts every run (as a model's tokens pick them, so none is
    still in a cache). EXPERT_OPS such ops run in one graph, as a model's blocks do, so that one
    run reads tens of MiB rather than a few, and a timer's or scheduler's hiccup is not taken for
    the memory's speed."""
    expert = _row_size(ggml_type, n_embd) * n_ff
    n_expert = max(n_used * EXPERT_OPS, nbytes // expert)
    ids: list[int] = []

    def build(ctx, wctx):
        weights = _new_tensor_3d(wctx, ggml_type, n_embd, n_ff, n_expert)
        outputs = []
        for _ in range(EXPERT_OPS):
            ids.append(_new_tensor_2d(ctx, _GGML_TYPE_I32, n_used, 1))
            outputs.append(_mul_mat_id(ctx, weights, _new_tensor_3d(ctx, _GGML_TYPE_F32, n_embd, 1, 1), ids[-1]))
        return outputs

    seconds = _timed_graph(dev, n_threads, build, 5, _selecting(ids, n_used, 1, n_used, n_expert),
                           DECODE_SAMPLE_SECONDS)
    return EXPERT_OPS * n_used * expert / max(seconds - graph_seconds(dev, n_threads), seconds / 2)


def prompt_ffn_bytes_per_s(dev: Device, ggml_types: tuple[int, int, int], n_embd: int, n_ff: int, n_used: int,
                           n_threads: int | None = None, nbytes: int = 64 * 2**20, batch: int = 64,
                           tokens_per_expert: int = 1) -> float:
    """Expert weight bytes per second of a prompt's whole expert FFN as llama.cpp's MoE block runs
    it, counted once per token that uses them: the gate and up projections (MUL_MAT_ID, [n_embd,
    n_ff] per expert), their SwiGLU, the down projection ([n_ff, n_embd]), the weighting of each
    output by the router and the sum of a token's outputs; the projections of `ggml_types` (gate,
    up, down). `batch` tokens each select `n_used` distinct experts, each selected expert shared by
    `tokens_per_expert` of the tokens, from enough experts to fill `nbytes` per projection, other
    experts every run. The down projection's short rows and the work per token-expert pair
    (weighting, sum) cost a prompt more per byte than the gate's shape alone shows."""
    gate, up, down = ggml_types
    expert = sum(_row_size(t, n_embd) * n_ff for t in ggml_types)  # bytes of one expert, all three projections
    pool = max(n_used, n_used * batch // tokens_per_expert)  # the experts the batch selects
    n_expert = max(pool, 3 * nbytes // expert)
    ids: list[int] = []
    row = 4 * n_embd  # an f32 output row

    def build(ctx, wctx):
        gate_w, up_w = (_new_tensor_3d(wctx, t, n_embd, n_ff, n_expert) for t in (gate, up))
        down_w = _new_tensor_3d(wctx, down, n_ff, n_embd, n_expert)
        ids.append(_new_tensor_2d(ctx, _GGML_TYPE_I32, n_used, batch))
        x = _new_tensor_3d(ctx, _GGML_TYPE_F32, n_embd, 1, batch)
        hidden = _swiglu_split(ctx, _mul_mat_id(ctx, gate_w, x, ids[0]), _mul_mat_id(ctx, up_w, x, ids[0]))
        outputs = _mul(ctx, _mul_mat_id(ctx, down_w, hidden, ids[0]), _new_tensor_3d(ctx, _GGML_TYPE_F32, 1, n_used, batch))
        total = _view_2d(ctx, outputs, n_embd, batch, row * n_used, 0)
        for k in range(1, n_used):
            total = _add(ctx, total, _view_2d(ctx, outputs, n_embd, batch, row * n_used, k * row))
        return total

    seconds = _timed_graph(dev, n_threads, build, PROMPT_EXPERT_REPEATS, _selecting(ids, n_used, batch, pool, n_expert))
    return n_used * batch * expert / max(seconds - graph_seconds(dev, n_threads), seconds / 2)


def _selecting(ids: list[int], n_used: int, batch: int, pool: int, n_expert: int):
    """A `prepare` for `_timed_graph` that sets each expert-id tensor in `ids` (made by the graph's
    build) to `batch` tokens' selections of `n_used` distinct experts among the next `pool` of
    `n_expert`, wrapping: other experts every run and op."""

    def prepare(run: int) -> None:
        for op, tensor in enumerate(ids):
            first = (run * len(ids) + op) * pool
            chosen = (ctypes.c_int32 * (n_used * batch))(*((first + k % pool) % n_expert for k in range(n_used * batch)))
            _tensor_set(tensor, chosen, 0, ctypes.sizeof(chosen))

    return prepare


def recurrent_bytes_per_s(dev: Device, n_threads: int | None = None, state_size: int = 128, n_v_heads: int = 32,
                          n_k_heads: int = 16, tokens: int = 1) -> float:
    """Recurrent-state bytes per second and token `dev` updates in a Gated DeltaNet block's fused
    op (GATED_DELTA_NET), at Qwen3.6's widths by default: every linear-attention block reads and
    rewrites a [state_size, state_size] f32 state per value head each token. At decode
    (`tokens` 1) RECURRENT_STATES blocks' states are updated in one graph, as a model's blocks
    are; with `tokens` > 1 (a prompt's batch) one op carries its state from token to token itself,
    in the CPU's caches or the GPU's registers, and reads and writes it whole only once."""
    states = RECURRENT_STATES if tokens == 1 else 1

    def build(ctx, _weights_ctx):
        def new(*shape):
            return _new_tensor_3d(ctx, _GGML_TYPE_F32, *shape)

        return [_gated_delta_net(ctx, new(state_size, n_k_heads, tokens), new(state_size, n_k_heads, tokens),
                                 new(state_size, n_v_heads, tokens), new(1, n_v_heads, tokens), new(1, n_v_heads, tokens),
                                 new(state_size, state_size, n_v_heads), 1) for _ in range(states)]

    seconds = _timed_graph(dev, n_threads, build, 10)
    state = 4 * state_size * state_size * n_v_heads
    return states * state * tokens / max(seconds - graph_seconds(dev, n_threads), seconds / 2)


def op_seconds(dev: Device, n_threads: int | None = None) -> float:
    """What one more small op in a graph costs on `dev` (the thread barrier between ops on the
    CPU, a kernel launch on a GPU): a chain of MAX_CHAIN additions against a single one."""

    def chain(n: int):
        def build(ctx, _weights_ctx):
            x = _new_tensor_2d(ctx, _GGML_TYPE_F32, 64, 1)
            y = x
            for _ in range(n):
                y = _add(ctx, y, x)
            return y
        return build

    one = _timed_graph(dev, n_threads, chain(1), 20)
    many = _timed_graph(dev, n_threads, chain(MAX_CHAIN), 20)
    return max(many - one, 0.0) / (MAX_CHAIN - 1)


def matvec_bytes_per_s(dev: Device, ggml_type: int, n_embd: int, n_threads: int | None = None,
                       nbytes: int = 64 * 2**20, batch: int = 1) -> float:
    """Weight bytes per second `dev` reads multiplying a large weight of `ggml_type` by `batch`
    vectors: decode's speed at batch 1. The fixed cost of one graph (`graph_seconds`) is taken
    out, so the figure scales with the bytes a token reads."""
    row = _row_size(ggml_type, n_embd)
    rows = max(1, nbytes // row)
    seconds = matmul_seconds(dev, ggml_type, n_embd, rows, batch, n_threads,
                             min_seconds=DECODE_SAMPLE_SECONDS if batch == 1 else 0.0)
    return rows * row / max(seconds - graph_seconds(dev, n_threads), seconds / 2)


def cpu_matvec_bytes_per_s(ggml_type: int, n_embd: int, n_threads: int, nbytes: int = 64 * 2**20, repeats: int = 5) -> float:
    """Measured speed of the CPU backend multiplying a weight matrix of `ggml_type` (an expert
    tensor's type) by one activation vector, in weight bytes per second: what decode does with
    host experts in cpu mode."""
    row = _row_size(ggml_type, n_embd)
    rows = max(1, nbytes // row)
    return rows * row / matmul_seconds(cpu_device(), ggml_type, n_embd, rows, 1, n_threads, repeats)


def copy_seconds(dev: Device, nbytes: int = 16 * 1024, repeats: int = 20) -> float:
    """The cost of one small host -> device copy (an activation crossing between devices)."""
    src = bytes(nbytes)
    with _device_tensor(dev, nbytes) as tensor:
        return _typical_time(repeats, lambda: _tensor_set(tensor, src, 0, nbytes))


def graph_seconds(dev: Device, n_threads: int | None = None) -> float:
    """The fixed cost of computing one small graph on `dev` and waiting for its output: a kernel
    launch and sync on a GPU, a round trip on ggml-rpc, thread wake-up on the CPU."""
    return matmul_seconds(dev, _GGML_TYPE_F32, 32, 32, 1, n_threads, repeats=20)


def measure_link(accelerator: Accelerator, expert_type: int, n_embd: int, n_threads: int) -> LinkFigures:
    """The speeds `plan.choose_mode` compares, measured on this machine."""
    return LinkFigures(
        upload_bytes_per_s=upload_bytes_per_s(device_by_name(accelerator.name)),
        cpu_expert_bytes_per_s=cpu_matvec_bytes_per_s(expert_type, n_embd, n_threads),
    )


def _typical_time(repeats: int, fn, prepare=None, min_seconds: float = 0.0) -> float:
    """The median time of `repeats` calls after a warm-up, or of as many more as take
    `min_seconds`: what a run of many tokens sees on a machine that is busy now and then (bench
    reports medians too), where the best call would be a lucky one. `prepare(i)` runs, untimed,
    before call i (0: the warm-up)."""
    if prepare is not None:
        prepare(0)
    fn()  # warm up
    times: list[float] = []
    i = 0
    while i < repeats or sum(times) < min_seconds:
        i += 1
        if prepare is not None:
            prepare(i)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return max(statistics.median(times), 1e-9)
