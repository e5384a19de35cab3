"""`devices`, `doctor` and `rpc-device`: this machine and its llama.cpp build."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from .. import log
from ..units import human_bytes
from .app import JsonOpt, OptionalModelArg, RpcOpt, app, out, rpc_endpoints


@app.command()
def devices(rpc: RpcOpt = None, as_json: JsonOpt = False) -> None:
    """List the devices llama.cpp sees (CPU, GPUs, and the RPC devices of --rpc): the names --devices takes."""
    from .. import native

    for endpoint in rpc_endpoints(rpc):
        native.add_rpc_device(endpoint)
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
    from ..doctor import SmokeTestFailed, report, smoke_test
    from ..inventory import read_inventory

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

    from .. import native

    endpoint = f"{host}:{port}"
    native.parse_endpoint(endpoint)
    log.logger.info("serving the CPU as a ggml-rpc device on %s (Ctrl-C to stop)", endpoint)
    native.serve_rpc(endpoint, threads or max(1, (os.cpu_count() or 2) // 2))
