"""The server's live figures in Prometheus' text exposition format (/metrics)."""

from __future__ import annotations

from .stats import Snapshot


def prometheus_text(s: Snapshot, accelerator_memory: dict[str, tuple[int, int]], cache: dict | None = None,
                    checkpoints: dict | None = None, placed: dict[str, int] | None = None,
                    budgets: dict[str, int] | None = None) -> str:
    """The live figures in Prometheus' text exposition format; `cache` is the expert cache's
    snapshot (ExpertCache.snapshot()) and `checkpoints` the prompt checkpoints'
    (CheckpointStore.snapshot()), when the engine has them. Accelerator figures carry a `device`
    label, one sample per accelerator: `accelerator_memory` as the devices report it (used, total),
    `placed` the bytes the engine put on each (Engine.placed_bytes()), `budgets` the plan's."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP rotary_gguf_{name} {help_text}")
        lines.append(f"# TYPE rotary_gguf_{name} {kind}")
        lines.extend(f"rotary_gguf_{name}{suffix} {_sample_value(value)}" for suffix, value in samples)

    def labelled(label: str, values: dict) -> list[tuple[str, float]]:
        return [(f'{{{label}="{key}"}}', value) for key, value in sorted(values.items())]

    metric("requests_total", "counter", "Generations finished, by finish reason.", labelled("finish_reason", s.requests))
    metric("requests_rejected_total", "counter", "Requests refused because the queue was full.", [("", s.rejected)])
    metric("prompt_tokens_total", "counter", "Prompt tokens of finished generations.", [("", s.prompt_tokens)])
    metric("prompt_tokens_cached_total", "counter", "Prompt tokens reused from the context cache.",
           [("", s.cached_prompt_tokens)])
    metric("completion_tokens_total", "counter", "Generated tokens.", [("", s.completion_tokens)])
    metric("decode_seconds_total", "counter", "Seconds spent generating after the first token.", [("", s.decode_seconds)])
    metric("decode_tokens_per_second", "gauge", "Decode speed of the last generation.", [("", s.last_decode_tps)])
    metric("decode_tokens_per_second_avg", "gauge", "Decode speed over all generations.", [("", s.avg_decode_tps)])
    metric("prompt_tokens_per_second", "gauge", "Prompt speed of the last generation.", [("", s.last_prompt_tps)])
    metric("time_to_first_token_seconds", "summary", "Time from a generation's start to its first token.",
           [("_sum", s.ttft_seconds_sum), ("_count", s.ttft_count)])
    metric("time_to_first_token_seconds_last", "gauge", "Time to first token of the last generation.",
           [("", s.last_ttft_seconds)])
    metric("draft_tokens_total", "counter", "Tokens drafted by the MTP head and verified, by outcome.",
           labelled("outcome", {"accepted": s.draft_accepted, "rejected": s.draft_rejected}))
    metric("draft_rounds_total", "counter", "Verification batches that carried drafts.", [("", s.draft_rounds)])
    metric("draft_mean_accepted_length", "gauge", "Drafts accepted per verification batch, over all generations.",
           [("", s.mean_accepted)])
    metric("queue_length", "gauge", "Requests waiting for the engine.", [("", s.queue_length)])
    metric("requests_in_flight", "gauge", "Generations running now.", [("", s.in_flight)])
    metric("accelerator_memory_used_bytes", "gauge", "Memory in use on each accelerator, as the device reports it.",
           labelled("device", {name: used for name, (used, _) in accelerator_memory.items()}))
    metric("accelerator_memory_total_bytes", "gauge", "Memory of each accelerator.",
           labelled("device", {name: total for name, (_, total) in accelerator_memory.items()}))
    if placed:
        metric("accelerator_placed_bytes", "gauge",
               "Bytes llama.cpp and the expert cache placed on each accelerator (a ggml-rpc device reports its server's RAM).",
               labelled("device", placed))
    if budgets:
        metric("accelerator_budget_bytes", "gauge", "The plan's memory budget for each accelerator.", labelled("device", budgets))
    if cache is not None:
        metric("expert_cache_enabled", "gauge", "1 while the expert cache serves decode calls, 0 once it turned itself off.",
               [("", int(cache["enabled"]))])
        metric("expert_cache_slots", "gauge", "Accelerator slots for experts, per cached block.", [("", cache["slots"])])
        metric("expert_cache_hits_total", "counter", "Expert selections served from a slot.", [("", cache["hits"])])
        metric("expert_cache_misses_total", "counter", "Expert selections uploaded into a slot first.",
               [("", cache["misses"])])
        metric("expert_cache_hit_rate", "gauge", "Share of expert selections served from a slot.", [("", cache["hit_rate"])])
        metric("expert_cache_hit_rate_recent", "gauge", "Share of expert selections served from a slot lately (about 10 s).",
               [("", cache["recent_hit_rate"])])
        metric("expert_cache_layer_hit_rate", "gauge", "Share of expert selections served from a slot, per block.",
               labelled("layer", cache["layer_hit_rate"]))
        metric("expert_cache_fallback_calls_total", "counter",
               "Decode calls that ran llama.cpp's own path: batches that could need more experts than the slots hold.",
               [("", cache["fallback_calls"])])
        metric("expert_cache_uploaded_bytes_total", "counter", "Expert bytes uploaded into slots.",
               [("", cache["uploaded_bytes"])])
        metric("expert_cache_upload_bytes_per_second", "gauge", "Expert upload speed lately (about 10 s).",
               [("", cache["uploaded_bytes_per_s"])])
        metric("expert_cache_resident_experts", "gauge", "Experts holding a slot, per block.",
               labelled("layer", {layer: len(experts) for layer, experts in cache["resident"].items()}))
        if cache.get("split"):
            metric("expert_accelerator_share", "gauge",
                   "Split compute: share of expert computations done on the accelerator (the rest on the CPU).",
                   [("", cache["hit_rate"])])
            metric("expert_accelerator_share_layer", "gauge", "Split compute: accelerator share per block.",
                   labelled("layer", cache["layer_hit_rate"]))
            metric("expert_cpu_seconds_total", "counter", "Split compute: CPU worker time on missed experts.",
                   [("", cache["cpu_seconds"])])
            metric("expert_cpu_seconds_per_token", "gauge", "Split compute: CPU worker time per token it served.",
                   [("", cache["cpu_seconds_per_token"])])
            metric("expert_cpu_wait_seconds_per_token", "gauge",
                   "Split compute: time per token the graph waited for the CPU worker.",
                   [("", cache["cpu_wait_seconds_per_token"])])
            metric("expert_cache_upload_bytes_per_token", "gauge", "Split compute: bytes admitted into slots per token.",
                   [("", cache["uploaded_bytes_per_token"])])
    if checkpoints is not None:
        metric("prompt_checkpoints", "gauge", "Checkpoints of the recurrent state kept for prompt reuse.",
               [("", checkpoints["count"])])
        metric("prompt_checkpoint_bytes", "gauge", "Host memory the prompt checkpoints hold.", [("", checkpoints["bytes"])])
        metric("prompt_checkpoint_max_bytes", "gauge", "The prompt checkpoints' memory budget.",
               [("", checkpoints["max_bytes"])])
        metric("prompt_checkpoints_restored_total", "counter", "Prompts that restarted from a checkpoint.",
               [("", checkpoints["restored"])])
    return "\n".join(lines) + "\n"


def _sample_value(value: float) -> str:
    """A sample value in full: integers exact (counters soon pass 6 digits), floats to the last digit."""
    return str(int(value)) if isinstance(value, int) else repr(float(value))
