"""What the engine reports: sampling settings, the stream of token events with their running
statistics, per-token log-probabilities, and what llama.cpp allocated at load."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """How the next token is chosen. temperature 0 means greedy (argmax)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repeat_last_n: int = 64
    seed: int | None = None


@dataclass
class GenerationStats:
    """Per-request figures, updated as tokens stream."""

    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_seconds: float = 0.0
    decode_seconds: float = 0.0  # the engine's own time after the first token (not its consumer's)
    ttft_seconds: float = 0.0
    finish_reason: str | None = None
    drafted_tokens: int = 0  # MTP drafts evaluated (draft_accepted + draft_rejected once finished)
    draft_accepted: int = 0
    draft_rejected: int = 0
    draft_rounds: int = 0  # verification batches with drafts

    @property
    def mean_accepted(self) -> float:
        """Drafts accepted per verification batch."""
        return self.draft_accepted / self.draft_rounds if self.draft_rounds else 0.0

    @property
    def prompt_tps(self) -> float:
        evaluated = self.prompt_tokens - self.cached_prompt_tokens
        return evaluated / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        # The first generated token comes from the prompt pass; decode speed counts the rest.
        n = self.completion_tokens - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0


@dataclass
class TokenLogprob:
    """A token's log probability under the model (before sampling), with the most likely
    alternatives when asked for: (token text, its bytes, log probability), best first."""

    text: str
    data: bytes
    logprob: float
    top: list[tuple[str, bytes, float]] = field(default_factory=list)


@dataclass
class TokenEvent:
    """One generated token: its id, the text it completes (may be '' mid-character), and stats."""

    token: int | None  # None for the closing event of an end-of-generation token
    text: str
    stats: GenerationStats
    logprob: TokenLogprob | None = None  # when the generation was asked for log probabilities


@dataclass
class LoadReport:
    """What llama.cpp allocated while loading, per buffer name, read from its load log (sizes in MiB
    with two decimals: each figure is within 5 KiB). A mapped weight buffer ("CPU_Mapped") is the
    span of the file its tensors lie in, paged in on use, not memory set aside."""

    weight_bytes: dict[str, int] = field(default_factory=dict)
    kv_bytes: dict[str, int] = field(default_factory=dict)
    recurrent_bytes: dict[str, int] = field(default_factory=dict)
    compute_bytes: dict[str, int] = field(default_factory=dict)
    output_bytes: dict[str, int] = field(default_factory=dict)
    overridden: dict[str, str] = field(default_factory=dict)  # tensor name -> buffer type an override put it in

    _OVERRIDE = re.compile(r"tensor (?P<tensor>\S+) \(.*\) buffer type overridden to (?P<buffer>\S+)")
    _LINE = re.compile(r"(?P<buffer>\S+)\s+(?P<kind>model|KV|RS|compute|output) buffer size =\s*(?P<mib>[\d.]+) MiB")
    _FIELDS = {"model": "weight_bytes", "KV": "kv_bytes", "RS": "recurrent_bytes", "compute": "compute_bytes", "output": "output_bytes"}

    @classmethod
    def from_log(cls, lines: Sequence[str]) -> "LoadReport":
        report = cls()
        for line in lines:
            o = cls._OVERRIDE.search(line)
            if o:
                report.overridden[o["tensor"]] = o["buffer"]
            m = cls._LINE.search(line)
            if m:
                sizes = getattr(report, cls._FIELDS[m["kind"]])
                sizes[m["buffer"]] = sizes.get(m["buffer"], 0) + round(float(m["mib"]) * 2**20)
        return report
