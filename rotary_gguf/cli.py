"""The `rotary-gguf` command line: thin front ends over the stages of the data flow."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

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


def main() -> None:
    """Console-script entry point: user errors become one red line and exit code 2."""
    try:
        app()
    except UserError as e:
        log.error(str(e))
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        log.error("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
