"""`generate`, `chat` and `serve`: the commands that run a model."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .. import log
from ..defaults import DEFAULT_BATCH, DEFAULT_FLASH_ATTN, DEFAULT_KV_TYPE
from ..draft import DEFAULT_DRAFT_MAX, MAX_DRAFT_MAX, draft_setting
from ..errors import UserError
from .app import (BatchOpt, CacheOpt, CtxOpt, DevicesOpt, FlashAttnOpt, KvTypeOpt, MissesOpt, ModeOpt, OptionalModelArg, ProfileOpt,
                  ReserveOpt, RpcOpt, ThreadsOpt, UbatchOpt, VramOpt, app, cache_setting, out)
from .placement import context_for, plan_and_draft, plan_or_cpu

DraftOpt = Annotated[str, typer.Option(
    metavar="auto|mtp|off", callback=draft_setting,
    help="Draft tokens with the model's multi-token-prediction (MTP) head and verify them in one batch: 'auto' drafts "
    "where the model has an MTP block and `bench` measured drafts faster on this machine for this placement, 'mtp' "
    "always, 'off' never.")]
DraftMaxOpt = Annotated[int, typer.Option(min=1, max=MAX_DRAFT_MAX, help="Most tokens one MTP draft round proposes.")]


@app.command()
def generate(
    model: OptionalModelArg = None,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue.")] = "Once upon a time",
    tokens: Annotated[int, typer.Option("--tokens", "-n", min=1, help="How many tokens to generate.")] = 32,
    ctx: CtxOpt = None,
    batch: BatchOpt = DEFAULT_BATCH,
    ubatch: UbatchOpt = None,
    kv_type: KvTypeOpt = DEFAULT_KV_TYPE,
    flash_attn: FlashAttnOpt = DEFAULT_FLASH_ATTN,
    threads: ThreadsOpt = 0,
    draft: DraftOpt = "auto",
    draft_max: DraftMaxOpt = DEFAULT_DRAFT_MAX,
) -> None:
    """Greedily continue a prompt and print the text, then the same speed summary as chat's."""
    from ..chat import summary
    from ..demo import resolve_model
    from ..engine import Engine

    path = resolve_model(model)
    context = context_for(path, ctx=ctx, batch=batch, ubatch=ubatch, kv_type=kv_type, flash_attn=flash_attn)
    _, draft = plan_and_draft(path, draft, draft_max, threads, lambda _draft_max: None)  # the CPU alone
    with Engine.load(path, n_threads=threads or None, **context.load_options(), draft=draft,
                     draft_max=draft_max) as engine:
        out.print(f"[bold]{prompt}[/]", end="")
        stats = None
        for event in engine.generate(engine.tokenize(prompt), max_tokens=tokens):
            out.print(event.text, end="", markup=False)
            stats = event.stats
        out.print()
        if stats:
            out.print(f"[dim]{stats.prompt_tokens} prompt tokens · {summary(stats, limit='--tokens')}"
                      + (f" · {stats.drafted_tokens} drafted, {stats.draft_accepted} accepted "
                         f"({stats.mean_accepted:.2f} per round)" if draft == "mtp" else "") + "[/]", highlight=False)


@app.command()
def serve(
    model: OptionalModelArg = None,
    vram: VramOpt = None,
    reserve: ReserveOpt = None,
    mode: ModeOpt = "auto",
    ctx: CtxOpt = None,
    batch: BatchOpt = DEFAULT_BATCH,
    ubatch: UbatchOpt = None,
    kv_type: KvTypeOpt = DEFAULT_KV_TYPE,
    flash_attn: FlashAttnOpt = DEFAULT_FLASH_ATTN,
    host: Annotated[str, typer.Option(help="Address to listen on. Anything but loopback exposes the API to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port to listen on.")] = 8080,
    api_key: Annotated[
        Optional[str],
        typer.Option(envvar="ROTARY_GGUF_API_KEY", help="Require 'Authorization: Bearer KEY' on every request but /health."),
    ] = None,
    rpc: RpcOpt = None,
    devices: DevicesOpt = None,
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
    access_log: Annotated[
        Optional[str],
        typer.Option(metavar="FILE|-|off", help="One line per request (method, path, status, prompt and completion tokens, ms): "
                     "appended to FILE, '-' for stderr, or off. Default: stderr, or off with --dashboard (it shows the requests)."),
    ] = None,
    draft: DraftOpt = "auto",
    draft_max: DraftMaxOpt = DEFAULT_DRAFT_MAX,
) -> None:
    """Serve a model through an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /metrics)
    and the Anthropic Messages API (/v1/messages)."""
    from .. import access_log as access
    from .. import serve as serving
    from ..dashboard.memory import device_budgets
    from ..demo import resolve_model
    from ..engine import Engine
    from ..experts.cache import ExpertCache
    from ..inventory import read_inventory
    from ..units import parse_size

    path = resolve_model(model)
    inv = read_inventory(path)
    cache = cache_setting(expert_cache)
    checkpoint_bytes = parse_size(checkpoint_memory, "--checkpoint-memory")
    context = context_for(path, ctx=ctx, batch=batch, ubatch=ubatch, kv_type=kv_type, flash_attn=flash_attn)
    screen = _dashboard_console() if dashboard else None
    access.configure(access_log or ("off" if dashboard else "-"))
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.logger.warning("listening on %s without --api-key: anyone who can reach it can use the model", host)
    sock = serving.listen(host, port)
    the_plan, draft = plan_and_draft(path, draft, draft_max, threads, lambda n: plan_or_cpu(
        path, vram=vram, reserve=reserve, mode=mode, context=context, rpc=rpc, devices=devices, expert_cache=cache,
        cache_misses=cache_misses, routing_profile=routing_profile, threads=threads, draft_max=n))
    placement = the_plan.placement if the_plan else None
    telemetry = _dashboard_telemetry(inv) if dashboard else None
    with Engine.load(path, placement, **context.load_options(), n_threads=threads or None, telemetry=telemetry,
                     expert_cache=ExpertCache.for_plan(the_plan, inv, n_threads=threads),
                     checkpoint_bytes=checkpoint_bytes, draft=draft, draft_max=draft_max) as engine:
        options = serving.ServeOptions(model_id=path.name.removesuffix(".gguf"), max_queue=max_queue, api_key=api_key,
                                       thinking_budget=thinking_budget, read_timeout=read_timeout,
                                       budgets=device_budgets(the_plan))
        if not dashboard:
            serving.run(engine, options, sock)
            return
        from ..dashboard import Dashboard

        title = f"{path.name} at http://{host}:{sock.getsockname()[1]}/v1"
        recent = access.Recent()
        access.logger.addHandler(recent)
        board = Dashboard(engine, telemetry=telemetry, plan=the_plan, serving=True, title=title, requests=recent.lines)
        with board.live(screen):
            serving.run(engine, options, sock)


