"""The `rotary-gguf` command line: thin front ends over the stages of the data flow."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import __version__, log
from .errors import UserError
from .units import human_bytes

app = typer.Typer(
    name="rotary-gguf",
    help="Run big Mixture-of-Experts GGUF models on a small GPU: experts in host RAM, the rest on the GPU.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(highlight=False)

ModelArg = Annotated[Path, typer.Argument(help="A GGUF model file.", show_default=False)]
OptionalModelArg = Annotated[
    Optional[Path], typer.Argument(help="A GGUF model file (default: the built-in demo model).", show_default=False)
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]
RpcOpt = Annotated[
    Optional[str],
    typer.Option("--rpc", metavar="HOST:PORT", help="Use a ggml-rpc server (see `rpc-device`) as the accelerator."),
]
ModeOpt = Annotated[
    str,
    typer.Option(
        "--mode",
        help="Host experts: 'cpu' computes them on the CPU, 'rotary' streams each token's experts to the GPU, "
        "'auto' measures and picks the faster.",
    ),
]
VramOpt = Annotated[
    Optional[str],
    typer.Option(help="Accelerator memory to fill, e.g. 8GiB (default: what the GPU reports free).", show_default=False),
]
ThreadsOpt = Annotated[int, typer.Option(min=0, help="CPU threads (0: all cores).")]
CacheOpt = Annotated[
    str,
    typer.Option(
        "--expert-cache",
        metavar="auto|off|SLOTS",
        help="Keep often used host experts in GPU slots (per host expert block): 'auto' lets the planner weigh slot "
        "counts against resident blocks (with --cache-misses upload: fills the VRAM left after the plan), 'off' "
        "turns the cache off, a number sets the slots per block.",
    ),
]


ProfileOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--profile",
        help="A routing profile of this model (from `profile`): the planner takes split compute's hit rates from "
        "it instead of published figures.",
        show_default=False,
    ),
]
MissesOpt = Annotated[
    str,
    typer.Option(
        "--cache-misses",
        metavar="split|upload",
        help="What a host expert missing from the cache does: 'split' runs it on the CPU while the GPU runs the "
        "cached ones (uploads happen between tokens, a few MB per token), 'upload' copies it to a slot before the "
        "block runs (for fast links).",
    ),
]


def misses_setting(value: str) -> str:
    """--cache-misses as the planner takes it."""
    from .plan import CACHE_MISSES

    if value not in CACHE_MISSES:
        raise UserError(f"--cache-misses takes split or upload, not {value!r}")
    return value


def cache_setting(value: str) -> str | int:
    """--expert-cache as the planner takes it: "auto", "off" or a slot count."""
    from .plan import EXPERT_CACHE_SETTINGS

    value = value.strip().lower()
    if value in EXPERT_CACHE_SETTINGS:
        return value
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise UserError(f"--expert-cache takes auto, off or a number of slots per block, not {value!r}")


def _version(value: bool) -> None:
    if value:
        out.print(f"rotary-gguf {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also show llama.cpp's own log lines.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Run big Mixture-of-Experts GGUF models on a small GPU: experts in host RAM, the rest on the GPU."""
    log.setup(verbose)


@app.command()
def inspect(model: OptionalModelArg = None, as_json: JsonOpt = False) -> None:
    """Show a GGUF model's architecture, experts and where its bytes are (reads only the header)."""
    from .catalog import match
    from .demo import resolve_model
    from .inventory import read_inventory

    inv = read_inventory(resolve_model(model))
    summary = inspect_summary(inv, match(inv))
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    _print_inspect(summary)


def inspect_summary(inv, catalog_matches: list[str]) -> dict:
    """The figures `inspect` shows, as one JSON-ready dict."""
    attention = inv.attention_layout()
    expert_per_layer, other_per_layer = inv.layer_expert_bytes(), inv.layer_other_bytes()
    summary = {
        "file": str(inv.path),
        "arch": inv.arch,
        "n_layer": inv.n_layer,
        "n_expert": inv.n_expert,
        "n_expert_used": inv.n_expert_used,
        "n_embd": inv.n_embd,
        "n_ff_exp": inv.n_ff_exp,
        "n_ff_shexp": inv.n_ff_shexp,
        "shared_expert": inv.has_shared_expert,
        "fused_gate_up": inv.fused_gate_up,
        "attention": {
            "full": attention.count("full"),
            "linear": attention.count("linear"),
            "layers": attention,
        },
        "tensor_count": len(inv.tensors),
        "tensor_types": inv.tensor_types(),
        "expert_tensor_types": sorted({t.type_name for t in inv.expert_tensors}),
        "file_bytes": inv.file_bytes,
        "bytes": {"experts": inv.expert_bytes, "other": inv.other_bytes},
        "layers": [
            {"index": i, "experts": expert_per_layer.get(i, 0), "other": other_per_layer.get(i, 0)}
            for i in range(inv.n_layer)
        ],
        "layout": inv.layout,
        "catalog": catalog_matches,
    }
    if not inv.is_moe:
        summary["n_expert"] = 0
        summary["note"] = "not a Mixture-of-Experts model: it has no routed-expert tensors, so there is nothing to rotate"
    return summary


