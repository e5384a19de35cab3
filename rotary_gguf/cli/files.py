"""`convert`, `verify` and `profile`: the commands that write or check model files and routing profiles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..units import human_bytes
from ..defaults import DEFAULT_FLASH_ATTN, DEFAULT_KV_TYPE
from .app import (CtxOpt, DevicesOpt, FlashAttnOpt, JsonOpt, KvTypeOpt, ModeOpt, ModelArg, ReserveOpt, RpcOpt, ThreadsOpt,
                  VramOpt, app, out)
from .placement import context_for, plan_or_cpu


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
    from ..arch import LAYOUT_VERSION
    from ..convert import convert as run_convert

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
    from ..verify import OutputsDiffer, verify_models

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
    ctx: CtxOpt = None,
    kv_type: KvTypeOpt = DEFAULT_KV_TYPE,
    flash_attn: FlashAttnOpt = DEFAULT_FLASH_ATTN,
    vram: VramOpt = None,
    reserve: ReserveOpt = None,
    mode: ModeOpt = "auto",
    rpc: RpcOpt = None,
    devices: DevicesOpt = None,
    threads: ThreadsOpt = 0,
) -> None:
    """Record which experts every block selects over a set of prompts: the routing profile `convert --profile` reads."""
    from ..engine import Engine
    from ..telemetry import BUILTIN_PROMPTS, PROFILE_BATCH, RoutingTelemetry, read_prompts, record_profile, write_profile

    texts = read_prompts(prompts) if prompts is not None else list(BUILTIN_PROMPTS)
    telemetry = RoutingTelemetry.for_model(model, pairs=True)
    # every token of a batch is an output: each block must route every token
    context = context_for(model, ctx=ctx, batch=PROFILE_BATCH, ubatch=None, kv_type=kv_type, flash_attn=flash_attn)
    the_plan = plan_or_cpu(model, vram=vram, reserve=reserve, mode=mode, context=context, rpc=rpc, devices=devices,
                           all_outputs=True,
                           threads=threads)
    placement = the_plan.placement if the_plan else None

    def progress(index: int, stats) -> None:
        out.print(f"[dim]prompt {index + 1}/{len(texts)}: {stats.prompt_tokens} + {stats.completion_tokens} tokens, "
                  f"decode {stats.decode_tps:.1f} t/s[/]")

    with Engine.load(model, placement, **context.load_options(), all_outputs=True, n_threads=threads or None,
                     telemetry=telemetry) as engine:
        doc = record_profile(engine, telemetry, texts, tokens, on_prompt=progress)
    write_profile(doc, output)
    top = 2 * telemetry.n_expert_used
    out.print(f"wrote {output}: {doc['tokens']} tokens over {len(texts)} prompts, {len(doc['layers'])} blocks; "
              f"each block's {top} busiest experts took {telemetry.busiest_share(top):.0%} of its selections "
              f"(uniform routing: {min(1.0, top / telemetry.n_expert):.0%})")
