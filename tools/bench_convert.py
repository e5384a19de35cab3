#!/usr/bin/env python3
"""Benchmark `rotary-gguf convert` against `cp` of the same file on the same disk.

Generates a synthetic MoE model of a few hundred MB and a routing profile, then alternates, for
each run: `cp` of the model, `cp` followed by fsync of the copy, and a conversion (gate+up fused
and every block's experts reordered: the most scattered reads the converter does). Each
conversion runs in a fresh process that reports its own time and peak RSS. Prints medians, the
throughput ratio convert/cp, and peak RSS against the largest tensor.

Goals: ratio >= 0.5; peak RSS < 3x the largest tensor + 200 MB.

    python tools/bench_convert.py [--folder DIR] [--runs 5] [--layers 8] [--experts 64]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_models import make_model, simulated_profile  # noqa: E402

from rotary_gguf.convert import plan_conversion  # noqa: E402
from rotary_gguf.inventory import read_inventory  # noqa: E402
from rotary_gguf.profile_io import load_profile  # noqa: E402
from rotary_gguf.units import human_bytes  # noqa: E402

MiB = 2**20

# One conversion in a fresh process: its time (planning, writing, fsync) and its peak RSS. The peak
# is VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent across exec.
CHILD = """
import json, sys, time
from rotary_gguf.convert import convert
t = time.perf_counter()
result = convert(sys.argv[1], sys.argv[2], profile=sys.argv[3], force=True, show_progress=False)
seconds = time.perf_counter() - t
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({"seconds": seconds, "bytes": result.bytes_written,
                  "peak_rss": int(status["VmHWM"].split()[0]) * 1024}))
"""


def time_cp(src: Path, dst: Path, fsync: bool) -> float:
    t = time.perf_counter()
    subprocess.run(["cp", str(src), str(dst)], check=True)
    if fsync:
        fd = os.open(dst, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    seconds = time.perf_counter() - t
    dst.unlink()
    return seconds


def run_convert(src: Path, dst: Path, profile: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(src), str(dst), str(profile)], check=True, capture_output=True, text=True)
    dst.unlink()
    return json.loads(out.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folder", type=Path, default=Path("."), help="where to put the files (the disk under test)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--arch", default="qwen35moe")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--used", type=int, default=8)
    ap.add_argument("--embd", type=int, default=512)
    ap.add_argument("--ff", type=int, default=256)
    ap.add_argument("--quant", default="f16")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_convert-", dir=args.folder))
    try:
        model = make_model(work / "model.gguf", arch=args.arch, layers=args.layers, experts=args.experts,
                           used=args.used, embd=args.embd, ff=args.ff, quant=args.quant)
        profile = work / "profile.json"
        profile.write_text(json.dumps(simulated_profile(read_inventory(model), tokens=2000)))
        inv = read_inventory(model)
        plan = plan_conversion(inv, load_profile(profile, inv))
        largest = max(max(t.nbytes for t in inv.tensors), max(t.nbytes for t in plan.tensors))
        size = model.stat().st_size
        print(f"model: {args.arch} {args.quant}, {args.layers} blocks x {args.experts} experts, {human_bytes(size)}; "
              f"largest tensor {human_bytes(largest)}; {len(plan.fused_layers)} blocks fused, "
              f"{len(plan.reordered_layers)} reordered")

        time_cp(model, work / "warm.gguf", fsync=False)  # the model in the page cache, as for every run
        cp, cp_sync, conv, rss = [], [], [], []
        for _ in range(args.runs):
            cp.append(time_cp(model, work / "cp.gguf", fsync=False))
            cp_sync.append(time_cp(model, work / "cp-sync.gguf", fsync=True))
            r = run_convert(model, work / "out.gguf", profile)
            conv.append(r["seconds"])
            rss.append(r["peak_rss"])

        t_cp, t_sync, t_conv = (statistics.median(x) for x in (cp, cp_sync, conv))
        peak = max(rss)
        goal_rss = 3 * largest + 200 * MiB
        print(f"median of {args.runs} runs, all in {work.parent.resolve()}")
        for name, times in (("cp", cp), ("cp + fsync", cp_sync), ("convert", conv)):
            print(f"  {name:14} runs: {' '.join(f'{x:.3f}' for x in times)}")
        print(f"  cp             {t_cp:7.3f} s  {human_bytes(size / t_cp)}/s")
        print(f"  cp + fsync     {t_sync:7.3f} s  {human_bytes(size / t_sync)}/s")
        print(f"  convert        {t_conv:7.3f} s  {human_bytes(size / t_conv)}/s  (fsync included)")
        print(f"throughput ratio convert/cp:         {t_cp / t_conv:.2f}  (goal >= 0.5)")
        print(f"throughput ratio convert/(cp+fsync): {t_sync / t_conv:.2f}")
        print(f"peak RSS {human_bytes(peak)} = {peak / largest:.1f}x the largest tensor; "
              f"goal < 3x + 200 MiB = {human_bytes(goal_rss)}: {'met' if peak < goal_rss else 'NOT met'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
