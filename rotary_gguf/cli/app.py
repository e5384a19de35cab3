"""The command line's Typer app, its console and the options several commands share."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from typer.core import TyperGroup

from .. import __version__, log
from ..defaults import CARD_RESERVE, DEFAULT_CTX, FREE_MEMORY_RESERVE, MIN_CTX
from ..demo import model_source, resolve_model
from ..errors import UserError


def _first_sentence(text: str) -> str:
    """A docstring's first sentence on one line: `--help`'s list of commands keeps a docstring's line breaks."""
    paragraph = " ".join(text.split("\n\n", 1)[0].split())
    match = re.match(r"(.+?[.!?])(\s|$)", paragraph)
    return match.group(1) if match else paragraph


class _Commands(TyperGroup):
    """The app's commands, each listed by its docstring's first sentence, each also taking the app's
    --verbose/-v after its own name (`rotary-gguf plan M -v`): a copy of the app's option that turns
    verbose logging on instead of passing a value."""

    def __init__(self, **attrs):
        super().__init__(**attrs)
        verbose = next(p for p in self.params if p.name == "verbose")
        for command in self.commands.values():
            if command.help and not command.short_help:
                command.short_help = _first_sentence(command.help)
            option = copy.copy(verbose)
            option.expose_value = False
            option.callback = lambda ctx, param, value: log.setup(True) if value else None
            command.params.append(option)