def _dashboard_console():
    """Where serve's dashboard draws: stderr when it is a terminal (log lines then print above it),
    else stdout, else the controlling terminal; with none of them (a service, a pipe) there is
    nothing to draw on, and saying so beats drawing escape codes into a log file."""
    import sys

    from rich.console import Console

    if log.stderr.is_terminal:
        return log.stderr
    if sys.stdout.isatty():
        return Console(file=sys.stdout, highlight=False)
    try:
        return Console(file=open("/dev/tty", "w"), highlight=False)  # noqa: SIM115 (open while serving)
    except OSError:
        raise UserError("--dashboard needs a terminal to draw on: stdout and stderr are redirected and there is "
                        "no controlling terminal (/metrics has the same figures)") from None


def _dashboard_telemetry(inv):
    """Routing telemetry for a MoE model's dashboard; None for a dense model, or (with a warning)
    where its native callback cannot be built."""
    from ..telemetry import RoutingTelemetry

    if not inv.is_moe:
        return None
    try:
        return RoutingTelemetry(inv)
    except UserError as e:
        log.logger.warning("no routing heat map: %s", e)
        return None


@app.command()
def chat(
    model: OptionalModelArg = None,
    vram: VramOpt = None,
    reserve: ReserveOpt = None,
    mode: ModeOpt = "auto",
    ctx: CtxOpt = None,
    batch: BatchOpt = DEFAULT_BATCH,
    ubatch: UbatchOpt = None,
    kv_type: KvTypeOpt = DEFAULT_KV_TYPE,
    flash_attn: FlashAttnOpt = DEFAULT_FLASH_ATTN,
    rpc: RpcOpt = None,
    devices: DevicesOpt = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens one answer may have.")] = 512,
    temperature: Annotated[float, typer.Option(min=0.0, max=2.0, help="Sampling temperature (0: greedy).")] = 0.7,
    system: Annotated[Optional[str], typer.Option(help="A system message to start every conversation with.")] = None,
    routing: Annotated[bool, typer.Option(help="Watch expert routing for the dashboard's heat map.")] = True,
    expert_cache: CacheOpt = "auto",
    cache_misses: MissesOpt = "split",
    routing_profile: ProfileOpt = None,
    threads: ThreadsOpt = 0,
    draft: DraftOpt = "auto",
    draft_max: DraftMaxOpt = DEFAULT_DRAFT_MAX,
) -> None:
    """Chat with a model in the terminal: streamed answers above a live dashboard of memory, speed and routing."""
    from .. import chat as chatting
    from ..dashboard import Dashboard
    from ..demo import resolve_model
    from ..engine import Engine, SamplingParams
    from ..experts.cache import ExpertCache
    from ..inventory import read_inventory

    path = resolve_model(model)
    inv = read_inventory(path)
    context = context_for(path, ctx=ctx, batch=batch, ubatch=ubatch, kv_type=kv_type, flash_attn=flash_attn)
    telemetry = _dashboard_telemetry(inv) if routing else None
    the_plan, draft = plan_and_draft(path, draft, draft_max, threads, lambda n: plan_or_cpu(
        path, vram=vram, reserve=reserve, mode=mode, context=context, rpc=rpc, devices=devices,
        expert_cache=cache_setting(expert_cache), cache_misses=cache_misses, routing_profile=routing_profile,
        threads=threads, draft_max=n))
    placement = the_plan.placement if the_plan else None
    with Engine.load(path, placement, **context.load_options(), n_threads=threads or None, telemetry=telemetry,
                     expert_cache=ExpertCache.for_plan(the_plan, inv, n_threads=threads), draft=draft,
                     draft_max=draft_max) as engine:
        dashboard = Dashboard(engine, telemetry=telemetry, plan=the_plan)
        chatting.run(engine, dashboard, out, max_tokens=max_tokens, system=system,
                     sampling=SamplingParams(temperature=temperature, top_p=0.95, seed=None))