def _print_inspect(s: dict) -> None:
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("file", s["file"])
    head.add_row("architecture", s["arch"] + (f"  (matches {', '.join(s['catalog'])})" if s["catalog"] else ""))
    head.add_row("blocks", str(s["n_layer"]))
    if s["n_expert"]:
        head.add_row("experts", f"{s['n_expert']} routed, {s['n_expert_used']} used per token")
        head.add_row("expert FFN", str(s["n_ff_exp"]) + (f", shared expert FFN {s['n_ff_shexp']}" if s["shared_expert"] else ""))
        head.add_row("gate+up", "fused" if s["fused_gate_up"] else "separate")
    head.add_row("n_embd", str(s["n_embd"]))
    att = s["attention"]
    head.add_row("attention", f"{att['full']} full" + (f", {att['linear']} linear (recurrent)" if att["linear"] else ""))
    head.add_row("tensors", f"{s['tensor_count']}: " + ", ".join(f"{n} {t}" for t, n in s["tensor_types"].items()))
    total = s["file_bytes"]
    head.add_row("file size", human_bytes(total))
    if s["n_expert"]:
        e, o = s["bytes"]["experts"], s["bytes"]["other"]
        head.add_row("routed experts", f"{human_bytes(e)} ({100 * e / total:.1f}%), types {', '.join(s['expert_tensor_types'])}")
        head.add_row("everything else", f"{human_bytes(o)} ({100 * o / total:.1f}%)")
    head.add_row("layout", s["layout"])
    out.print(head)
    if "note" in s:
        out.print(f"[yellow]note:[/] {s['note']}")
        return
    table = Table(title="bytes per block", title_justify="left", box=None, pad_edge=False)
    for col in ("block", "attention", "experts", "other"):
        table.add_column(col, justify="right" if col != "attention" else "left")
    for layer in s["layers"]:
        table.add_row(str(layer["index"]), att["layers"][layer["index"]], human_bytes(layer["experts"]), human_bytes(layer["other"]))
    out.print(table)


@app.command()
def devices(rpc: RpcOpt = None, as_json: JsonOpt = False) -> None:
    """List the devices llama.cpp sees (CPU, GPUs, and an RPC device with --rpc)."""
    from . import native

    if rpc:
        native.add_rpc_device(rpc)
    devs = native.devices()
    if as_json:
        print(json.dumps([{k: getattr(d, k) for k in ("name", "description", "type", "free", "total")} for d in devs], indent=2))
        return
    table = Table(box=None, pad_edge=False)
    for col in ("name", "type", "description", "free", "total"):
        table.add_column(col)
    for d in devs:
        table.add_row(d.name, d.type, d.description, human_bytes(d.free), human_bytes(d.total))
    out.print(table)


