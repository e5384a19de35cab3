"""`--draft auto`: whether MTP drafts measured faster on this machine for a model and placement.
`bench` measures the plan with and without drafts and records the verdict here, one file per
machine in the user's cache folder (like the calibration); `auto` drafts only where a verdict
says they were faster."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import UserError
from ..user_cache import cache_dir

VERDICT_FORMAT = 1


@dataclass(frozen=True)
class Verdict:
    """One bench's figures for a placement with and without drafts."""

    faster: bool  # the median decode with drafts beat the one without
    plain_tps: float  # median decode t/s without drafts
    draft_tps: float  # with drafts
    acceptance: float | None  # share of drafts accepted
    mean_accepted: float  # drafts accepted per round
    runs: int
    measured_at: str  # UTC, ISO 8601

    def describe(self) -> str:
        accepted = f"{self.acceptance:.0%} of drafts accepted, " if self.acceptance is not None else ""
        return (f"decode {self.draft_tps:.1f} t/s with drafts vs {self.plain_tps:.1f} without ({accepted}"
                f"{self.mean_accepted:.2f} a round; bench of {self.measured_at})")


def setup_key(model, placement, expert_cache_slots: int | None, split: bool, draft_max: int, threads: int) -> str:
    """What a verdict holds for: the model (its file's name and size; a model on the Hub not pulled
    yet, its name), how it is loaded (`placement`, a plan.Placement, and its expert cache), the
    drafts a round and the CPU threads."""
    try:
        size = model.stat().st_size if isinstance(model, Path) else None
    except OSError:
        size = None
    p = placement
    return json.dumps([model.name, size, list(p.devices), [list(o) for o in p.overrides], p.n_gpu_layers,
                       None if p.draft_overrides is None else [list(o) for o in p.draft_overrides],
                       p.offload_min_batch, p.use_mmap, p.repack, expert_cache_slots, split, draft_max, threads])


def verdicts_path() -> Path:
    """This machine's file of verdicts (its CPU and the llama.cpp build)."""
    from .. import native
    from ..doctor import host_cpu

    key = json.dumps([host_cpu()[0], os.cpu_count(), str(native.LIB_DIR)])
    return cache_dir() / "drafts" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def lookup(key: str, path: Path | None = None) -> Verdict | None:
    """The recorded verdict for `key` (a `setup_key`), or None."""
    entry = _read(path or verdicts_path()).get(key)
    try:
        return Verdict(**entry) if entry else None
    except TypeError:  # an entry of another shape: measure again
        return None


def record(key: str, verdict: Verdict, path: Path | None = None) -> Path:
    """Keep `verdict` for `key`, replacing an older one; returns the file."""
    path = path or verdicts_path()
    entries = _read(path)
    entries[key] = asdict(verdict)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"format": VERDICT_FORMAT, "verdicts": entries}, indent=1))
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write the draft verdict to {path} ({e.strerror}); set XDG_CACHE_HOME to a writable "
                        "folder") from None
    return path


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _read(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return d.get("verdicts", {}) if isinstance(d, dict) and d.get("format") == VERDICT_FORMAT else {}