app = typer.Typer(
    cls=_Commands,
    name="rotary-gguf",
    help="Run big Mixture-of-Experts GGUF models on a small GPU: experts in host RAM, the rest on the GPU.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(highlight=False)

_MODEL = ("A GGUF file, or a model by name: NAME[:QUANT] from the catalog (models.toml), OWNER/REPO[:QUANT] or "
          "hf:OWNER/REPO/FILE.gguf on Hugging Face")
ModelArg = Annotated[Path, typer.Argument(parser=resolve_model, help=f"{_MODEL}, downloaded with `pull` first.",
                                          show_default=False)]
OptionalModelArg = Annotated[
    Optional[Path],
    typer.Argument(parser=resolve_model, help=f"{_MODEL}, downloaded with `pull` first (default: the built-in demo "
                   "model).", show_default=False),
]
# plan and inspect need only the header: a name not pulled yet is read from the Hub (its header alone)
ModelSourceArg = Annotated[Path, typer.Argument(parser=model_source, help=f"{_MODEL}; one not pulled yet is read "
                                                "from the Hub, its header alone.", show_default=False)]
OptionalModelSourceArg = Annotated[
    Optional[Path],
    typer.Argument(parser=model_source, help=f"{_MODEL}; one not pulled yet is read from the Hub, its header alone "
                   "(default: the built-in demo model).", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]
RpcOpt = Annotated[
    Optional[str],
    typer.Option("--rpc", metavar="HOST:PORT[,HOST:PORT...]",
                 help="Use ggml-rpc servers (see `rpc-device`) as accelerators: one, or several separated by commas "
                 "(devices RPC0, RPC1, ... in this order)."),
]
DevicesOpt = Annotated[
    Optional[str],
    typer.Option("--devices", metavar="NAME[,NAME...]",
                 help="The accelerators the plan may use, as `devices` lists them (CUDA0, CUDA1, RPC0, ...), in "
                 "llama.cpp's layer order (default: every --rpc device, then every GPU). With several, the non-expert "
                 "layers are split over them by budget and resident expert blocks spread over them, fastest first; "
                 "host experts then run on the CPU (the expert cache and rotary mode use one device).",
                 show_default=False),
]
ModeOpt = Annotated[
    str,
    typer.Option(
        "--mode",
        help="Host experts: 'cpu' computes them on the CPU, 'rotary' streams each token's experts to the GPU, "
        "'auto' measures and picks the faster. Over several devices host experts run on the CPU (rotary: one GPU).",
    ),
]
VramOpt = Annotated[
    Optional[str],
    typer.Option(
        help="The GPU's memory, with a unit, e.g. 8GiB or 7.5GB; the plan keeps a display and driver reserve off it "
        "(default: what the GPU reports free, less a smaller reserve). With several devices: one size for each, or "
        "one per device in --devices order, e.g. 8GiB,4GiB.",
        show_default=False,
    ),
]
ReserveOpt = Annotated[
    Optional[str],
    typer.Option(
        metavar="SIZE",
        help=f"Memory kept off the GPU for the display and driver, e.g. 1GiB or 0 on a headless GPU (default: "
        f"{CARD_RESERVE >> 20}MiB off a --vram size, {FREE_MEMORY_RESERVE >> 20}MiB off reported free memory, none on an "
        "RPC device).",
        show_default=False,
    ),
]
CtxOpt = Annotated[
    Optional[int],
    typer.Option(
        min=MIN_CTX,
        help=f"Context length in tokens, {MIN_CTX} up to the model's trained context (default: the model's default_ctx "
        f"in models.toml, else {DEFAULT_CTX}).",
        show_default=False,
    ),
]
BatchOpt = Annotated[
    int, typer.Option(min=1, help="Tokens per decode call when reading a prompt; with --ubatch it sizes the compute buffer.")
]
UbatchOpt = Annotated[
    Optional[int],
    typer.Option(min=1, help="Tokens per micro-batch (default: --batch): the compute buffer grows with it.", show_default=False),
]
KvTypeOpt = Annotated[
    str,
    typer.Option(
        "--kv-type", metavar="f16|q8_0|q4_0",
        help="KV cache element type: q8_0 halves the KV cache, q4_0 quarters it (both need flash attention).",
    ),
]
FlashAttnOpt = Annotated[
    str,
    typer.Option(
        "--flash-attn", metavar="auto|on|off",
        help="Flash attention: 'off' adds every head's attention scores over the whole context to the compute buffer.",
    ),
]
ThreadsOpt = Annotated[int, typer.Option(min=0, help="CPU threads (0: all cores).")]
CacheOpt = Annotated[
    str,
    typer.Option(
        "--expert-cache",
        metavar="auto|off|SLOTS",
        help="Keep often used host experts in GPU slots (per host expert block): 'auto' lets the planner weigh slot "
        "counts against resident blocks (with --cache-misses upload: fills the VRAM left after the plan), 'off' "
        "turns the cache off, a number sets the slots per block. One device only: off in a plan over several.",
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


def rpc_endpoints(value: Optional[str]) -> list[str]:
    """--rpc as a list of HOST:PORT, each well formed and named once (whether a server answers is
    checked when it is registered)."""
    from ..native import parse_endpoint

    if value is None:
        return []
    endpoints = [part.strip() for part in value.split(",")]
    for endpoint in endpoints:
        parse_endpoint(endpoint)
    repeated = next((e for i, e in enumerate(endpoints) if e in endpoints[:i]), None)
    if repeated is not None:
        raise UserError(f"--rpc names {repeated} twice: each ggml-rpc server is one device")
    return endpoints


def device_names(value: Optional[str]) -> list[str] | None:
    """--devices as a list of device names, each named once; None when not given."""
    if value is None:
        return None
    names = [part.strip() for part in value.split(",")]
    if not all(names):
        raise UserError(f"--devices takes device names separated by commas (CUDA0,RPC0), not {value!r}")
    repeated = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if repeated is not None:
        raise UserError(f"--devices names {repeated} twice")
    return names


def misses_setting(value: str) -> str:
    """--cache-misses as the planner takes it."""
    from ..plan import CACHE_MISSES

    if value not in CACHE_MISSES:
        raise UserError(f"--cache-misses takes split or upload, not {value!r}")
    return value


def cache_setting(value: str) -> str | int:
    """--expert-cache as the planner takes it: "auto", "off" or a slot count."""
    from ..plan import EXPERT_CACHE_SETTINGS

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