@app.command()
def doctor(
    model: OptionalModelArg = None,
    brief: Annotated[bool, typer.Option("--brief", help="Only the smoke test's one line (what setup prints).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Check this installation: llama-cpp-python's version, the backends built, the CPU's features and
    those the CPU backend was built for, the extra CPU buffer types in use, and a decode smoke test
    in a child process (a crash of llama.cpp there becomes one line naming the cause and the fix)."""
    from .doctor import SmokeTestFailed, report, smoke_test
    from .inventory import read_inventory

    if model is not None:
        read_inventory(model)  # a missing or broken file is one line here, not in the child
    if brief:
        smoke = smoke_test(model)
        if not smoke.ok:
            raise SmokeTestFailed(smoke.message)
        out.print(f"smoke test: {smoke.message}")
        return
    r = report(model)
    if as_json:
        print(json.dumps(r.as_dict(), indent=2))
    else:
        _print_doctor(r)
    if not r.smoke.ok:
        raise SmokeTestFailed(r.smoke.message)


def _print_doctor(r) -> None:
    table = Table(box=None, pad_edge=False, show_header=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    used = [b for b in r.extra_buffer_types if b not in r.refused_buffer_types]
    rows = [
        ("rotary-gguf", r.rotary_gguf),
        ("llama-cpp-python", f"{r.llama_cpp_python} ({r.library_dir})"),
        ("backends built", ", ".join(r.backends_built)),
        ("devices", "\n".join(r.devices)),
        ("CPU", f"{r.cpu}: {' '.join(r.cpu_flags) or 'no flags known'}"),
        ("CPU backend built for", " ".join(r.cpu_backend_features)),
        ("extra CPU buffer types", ", ".join(used) or "none"),
    ]
    if r.refused_buffer_types:
        rows.append(("refused", f"{', '.join(r.refused_buffer_types)}: crashes in this llama.cpp; weights load "
                     "without extra buffer types (rebuild with scripts/setup.sh to keep the repacked kernels)"))
    smoke = r.smoke
    for key, value in rows:
        table.add_row(key, Text(value))
    table.add_row("decode smoke test", Text.assemble(("ok", "green"), f": {smoke.message}") if smoke.ok else Text("failed", "red"))
    out.print(table)


@app.command("rpc-device")
def rpc_device(
    host: Annotated[str, typer.Option(help="Address to listen on. Anything but loopback exposes your CPU and RAM to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port to listen on.")] = 50052,
    threads: Annotated[int, typer.Option(help="CPU threads the device computes with.")] = 0,
) -> None:
    """Serve this machine's CPU as a ggml-rpc device: a simulated accelerator for testing placement."""
    import os

    from . import native

    endpoint = f"{host}:{port}"
    native.parse_endpoint(endpoint)
    log.logger.info("serving the CPU as a ggml-rpc device on %s (Ctrl-C to stop)", endpoint)
    native.serve_rpc(endpoint, threads or max(1, (os.cpu_count() or 2) // 2))


@app.command()
def generate(
    model: OptionalModelArg = None,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue.")] = "Once upon a time",
    tokens: Annotated[int, typer.Option("--tokens", "-n", min=1, help="How many tokens to generate.")] = 32,
    ctx: Annotated[int, typer.Option(min=16, help="Context length.")] = 2048,
) -> None:
    """Greedily continue a prompt and print the text with prompt and decode speed."""
    from .demo import resolve_model
    from .engine import Engine

    with Engine.load(resolve_model(model), n_ctx=ctx) as engine:
        out.print(f"[bold]{prompt}[/]", end="")
        stats = None
        for event in engine.generate(engine.tokenize(prompt), max_tokens=tokens):
            out.print(event.text, end="", markup=False)
            stats = event.stats
        out.print()
        if stats:
            out.print(
                f"[dim]{stats.prompt_tokens} prompt tokens at {stats.prompt_tps:.1f} t/s, "
                f"{stats.completion_tokens} generated at {stats.decode_tps:.1f} t/s[/]"
            )


@app.command()
def serve(
    model: OptionalModelArg = None,
    vram: VramOpt = None,
    mode: ModeOpt = "auto",
    ctx: Annotated[int, typer.Option(min=16, help="Context length in tokens (prompt plus reply).")] = 4096,
    host: Annotated[str, typer.Option(help="Address to listen on. Anything but loopback exposes the API to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port to listen on.")] = 8080,
    api_key: Annotated[
        Optional[str],
        typer.Option(envvar="ROTARY_GGUF_API_KEY", help="Require 'Authorization: Bearer KEY' on every request but /health."),
    ] = None,
    rpc: RpcOpt = None,
    expert_cache: CacheOpt = "auto",
    cache_misses: MissesOpt = "split",
    routing_profile: ProfileOpt = None,
    max_queue: Annotated[int, typer.Option(min=1, help="Requests that may wait for the engine; more get 503.")] = 64,
    threads: Annotated[int, typer.Option(min=0, help="CPU threads (0: all cores).")] = 0,
    dashboard: Annotated[
        bool, typer.Option("--dashboard", help="Show the live dashboard (memory, speed, requests, routing) while serving.")
    ] = False,
    thinking_budget: Annotated[
        Optional[int],
        typer.Option(min=0, help="Tokens a reply may think before its think block is closed, for requests that set no budget."),
    ] = None,
    checkpoint_memory: Annotated[
        str, typer.Option(help="Host memory for a hybrid model's prompt checkpoints (recurrent state at turn starts).")
    ] = "512MiB",
    read_timeout: Annotated[
        float,
        typer.Option(min=0.1, max=3600, help="Seconds a client has to send a request's headers, and again its body; slower connections are closed."),
    ] = 10.0,
) -> None:
    """Serve a model through an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /metrics)
    and the Anthropic Messages API (/v1/messages)."""
    from . import serve as serving
    from .demo import resolve_model
    from .engine import Engine
    from .experts.cache import ExpertCache
    from .inventory import read_inventory
    from .plan import DEFAULT_BATCH

    from .units import parse_size

    path = resolve_model(model)
    inv = read_inventory(path)
    cache = cache_setting(expert_cache)
    checkpoint_bytes = parse_size(checkpoint_memory)
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.logger.warning("listening on %s without --api-key: anyone who can reach it can use the model", host)
    sock = serving.listen(host, port)
    the_plan = plan_or_cpu(path, vram=vram, mode=mode, ctx=ctx, n_batch=DEFAULT_BATCH, rpc=rpc, expert_cache=cache,
                           cache_misses=cache_misses, routing_profile=routing_profile)
    placement = the_plan.placement if the_plan else None
    telemetry = _dashboard_telemetry(inv) if dashboard else None
    with Engine.load(path, placement, n_ctx=ctx, n_threads=threads or None, telemetry=telemetry,
                     expert_cache=ExpertCache.for_plan(the_plan, inv, n_threads=threads),
                     checkpoint_bytes=checkpoint_bytes) as engine:
        options = serving.ServeOptions(model_id=path.name.removesuffix(".gguf"), max_queue=max_queue, api_key=api_key,
                                       thinking_budget=thinking_budget, read_timeout=read_timeout)
        if not dashboard:
            serving.run(engine, options, sock)
            return
        from .dashboard import Dashboard

        title = f"{path.name} at http://{host}:{sock.getsockname()[1]}/v1"
        with Dashboard(engine, telemetry=telemetry, plan=the_plan, serving=True, title=title).live(log.stderr):
            serving.run(engine, options, sock)


def _dashboard_telemetry(inv):
    """Routing telemetry for a MoE model's dashboard; None for a dense model, or (with a warning)
    where its native callback cannot be built."""
    from .telemetry import RoutingTelemetry

    if not inv.is_moe:
        return None
    try:
        return RoutingTelemetry(inv)
    except UserError as e:
        log.logger.warning("no routing heat map: %s", e)
        return None




def plan_for(model: Path, *, vram: Optional[str], ctx: int, n_batch: int, mode: str, rpc: Optional[str],
             expert_cache: str | int = "off", cache_misses: str = "split", routing_profile: Optional[Path] = None):
    """The plan for `model` on this machine's accelerator (or the RPC device at `rpc`, or a GPU
    this machine lacks, sized by `vram`), with the expert cache `expert_cache` ("auto", "off" or
    slots per block). Decides the host-expert mode before loading anything."""
    import os

    from . import native
    from .inventory import read_inventory
    from .plan import HOST_MODES, ROTARY_OFFLOAD_MIN_BATCH, Accelerator, ModelFigures, choose_mode, make_plan
    from .units import parse_size

    if mode not in (*HOST_MODES, "auto"):
        raise UserError(f"unknown --mode {mode!r}: use auto, cpu or rotary")
    misses_setting(cache_misses)
    inv = read_inventory(model)
    figures = ModelFigures.from_inventory(inv)
    hit_rates = None
    if routing_profile is not None:
        from .plan import HitRates
        from .profile_io import load_profile

        hit_rates = HitRates.from_profile(load_profile(routing_profile, inv))
    if mode == "rotary":
        native.set_offload_min_batch(ROTARY_OFFLOAD_MIN_BATCH)  # read once, when the GPU backend loads
    accelerator = native.find_accelerator(rpc)
    notes: list[str] = []
    if vram is not None:
        budget, source = parse_size(vram), "--vram"
    elif accelerator is None:
        raise UserError("no GPU here and no --rpc: pass --vram SIZE to plan for a GPU with that much free memory")
    else:
        budget, source = accelerator.free_bytes, f"free memory {accelerator.name} reports"
        if not accelerator.streams_host_ops:
            notes.append(f"{accelerator.name} reports the RPC server's free RAM; pass --vram to simulate a smaller GPU")
    if accelerator is None:
        accelerator = Accelerator.planned_cuda()
        notes.append(f"no GPU on this machine: planning for a CUDA GPU with {human_bytes(budget)} free")
    elif accelerator.free_bytes is not None and budget > accelerator.free_bytes:
        notes.append(f"the budget is more than the {human_bytes(accelerator.free_bytes)} {accelerator.name} reports free")
    options = dict(budget_source=source, ctx=ctx, n_batch=n_batch, notes=tuple(notes))
    link = None
    if mode == "auto" and accelerator.present and accelerator.streams_host_ops:
        cpu_plan = make_plan(figures, accelerator, budget, mode="cpu", **options)
        if cpu_plan.host_layers:
            expert_type = next(t.ggml_type for t in inv.expert_tensors if t.layer == cpu_plan.host_layers[0])
            link = native.measure_link(accelerator, expert_type, inv.n_embd, os.cpu_count() or 1)
        chosen, reason = choose_mode(mode, accelerator, cpu_plan, link)
    else:
        chosen, reason = choose_mode(mode, accelerator)
    return make_plan(figures, accelerator, budget, mode=chosen, mode_reason=reason, expert_cache=expert_cache,
                     cache_misses=cache_misses, cpu_expert_bytes_per_s=link.cpu_expert_bytes_per_s if link else None,
                     upload_bytes_per_s=link.upload_bytes_per_s if link else None, hit_rates=hit_rates, **options)


@app.command()
def plan(
    model: ModelArg,
    vram: Annotated[
        Optional[str],
        typer.Option(help="Accelerator memory to fill, e.g. 8GiB (default: what the GPU reports free).", show_default=False),
    ] = None,
    ctx: Annotated[int, typer.Option(min=1, help="Context length in tokens.")] = 4096,
    batch: Annotated[int, typer.Option(min=1, help="Batch size for prompt processing (sizes the compute buffers).")] = 512,
    mode: ModeOpt = "auto",
    rpc: RpcOpt = None,
    expert_cache: CacheOpt = "auto",
    cache_misses: MissesOpt = "split",
    routing_profile: ProfileOpt = None,
    check: Annotated[
        bool, typer.Option("--check", help="Also load the model with the plan and show what llama.cpp allocated.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Decide where every tensor lives for a VRAM budget, and predict each device's memory."""
    the_plan = plan_for(model, vram=vram, ctx=ctx, n_batch=batch, mode=mode, rpc=rpc, expert_cache=cache_setting(expert_cache),
                        cache_misses=cache_misses, routing_profile=routing_profile)
    rows = _check_plan(model, the_plan) if check else None
    if as_json:
        summary = the_plan.to_json()
        if rows is not None:
            summary["check"] = [{"device": d, "purpose": p, "predicted": pr, "actual": a} for d, p, pr, a in rows]
        print(json.dumps(summary, indent=2))
        return
    _print_plan(the_plan)
    if rows is not None:
        _print_check(rows, the_plan)


def _check_plan(model: Path, the_plan) -> list[tuple[str, str, int, int]]:
    """Load `model` with the plan (and its expert cache); (device, purpose, predicted, actual) for
    each buffer kind."""
    from .engine import Engine
    from .experts.cache import ExpertCache
    from .inventory import read_inventory

    if not the_plan.accelerator.present:
        raise UserError(f"--check loads the model, and {the_plan.accelerator.name} is not on this machine")
    cache = ExpertCache.for_plan(the_plan, read_inventory(model))
    with Engine.load(model, the_plan.placement, n_ctx=the_plan.ctx, n_batch=the_plan.n_batch, expert_cache=cache) as engine:
        rows = the_plan.compare(engine.load_report)
        if cache is not None:
            rows.append(("accelerator", "expert_cache", the_plan.accelerator_use.expert_cache, cache.slot_bytes))
        return rows


def _print_plan(p) -> None:
    from .plan import DeviceUse

    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    acc = p.accelerator
    head.add_row("model", f"{p.model.name} ({p.model.arch}, {p.model.n_layer} blocks)")
    head.add_row("accelerator", f"{acc.name} ({acc.kind}), buffer type {acc.buffer_type}")
    head.add_row("budget", f"{human_bytes(p.budget)} ({p.budget_source})")
    head.add_row("host experts", f"{p.mode}: {p.mode_reason}")
    head.add_row("context", f"{p.ctx} tokens, batch {p.n_batch}, KV cache {p.kv_type}")
    cache = p.expert_cache
    if cache and cache.split:
        line = (f"{cache.slots} slots per host block + a zero slot ({human_bytes(cache.bytes)}), split compute: misses "
                f"run on the CPU meanwhile, up to {human_bytes(cache.upload_budget)} uploaded between tokens; {cache.reason}")
    elif cache:
        line = f"{cache.slots} slots per host block ({human_bytes(cache.bytes)}), misses uploaded first: {cache.reason}"
    else:
        line = f"off: {p.expert_cache_reason}"
    head.add_row("expert cache", line)
    out.print(head)

    blocks = Table(title="expert tensors per block", title_justify="left", box=None, pad_edge=False)
    for col, justify in (("block", "right"), ("attention", "left"), ("experts", "right"), ("live in", "left")):
        blocks.add_column(col, justify=justify)
    for i in range(p.model.n_layer):
        where = f"accelerator ({acc.buffer_type})" if i in p.resident else f"host ({p.host_buffer_type})"
        blocks.add_row(str(i), p.model.attention[i], human_bytes(p.model.expert_bytes(i)), where)
    out.print(blocks)

    totals = Table(title="predicted memory (~ = estimate)", title_justify="left", box=None, pad_edge=False)
    for col in ("", "accelerator", "host"):
        totals.add_column(col, justify="right" if col else "left")
    for part, a in p.accelerator_use.parts().items():
        h = getattr(p.host_use, part)
        if a or h:
            mark = "~" if part in DeviceUse.ESTIMATES else ""
            totals.add_row(part.replace("_", " "), *(mark + human_bytes(n) if n else "-" for n in (a, h)))
    totals.add_row("[bold]total[/]", f"[bold]{human_bytes(p.accelerator_use.total)}[/]", f"[bold]{human_bytes(p.host_use.total)}[/]")
    out.print(totals)
    resident = len(p.resident)
    out.print(
        f"accelerator: {human_bytes(p.accelerator_use.total)} of {human_bytes(p.budget)}, margin {human_bytes(p.margin)}; "
        f"{resident} of {resident + len(p.host_layers)} expert blocks resident (minimum budget {human_bytes(p.minimum_budget)})"
    )
    for pattern, buft in p.overrides:
        out.print(f"override: {pattern} -> {buft}", markup=False)
    for note in p.notes:
        out.print(f"[yellow]note:[/] {note}")


def _print_check(rows: list[tuple[str, str, int, int]], the_plan) -> None:
    table = Table(title="predicted vs allocated by llama.cpp", title_justify="left", box=None, pad_edge=False)
    for col in ("device", "purpose", "predicted", "allocated"):
        table.add_column(col, justify="left" if col in ("device", "purpose") else "right")
    for device, purpose, predicted, actual in rows:
        if predicted or actual:
            table.add_row(device, purpose.replace("_", " "), human_bytes(predicted), human_bytes(actual))
    out.print(table)
    if the_plan.placement.use_mmap:
        out.print("[dim]host weights in a mapped buffer count the file span they lie in (paged in on use)[/]")


@app.command()
def convert(
    source: Annotated[Path, typer.Argument(metavar="IN", help="The GGUF model to repack (only read, never changed).", show_default=False)],
    output: Annotated[Path, typer.Argument(metavar="OUT", help="Where to write the repacked model.", show_default=False)],
    profile: Annotated[
        Optional[Path],
        typer.Option(help="Routing profile (JSON): reorder each block's experts so those used together are adjacent."),
    ] = None,
    verify: Annotated[
        bool, typer.Option("--verify", help="Check the new file against the input with llama.cpp before keeping it.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUT if it exists.")] = False,
) -> None:
    """Repack a MoE model for expert streaming: fused gate+up experts, profile-guided expert order, same output."""
    from .arch import LAYOUT_VERSION
    from .convert import convert as run_convert

    result = run_convert(source, output, profile=profile, force=force, verify=verify)
    plan = result.plan
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    seconds = max(result.seconds, 1e-9)
    head.add_row("wrote", f"{result.output} ({human_bytes(result.bytes_written)} in {result.seconds:.1f} s, {human_bytes(result.bytes_written / seconds)}/s)")
    n_moe = len(plan.orders)
    fused_now = len(plan.fused_layers)
    already = sum(1 for t in plan.source.expert_tensors if t.expert_kind == "gate_up")
    head.add_row("gate+up", f"fused in {fused_now + already} of {n_moe} blocks" + (f" ({already} already fused)" if already else ""))
    if profile is not None:
        estimate = ""
        if plan.copies_before is not None:
            estimate = f"; estimated copies per token and expert tensor {plan.copies_before:.2f} -> {plan.copies_after:.2f}"
        head.add_row("expert order", f"{len(plan.reordered_layers)} of {n_moe} blocks reordered by {profile.name}{estimate}")
    head.add_row("layout", f"rotary-v{LAYOUT_VERSION}")
    if result.verification is not None:
        head.add_row("verify", result.verification.summary())
    out.print(head)
    for note in plan.notes:
        out.print(f"[yellow]note:[/] {note}")


@app.command("verify")
def verify_cmd(
    a: Annotated[Path, typer.Argument(metavar="A", help="The reference GGUF model (e.g. the original).", show_default=False)],
    b: Annotated[Path, typer.Argument(metavar="B", help="The GGUF model to check against it (e.g. a converted one).", show_default=False)],
    as_json: JsonOpt = False,
) -> None:
    """Check that two models compute the same: their weights, and llama.cpp's logits and greedy tokens."""
    from .verify import OutputsDiffer, verify_models

    result = verify_models(a, b)
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        head = Table.grid(padding=(0, 2))
        head.add_column(style="bold")
        head.add_column()
        head.add_row("weights", result.weights_difference or ("match after undoing the expert order" if result.orders_differ else "match"))
        head.add_row("logits", f"{result.compared} vectors, {result.differing} differ, max |difference| {result.max_abs_diff:.3g}")
        diverged = result.first_divergence
        head.add_row("greedy tokens", "equal" if diverged is None else f"differ from sequence {diverged[0]} step {diverged[1]}")
        out.print(head)
        if result.passed:
            out.print(result.summary())
    if not result.passed:
        raise OutputsDiffer(result.summary())




def plan_or_cpu(model: Path, *, vram: Optional[str], mode: str, ctx: int, n_batch: int, rpc: Optional[str],
                expert_cache: str | int = "off", cache_misses: str = "split", routing_profile: Optional[Path] = None):
    """The plan for MoE `model` when there is an accelerator to fill (a GPU, or the RPC device at
    `rpc`), else None: everything runs on the CPU (always so for a dense model)."""
    from . import native
    from .inventory import read_inventory

    misses_setting(cache_misses)
    if not read_inventory(model).is_moe:
        return None

    if vram is None and rpc is None and mode != "rotary" and not any(d.is_local_gpu for d in native.devices()):
        return None
    the_plan = plan_for(model, vram=vram, ctx=ctx, n_batch=n_batch, mode=mode, rpc=rpc, expert_cache=expert_cache,
                        cache_misses=cache_misses, routing_profile=routing_profile)
    if not the_plan.accelerator.present:
        raise UserError(f"there is no GPU on this machine to fill with --vram {vram}; use --rpc HOST:PORT for a simulated one")
    return the_plan


@app.command()
def profile(
    model: ModelArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the profile (JSON).", show_default=False)],
    prompts: Annotated[
        Optional[Path],
        typer.Option(help="Prompts to run: a JSON list of strings, or one prompt per line (default: a built-in mix "
                     "of prose, code, math and dialogue).", show_default=False),
    ] = None,
    tokens: Annotated[int, typer.Option("--tokens", "-n", min=1, help="Tokens to generate after each prompt.")] = 128,
    ctx: Annotated[int, typer.Option(min=16, help="Context length: a prompt plus its tokens must fit.")] = 4096,
    vram: VramOpt = None,
    mode: ModeOpt = "auto",
    rpc: RpcOpt = None,
    threads: ThreadsOpt = 0,
) -> None:
    """Record which experts every block selects over a set of prompts: the routing profile `convert --profile` reads."""
    from .engine import Engine
    from .telemetry import BUILTIN_PROMPTS, PROFILE_BATCH, RoutingTelemetry, read_prompts, record_profile, write_profile

    texts = read_prompts(prompts) if prompts is not None else list(BUILTIN_PROMPTS)
    telemetry = RoutingTelemetry.for_model(model, pairs=True)
    the_plan = plan_or_cpu(model, vram=vram, mode=mode, ctx=ctx, n_batch=PROFILE_BATCH, rpc=rpc)
    placement = the_plan.placement if the_plan else None

    def progress(index: int, stats) -> None:
        out.print(f"[dim]prompt {index + 1}/{len(texts)}: {stats.prompt_tokens} + {stats.completion_tokens} tokens, "
                  f"decode {stats.decode_tps:.1f} t/s[/]")

    with Engine.load(model, placement, n_ctx=ctx, n_batch=PROFILE_BATCH, n_threads=threads or None,
                     telemetry=telemetry) as engine:
        doc = record_profile(engine, telemetry, texts, tokens, on_prompt=progress)
    write_profile(doc, output)
    top = 2 * telemetry.n_expert_used
    out.print(f"wrote {output}: {doc['tokens']} tokens over {len(texts)} prompts, {len(doc['layers'])} blocks; "
              f"each block's {top} busiest experts took {telemetry.busiest_share(top):.0%} of its selections "
              f"(uniform routing: {min(1.0, top / telemetry.n_expert):.0%})")


@app.command()
def chat(
    model: OptionalModelArg = None,
    vram: VramOpt = None,
    mode: ModeOpt = "auto",
    ctx: Annotated[int, typer.Option(min=16, help="Context length in tokens (the whole conversation).")] = 4096,
    rpc: RpcOpt = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens one answer may have.")] = 512,
    temperature: Annotated[float, typer.Option(min=0.0, max=2.0, help="Sampling temperature (0: greedy).")] = 0.7,
    system: Annotated[Optional[str], typer.Option(help="A system message to start every conversation with.")] = None,
    routing: Annotated[bool, typer.Option(help="Watch expert routing for the dashboard's heat map.")] = True,
    expert_cache: CacheOpt = "auto",
    cache_misses: MissesOpt = "split",
    routing_profile: ProfileOpt = None,
    threads: ThreadsOpt = 0,
) -> None:
    """Chat with a model in the terminal: streamed answers above a live dashboard of memory, speed and routing."""
    from . import chat as chatting
    from .dashboard import Dashboard
    from .demo import resolve_model
    from .engine import Engine, SamplingParams
    from .experts.cache import ExpertCache
    from .inventory import read_inventory
    from .plan import DEFAULT_BATCH

    path = resolve_model(model)
    inv = read_inventory(path)
    telemetry = _dashboard_telemetry(inv) if routing else None
    the_plan = plan_or_cpu(path, vram=vram, mode=mode, ctx=ctx, n_batch=DEFAULT_BATCH, rpc=rpc,
                           expert_cache=cache_setting(expert_cache), cache_misses=cache_misses,
                           routing_profile=routing_profile)
    placement = the_plan.placement if the_plan else None
    with Engine.load(path, placement, n_ctx=ctx, n_threads=threads or None, telemetry=telemetry,
                     expert_cache=ExpertCache.for_plan(the_plan, inv, n_threads=threads)) as engine:
        dashboard = Dashboard(engine, telemetry=telemetry, plan=the_plan)
        chatting.run(engine, dashboard, out, max_tokens=max_tokens, system=system,
                     sampling=SamplingParams(temperature=temperature, top_p=0.95, seed=None))


@app.command()
def bench(
    model: ModelArg,
    vram: VramOpt = None,
    ctx: Annotated[int, typer.Option(help="Context length in tokens (sizes the KV cache, as when serving).")] = 4096,
    prompt_tokens: Annotated[int, typer.Option(help="Prompt tokens each run evaluates (the same for every candidate).")] = 512,
    gen_tokens: Annotated[int, typer.Option(help="Tokens each run generates, greedily.")] = 128,
    runs: Annotated[int, typer.Option(help="Timed runs per candidate, after one warm-up run each.")] = 3,
    rpc: RpcOpt = None,
    expert_cache: CacheOpt = "auto",
    cache_misses: MissesOpt = "split",
    routing_profile: ProfileOpt = None,
    threads: ThreadsOpt = 0,
    as_json: JsonOpt = False,
) -> None:
    """Measure placements side by side (the plan with and without its expert cache, llama.cpp's
    --cpu-moe and --n-cpu-moe N, all on the accelerator) and recommend one. Needs a GPU or --rpc to compare placements; without one it
    measures the CPU-only run alone and says so."""
    from . import bench as benching
    from .plan import DEFAULT_BATCH, Placement

    for flag, value in (("--runs", runs), ("--gen-tokens", gen_tokens), ("--prompt-tokens", prompt_tokens), ("--ctx", ctx)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, not {value}")
    n_batch = min(DEFAULT_BATCH, ctx)
    cpu_plan = plan_or_cpu(model, vram=vram, mode="cpu", ctx=ctx, n_batch=n_batch, rpc=rpc,
                           expert_cache=cache_setting(expert_cache), cache_misses=cache_misses,
                           routing_profile=routing_profile)
    notes: list[str] = []
    if cpu_plan is None:
        cands = [benching.Candidate("cpu-only", Placement.all_cpu(), "cpu-only", "everything on the CPU")]
        notes.append("only the CPU-only run was measured: no GPU here and no --rpc (or a dense model), so there are no placements to compare")
    else:
        plans = [cpu_plan] if cpu_plan.expert_cache is None else [benching.without_expert_cache(cpu_plan), cpu_plan]
        if cpu_plan.accelerator.streams_host_ops:
            notes.append("rotary mode was not measured: its offload threshold is fixed per process, and cpu mode was set first")
        cands = benching.candidates(plans)

    def progress(run: int, cand, m) -> None:
        if not as_json:
            label = "warm-up" if run == 0 else f"run {run}/{runs}"
            log.logger.info("%s: %s: decode %.1f t/s", label, cand.name, m.decode_tps)

    results = benching.run_bench(model, cands, n_ctx=ctx, n_batch=n_batch, prompt_len=prompt_tokens,
                                 gen_tokens=gen_tokens, runs=runs, n_threads=threads or None, on_run=progress)
    best = benching.recommend(results)
    differ = benching.differing_outputs(results)
    if as_json:
        print(json.dumps({"candidates": [r.to_json() for r in results], "recommended": best.candidate.name,
                          "outputs_identical": not differ, "notes": notes}, indent=2))
    else:
        _print_bench(results, runs)
        base = next((r for r in results if r.candidate.name == benching.BASELINE), None)
        ratio = best.summary("decode_ratio")
        versus = f", {ratio['median']:.2f}x {benching.BASELINE}" if base is not None and ratio else ""
        out.print(f"[bold green]recommended:[/] {best.candidate.name} ({best.candidate.description}): "
                  f"decode {best.summary('decode_tps')['median']:.1f} t/s{versus}")
        for pattern, buft in best.candidate.placement.overrides:
            out.print(f"override: {pattern} -> {buft}", markup=False)
        for note in notes:
            out.print(f"[yellow]note:[/] {note}")
    if differ:
        from .verify import OutputsDiffer

        raise OutputsDiffer(f"BUG: greedy outputs differ from {results[0].candidate.name}'s in: {', '.join(differ)} "
                            "(a placement must not change the output)")


def _print_bench(results, runs: int) -> None:
    table = Table(title=f"median over {runs} run(s), ± spread (max - min) as a share of it", title_justify="left",
                  box=None, pad_edge=False)
    columns = ("candidate", "mode", "prompt t/s", "decode t/s", "vs --cpu-moe", "TTFT ms", "cache hits", "peak accel", "peak RSS")
    for col in columns:
        table.add_column(col, justify="left" if col in ("candidate", "mode") else "right", no_wrap=True)

    def cell(result, figure: str, fmt, spread: bool = True) -> str:
        s = result.summary(figure)
        if s is None:
            return "-"
        share = f" ±{s['spread'] / s['median']:.0%}" if spread and s["median"] else ""
        return fmt(s["median"]) + share

    for r in results:
        table.add_row(
            r.candidate.name, r.candidate.mode,
            cell(r, "prompt_tps", lambda v: f"{v:.1f}"),
            cell(r, "decode_tps", lambda v: f"{v:.1f}"),
            cell(r, "decode_ratio", lambda v: f"{v:.2f}x"),
            cell(r, "ttft_seconds", lambda v: f"{v * 1e3:.1f}"),
            cell(r, "cache_hit_rate", lambda v: f"{v:.1%}", spread=False),
            cell(r, "peak_accelerator_bytes", human_bytes, spread=False),
            cell(r, "peak_rss_bytes", human_bytes, spread=False),
        )
    out.print(table)


def main() -> None:
    """Console-script entry point: user errors and bad command lines become one red line and exit
    code 2."""
    if len(sys.argv) == 1:
        sys.argv.append("--help")  # a bare `rotary-gguf` shows the help
    try:
        code = app(standalone_mode=False)
    except UserError as e:
        log.error(str(e))
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        log.error("interrupted")
        sys.exit(130)
    except typer.TyperException as e:  # a bad command line: typer's usage box, as one line
        ctx = getattr(e, "ctx", None)
        where = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        log.error(" ".join(e.format_message().split()) + where)
        sys.exit(getattr(e, "exit_code", 2))
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
