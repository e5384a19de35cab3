"""`doctor`: what this installation of llama.cpp is and can do on this machine, and a decode smoke
test run in a child process, so that a crash inside llama.cpp is reported in one line instead of
taking the caller down (setup runs it after every build).

Run as `python -m rotary_gguf.doctor MODEL TOKENS`, this module is that child: it decodes a few
tokens and prints one JSON line.
"""

from __future__ import annotations

import json
import platform
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import UserError

SMOKE_PROMPT = "The return value"
SMOKE_TOKENS = 8
SMOKE_TIMEOUT_S = 300

# /proc/cpuinfo flags that decide which ggml CPU kernels can run, and the name each has in
# ggml's list of compiled features (None: ggml lists it under another name or not at all).
CPU_FLAGS = {
    "sse3": "SSE3", "ssse3": "SSSE3", "avx": "AVX", "avx2": "AVX2", "fma": "FMA", "f16c": "F16C",
    "bmi2": "BMI2", "avx_vnni": "AVX_VNNI", "avx512f": "AVX512", "avx512_vbmi": "AVX512_VBMI",
    "avx512_vnni": "AVX512_VNNI", "avx512_bf16": "AVX512_BF16", "amx_tile": None, "amx_int8": "AMX_INT8",
    "amx_bf16": None,
}
AMX_FLAGS = ("amx_tile", "amx_int8", "amx_bf16")
REBUILD = "rebuild llama-cpp-python here with `rm -rf .venv && make setup` (scripts/setup.sh builds it without AMX)"


class SmokeTestFailed(UserError):
    """The smoke test crashed or failed: exit code 1, the message says why and what to do."""

    exit_code = 1


@dataclass
class SmokeResult:
    ok: bool
    message: str  # what was decoded, or one line saying what went wrong and what to do
    signal: str | None = None  # the signal that killed the child (SIGSEGV, SIGILL, ...)
    tokens: int = 0
    decode_tps: float = 0.0


@dataclass
class Report:
    rotary_gguf: str
    llama_cpp_python: str
    library_dir: str
    backends_built: list[str]
    devices: list[str]
    cpu: str
    cpu_flags: list[str]
    cpu_backend_features: list[str]
    extra_buffer_types: list[str]
    refused_buffer_types: list[str]
    smoke: SmokeResult | None = field(default=None)

    def as_dict(self) -> dict:
        return asdict(self)


def host_cpu() -> tuple[str, list[str]]:
    """This CPU's model name and those of its flags that decide ggml's kernels (Linux's
    /proc/cpuinfo; elsewhere the platform's processor name and no flags)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return name, []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and value.strip():
            name = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
            if "pni" in flags:  # Linux's name for SSE3
                flags.add("sse3")
    return name, [f for f in CPU_FLAGS if f in flags]


def built_backends(library_dir: Path) -> list[str]:
    """The ggml backend libraries llama-cpp-python installed: CPU (and its variants), RPC, CUDA, ..."""
    names = []
    for lib in sorted(library_dir.glob("libggml-*.so")):
        backend = lib.name[len("libggml-"):-len(".so")]
        if backend != "base":
            names.append(backend.upper() if "-" not in backend else backend)
    return names


def report(smoke_model: Path | None, *, smoke: bool = True) -> Report:
    """Everything `doctor` shows; the smoke test (in a child process) unless `smoke` is false."""
    import importlib.metadata as md

    from . import __version__, native

    cpu, flags = host_cpu()
    extra = list(native.cpu_extra_buffer_types())
    return Report(
        rotary_gguf=__version__,
        llama_cpp_python=md.version("llama-cpp-python"),
        library_dir=str(native.LIB_DIR),
        backends_built=built_backends(native.LIB_DIR),
        devices=[f"{d.name} ({d.type}: {d.description})" for d in native.devices()],
        cpu=cpu,
        cpu_flags=flags,
        cpu_backend_features=[k for k, v in native.cpu_backend_features().items() if v not in ("0", "")],
        extra_buffer_types=extra,
        refused_buffer_types=list(native.unsafe_cpu_buffer_types()),
        smoke=smoke_test(smoke_model) if smoke else None,
    )


def smoke_test(model: Path | None = None, *, tokens: int = SMOKE_TOKENS, timeout: float = SMOKE_TIMEOUT_S,
               child: list[str] | None = None) -> SmokeResult:
    """Decode `tokens` greedy tokens of `model` (default: the demo model) in a child process.
    `child` replaces the child's command line (it must print the same JSON line)."""
    from .demo import resolve_model

    argv = child or [sys.executable, "-m", "rotary_gguf.doctor", str(resolve_model(model)), str(tokens)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return SmokeResult(False, f"the decode smoke test did not finish in {timeout:.0f} s")
    if done.returncode < 0:
        name = _signal_name(-done.returncode)
        return SmokeResult(False, crash_message(name), signal=name)
    if done.returncode != 0:
        last = next((line for line in reversed(done.stderr.splitlines()) if line.strip()), f"exit code {done.returncode}")
        return SmokeResult(False, f"the decode smoke test failed: {last.strip()}")
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
        n, tps = int(result["tokens"]), float(result["decode_tps"])
    except (IndexError, KeyError, TypeError, ValueError):
        return SmokeResult(False, f"the decode smoke test printed no result: {done.stdout.strip()[-200:]!r}")
    if n < 1:
        return SmokeResult(False, "the decode smoke test generated no tokens")
    return SmokeResult(True, f"decoded {n} tokens at {tps:.0f} t/s", tokens=n, decode_tps=tps)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def crash_message(signal_name: str, cpu: tuple[str, list[str]] | None = None,
                  build_features: list[str] | None = None) -> str:
    """One line for a decode that killed its process: which CPU feature is to blame, and the fix."""
    name, flags = cpu or host_cpu()
    if build_features is None:
        from . import native

        build_features = [k for k, v in native.cpu_backend_features().items() if v not in ("0", "")]
    head = f"llama.cpp crashed ({signal_name}) in the decode smoke test on this CPU ({name})"
    amx = [f for f in AMX_FLAGS if f in flags]
    if amx and "AMX_INT8" in build_features:
        return (f"{head}: the CPU has AMX ({' '.join(amx)}) and llama.cpp was built with ggml's AMX kernels, "
                f"which crash in this version; {REBUILD}")
    missing = [feature for flag, feature in CPU_FLAGS.items() if feature in build_features and flag not in flags]
    if signal_name == "SIGILL" and missing:
        return (f"{head}: llama.cpp was built for instructions this CPU lacks ({' '.join(missing)}), "
                "probably on another machine; rebuild it here with `rm -rf .venv && make setup`")
    if amx:
        return (f"{head}, which has AMX ({' '.join(amx)}); {REBUILD}, and if it still crashes run "
                "`rotary-gguf --verbose doctor` and report its output")
    return f"{head}; run `rotary-gguf --verbose doctor` and report its output"


def _child(model: str, tokens: int) -> None:
    """The smoke test itself: load, decode greedily, print one JSON line."""
    import faulthandler

    faulthandler.enable()  # a crash leaves the Python stack on stderr for --verbose reports
    from .engine import Engine
    from .log import setup

    setup(verbose=False)
    stats = None
    with Engine.load(model, n_ctx=256, n_batch=64) as engine:
        for event in engine.generate(engine.tokenize(SMOKE_PROMPT), max_tokens=tokens):
            stats = event.stats
    print(json.dumps({"tokens": stats.completion_tokens if stats else 0, "decode_tps": stats.decode_tps if stats else 0.0}))


if __name__ == "__main__":
    try:
        _child(sys.argv[1], int(sys.argv[2]))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
