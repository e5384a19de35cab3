"""The host-expert mode: cpu or rotary, from measured speeds."""

from __future__ import annotations

from ..decode_cost import CPU_HOP_LATENCY_S
from .figures import Accelerator, LinkFigures
from .placing import Plan
from .settings import COPY_LATENCY_S


def choose_mode(requested: str, accelerator: Accelerator, plan: Plan | None = None,
                link: LinkFigures | None = None) -> tuple[str, str]:
    """The host-expert mode and why. `auto` compares the predicted per-token time of the host
    experts in both modes from measured speeds (`link`), for the host blocks of `plan`."""
    if requested != "auto":
        return requested, f"{requested} mode was asked for"
    if not accelerator.streams_host_ops:
        why = "RPC has none" if accelerator.kind == "rpc" else f"{accelerator.name} has none"
        return "cpu", f"no CUDA device: rotary streaming needs a GPU's offload_op; {why}"
    if not accelerator.present or plan is None or link is None:
        return "cpu", f"{accelerator.name} is not on this machine, so nothing could be measured; pass --mode rotary to plan for streaming"
    if not plan.host_layers:
        return "cpu", "every expert block fits on the accelerator: no host experts to run"
    cpu_s, rotary_s = predicted_token_seconds(plan, link)
    faster = "rotary" if rotary_s < cpu_s else "cpu"
    return faster, (
        f"host experts per token: cpu {cpu_s * 1e3:.2f} ms (CPU at {link.cpu_expert_bytes_per_s / 1e9:.1f} GB/s) vs "
        f"rotary {rotary_s * 1e3:.2f} ms (uploads at {link.upload_bytes_per_s / 1e9:.1f} GB/s); {faster} is faster"
    )


def predicted_token_seconds(plan: Plan, link: LinkFigures) -> tuple[float, float]:
    """(cpu, rotary) seconds a decoded token spends on its host experts: the bytes of its used
    experts over the CPU's or the upload link's speed, plus per-block and per-copy latencies."""
    nbytes = plan.host_expert_bytes_per_token
    n_host = len(plan.host_layers)
    copies = sum(len(plan.model.expert_tensors[i]) for i in plan.host_layers) * plan.model.n_expert_used
    cpu = nbytes / link.cpu_expert_bytes_per_s + n_host * CPU_HOP_LATENCY_S
    rotary = nbytes / link.upload_bytes_per_s + copies * COPY_LATENCY_S
    return cpu, rotary
