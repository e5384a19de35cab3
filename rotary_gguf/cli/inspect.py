"""`inspect`: what a GGUF model holds, from its header alone."""

from __future__ import annotations

import json

from rich.table import Table

from ..units import human_bytes
from .app import JsonOpt, OptionalModelSourceArg, app, out


@app.command()
def inspect(model: OptionalModelSourceArg = None, as_json: JsonOpt = False) -> None:
    """Show a GGUF model's architecture, trained context, quantization (general.file_type and each
    tensor type's share of the bytes), experts and where its bytes are (reads only the header)."""
    from ..catalog import match
    from ..demo import model_inventory, model_source

    inv = model_inventory(model_source(model))
    summary = inspect_summary(inv, match(inv))
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    _print_inspect(summary)


def inspect_summary(inv, catalog_matches: list[str]) -> dict:
    """The figures `inspect` shows, as one JSON-ready dict."""
    n_mtp = inv.hparam("nextn_predict_layers")  # multi-token-prediction blocks after the trunk
    attention = inv.attention_layout()[: inv.n_layer - n_mtp] + ["mtp"] * n_mtp
    expert_per_layer, other_per_layer = inv.layer_expert_bytes(), inv.layer_other_bytes()
    summary = {
        "file": str(inv.path),
        "arch": inv.arch,
        "n_layer": inv.n_layer,
        "n_mtp_layers": n_mtp,
        "n_expert": inv.n_expert,
        "n_expert_used": inv.n_expert_used,
        "n_embd": inv.n_embd,
        "context_length": trained_context(inv),
        "file_type": file_type_name(inv.metadata.get("general.file_type")),
        "quant_mix": quant_mix(inv),
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


def trained_context(inv) -> int | None:
    """`<arch>.context_length`, where the file states it as a positive integer."""
    from ..arch import hparam

    value = inv.metadata.get(hparam(inv.arch, "context_length"))
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def file_type_name(value) -> str | None:
    """general.file_type (llama.cpp's llama_ftype) by name, e.g. "Q4_K_M"; None where it is missing."""
    import gguf

    if not isinstance(value, int) or isinstance(value, bool):
        return None
    try:
        name = gguf.LlamaFileType(value & ~gguf.LlamaFileType.GUESSED).name
    except ValueError:
        return f"unknown ({value})"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def quant_mix(inv) -> list[dict]:
    """Bytes of each tensor type and their share of all tensor bytes, largest first."""
    by_type: dict[str, int] = {}
    for t in inv.tensors:
        by_type[t.type_name] = by_type.get(t.type_name, 0) + t.nbytes
    total = sum(by_type.values()) or 1
    return [{"type": name, "bytes": n, "share": n / total}
            for name, n in sorted(by_type.items(), key=lambda item: -item[1])]


def _print_inspect(s: dict) -> None:
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("file", s["file"])
    head.add_row("architecture", s["arch"] + (f"  (matches {', '.join(s['catalog'])})" if s["catalog"] else ""))
    mtp = s["n_mtp_layers"]
    head.add_row("blocks", str(s["n_layer"]) + (f" ({s['n_layer'] - mtp} and {mtp} multi-token-prediction (MTP) block"
                                                 f"{'s' if mtp > 1 else ''}: --draft mtp)" if mtp else ""))
    head.add_row("trained context", f"{s['context_length']:,} tokens" if s["context_length"] else "not stated")
    mix = ", ".join(f"{q['type']} {q['share']:.1%}" for q in s["quant_mix"])
    head.add_row("quantization", (f"{s['file_type']}: " if s["file_type"] else "") + mix + " of the tensor bytes")
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
