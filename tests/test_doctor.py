"""AMX safety and `doctor`: the build has no AMX kernels, the engine refuses ggml's AMX buffer type
in builds made elsewhere, and the decode smoke test turns a real crash into one line."""

from __future__ import annotations

import json
import logging
import sys

import pytest
from conftest import assert_one_line_error, run_cli

from rotary_gguf import doctor, engine, native
from rotary_gguf.demo import DEMO_MODEL
from rotary_gguf.engine import Engine


def test_built_cpu_backend_has_no_amx_kernels():
    """scripts/setup.sh builds without AMX, so no AMX buffer type can receive weights here."""
    cpu_libs = list(native.LIB_DIR.glob("libggml-cpu*.so"))
    assert cpu_libs, f"no CPU backend in {native.LIB_DIR}"
    for lib in cpu_libs:
        assert b"ggml_backend_amx_mul_mat" not in lib.read_bytes(), lib
    assert "AMX" not in native.cpu_extra_buffer_types()
    assert "AMX_INT8" not in native.cpu_backend_features()
    assert native.unsafe_cpu_buffer_types() == ()


def test_cpu_backend_is_read_from_the_loaded_library():
    features = native.cpu_backend_features()
    assert features, "the CPU backend lists the features it was built with"
    if sys.platform == "linux" and "avx2" in doctor.host_cpu()[1]:
        assert "AVX2" in features  # a native build uses what this CPU has


@pytest.fixture
def amx_in_build(monkeypatch):
    """This process's ggml as a native build on a Xeon with AMX lists it: AMX first, then repack."""
    built = native.cpu_extra_buffer_types()
    monkeypatch.setattr(native.backends, "cpu_extra_buffer_types", lambda: ("AMX", *built))
    engine._refuse_unsafe_buffer_types.cache_clear()
    yield
    engine._refuse_unsafe_buffer_types.cache_clear()


def _weight_buffers(path) -> set[str]:
    with Engine.load(path, n_ctx=128) as e:
        tokens = [ev.token for ev in e.generate(e.tokenize("The return value"), max_tokens=4)]
        assert len(tokens) >= 1  # it decodes
        return set(e.load_report.weight_bytes)


@pytest.fixture
def q4_k_model(test_model):
    """A model whose Q4_K experts llama.cpp repacks for the CPU where it can."""
    return test_model(arch="qwen35moe", quant="q4_k_m", fused_gate_up=True)


def test_engine_loads_without_extra_buffer_types_when_amx_is_present(amx_in_build, q4_k_model, caplog):
    assert native.unsafe_cpu_buffer_types() == ("AMX",)
    with caplog.at_level(logging.DEBUG, logger="rotary_gguf"):
        buffers = _weight_buffers(q4_k_model)
        _weight_buffers(q4_k_model)
    assert not any("REPACK" in b or "AMX" in b for b in buffers), buffers
    said = [r.getMessage() for r in caplog.records if "AMX buffer type" in r.getMessage()]
    assert len(said) == 1 and said[0].count("crash") == 1  # said once, at --verbose (debug)


def test_engine_keeps_repacked_kernels_where_they_are_safe(q4_k_model):
    engine._refuse_unsafe_buffer_types.cache_clear()
    if "CPU_REPACK" not in native.cpu_extra_buffer_types():
        pytest.skip("this CPU backend has no repacked kernels")
    assert any("REPACK" in b for b in _weight_buffers(q4_k_model))


def test_smoke_test_decodes_the_demo_model():
    result = doctor.smoke_test(tokens=4)
    assert result.ok, result.message
    assert result.tokens == 4 and result.decode_tps > 0


def test_smoke_test_reports_a_child_that_really_crashes():
    crash = [sys.executable, "-c", "import ctypes; ctypes.string_at(0)"]  # reads address 0: SIGSEGV
    result = doctor.smoke_test(child=crash)
    assert not result.ok and result.signal == "SIGSEGV"
    assert "\n" not in result.message
    assert "llama.cpp crashed (SIGSEGV)" in result.message and "doctor" in result.message


def test_smoke_test_reports_a_child_that_fails_or_hangs():
    failed = doctor.smoke_test(child=[sys.executable, "-c", "import sys; sys.exit('error: no model')"])
    assert not failed.ok and failed.signal is None and "error: no model" in failed.message
    hung = doctor.smoke_test(child=[sys.executable, "-c", "import time; time.sleep(30)"], timeout=1)
    assert not hung.ok and "did not finish in 1 s" in hung.message


XEON = ("Intel(R) Xeon(R) Platinum 8480+", ["avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni",
                                             "amx_tile", "amx_int8", "amx_bf16"])


def test_crash_message_names_amx_and_the_fix():
    line = doctor.crash_message("SIGSEGV", XEON, ["AVX", "AVX2", "AVX512", "AVX512_VNNI", "AMX_INT8", "REPACK"])
    assert "AMX (amx_tile amx_int8 amx_bf16)" in line and "ggml's AMX kernels" in line
    assert "make setup" in line and "Xeon" in line


def test_crash_message_for_instructions_the_cpu_lacks():
    epyc = ("AMD EPYC", ["avx", "avx2", "fma", "f16c"])
    line = doctor.crash_message("SIGILL", epyc, ["AVX", "AVX2", "AVX512", "AVX512_VNNI"])
    assert "built for instructions this CPU lacks (AVX512 AVX512_VNNI)" in line and "make setup" in line
    generic = doctor.crash_message("SIGSEGV", epyc, ["AVX", "AVX2"])
    assert "rotary-gguf --verbose doctor" in generic


def test_doctor_command_reports_the_installation():
    result = run_cli("doctor", "--json")
    assert result.returncode == 0, result.stderr
    r = json.loads(result.stdout)
    assert r["llama_cpp_python"] == "0.3.36"
    assert "CPU" in r["backends_built"] and "RPC" in r["backends_built"]
    assert any(d.startswith("CPU") for d in r["devices"])
    assert r["refused_buffer_types"] == [] and "AMX" not in r["extra_buffer_types"]
    assert r["smoke"]["ok"] and r["smoke"]["tokens"] == doctor.SMOKE_TOKENS
    table = run_cli("doctor")
    assert table.returncode == 0 and "decode smoke test" in table.stdout and "ok" in table.stdout
    brief = run_cli("doctor", "--brief")
    assert brief.returncode == 0 and brief.stdout.startswith("smoke test: decoded 8 tokens")


def test_doctor_rejects_a_missing_model_in_one_line(tmp_path):
    assert_one_line_error(run_cli("doctor", tmp_path / "missing.gguf"), "missing.gguf")
