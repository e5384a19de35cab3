"""Live serving figures: running totals that the engine and the server update, and /metrics and
the dashboard read. Thread-safe; readers take a `Snapshot`."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine import GenerationStats


@dataclass(frozen=True)
class Snapshot:
    """The live figures at one moment."""

    requests: dict[str, int] = field(default_factory=dict)  # finished generations by finish_reason
    rejected: int = 0  # requests turned away because the queue was full
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_seconds: float = 0.0
    decode_seconds: float = 0.0
    ttft_seconds_sum: float = 0.0
    ttft_count: int = 0
    last_prompt_tps: float = 0.0
    last_decode_tps: float = 0.0
    last_ttft_seconds: float = 0.0
    in_flight: int = 0
    queue_length: int = 0
    drafted_tokens: int = 0  # MTP drafts verified (accepted + rejected)
    draft_accepted: int = 0
    draft_rejected: int = 0
    draft_rounds: int = 0

    @property
    def mean_accepted(self) -> float:
        """Drafts accepted per verification round, over every generation so far."""
        return self.draft_accepted / self.draft_rounds if self.draft_rounds else 0.0

    @property
    def requests_total(self) -> int:
        return sum(self.requests.values())

    @property
    def avg_decode_tps(self) -> float:
        """Decode speed over every request so far (the first token of each comes from the prompt pass)."""
        decoded = self.completion_tokens - self.ttft_count
        return decoded / self.decode_seconds if decoded > 0 and self.decode_seconds > 0 else 0.0

    @property
    def avg_ttft_seconds(self) -> float:
        return self.ttft_seconds_sum / self.ttft_count if self.ttft_count else 0.0


class LiveStats:
    """Running totals over the generations of one engine."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._now = Snapshot()
        self._running: GenerationStats | None = None

    def running(self) -> "GenerationStats | None":
        """The figures of the generation in progress (updated in place as it streams), if any."""
        return self._running

    def snapshot(self) -> Snapshot:
        with self._lock:
            return replace(self._now, requests=dict(self._now.requests))

    def generation_started(self, stats: "GenerationStats") -> None:
        with self._lock:
            self._now = replace(self._now, in_flight=self._now.in_flight + 1)
            self._running = stats

    def generation_finished(self, stats: "GenerationStats") -> None:
        with self._lock:
            s = self._now
            requests = dict(s.requests)
            reason = stats.finish_reason or "error"
            requests[reason] = requests.get(reason, 0) + 1
            got_token = stats.completion_tokens > 0
            self._running = None
            self._now = replace(
                s,
                requests=requests,
                in_flight=s.in_flight - 1,
                prompt_tokens=s.prompt_tokens + stats.prompt_tokens,
                cached_prompt_tokens=s.cached_prompt_tokens + stats.cached_prompt_tokens,
                completion_tokens=s.completion_tokens + stats.completion_tokens,
                prompt_seconds=s.prompt_seconds + stats.prompt_seconds,
                decode_seconds=s.decode_seconds + stats.decode_seconds,
                ttft_seconds_sum=s.ttft_seconds_sum + (stats.ttft_seconds if got_token else 0.0),
                ttft_count=s.ttft_count + got_token,
                last_prompt_tps=stats.prompt_tps if stats.prompt_seconds > 0 else s.last_prompt_tps,
                last_decode_tps=stats.decode_tps if stats.completion_tokens > 1 else s.last_decode_tps,
                last_ttft_seconds=stats.ttft_seconds if got_token else s.last_ttft_seconds,
                drafted_tokens=s.drafted_tokens + stats.drafted_tokens,
                draft_accepted=s.draft_accepted + stats.draft_accepted,
                draft_rejected=s.draft_rejected + stats.draft_rejected,
                draft_rounds=s.draft_rounds + stats.draft_rounds,
            )

    def request_rejected(self) -> None:
        with self._lock:
            self._now = replace(self._now, rejected=self._now.rejected + 1)

    def set_queue_length(self, n: int) -> None:
        with self._lock:
            self._now = replace(self._now, queue_length=n)
