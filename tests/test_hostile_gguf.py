"""Corrupted GGUF files: one clear line and exit 2 from every command, in milliseconds, never a
traceback, a hang or an abort of llama.cpp; and a seeded fuzz run over a few hundred files."""

from __future__ import annotations

import math
import time
from dataclasses import replace

import pytest

from conftest import assert_one_line_error, run_cli

import fuzz_gguf as fz


@pytest.fixture(scope="module")
def parts(test_model):
    """The qwen35moe test model taken apart, and its inventory."""
    return fz.take_apart(test_model(arch="qwen35moe"))


def write(tmp_path, name: str, data: bytes):
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(data)
    return path


def hparam(parts, key: str, value: bytes) -> bytes:
    p, inv = parts
    return p.set_value(f"{inv.arch}.{key}", value).build()


def with_kv(parts, key: str, value: bytes) -> bytes:
    p, _ = parts
    return replace(p, kvs=[kv for kv in p.kvs if kv[0] != key.encode()] + [(key.encode(), value)]).build()


HOSTILE = {
    # the examples, each with the words its one line must hold
    "nested-1000": (lambda p: with_kv(p, "general.nested", fz.nested_array(1000)), "nested arrays"),
    "alignment-0": (lambda p: with_kv(p, "general.alignment", fz.scalar(fz.U32, 0)), "general.alignment: 0 is not a power of two"),
    "alignment-negative": (lambda p: with_kv(p, "general.alignment", fz.scalar(fz.I32, -32)), "general.alignment: must be a uint32"),
    "used-5000": (lambda p: hparam(p, "expert_used_count", fz.array(fz.U32, [4] * 5000)), "expert_used_count must be an integer"),
    "blocks-string": (lambda p: hparam(p, "block_count", fz.string_value("4")), "block_count must be an integer, not a string"),
    "blocks-nan": (lambda p: hparam(p, "block_count", fz.scalar(fz.F32, math.nan)), "block_count must be an integer, not a float"),
    "blocks-2^63": (lambda p: hparam(p, "block_count", fz.scalar(fz.I64, 2**63 - 1)), "block_count = 9223372036854775807 is out of range"),
    "blocks-negative": (lambda p: hparam(p, "block_count", fz.scalar(fz.I32, -100000)), "block_count = -100000 is out of range"),
    "expert-ffn-huge": (
        lambda p: hparam(p, "expert_feed_forward_length", fz.scalar(fz.U64, 2**63 - 1)), "expert_feed_forward_length = 9223372036854775807"
    ),
    "duplicate-tensor": (
        lambda p: replace(p[0], tensors=[*p[0].tensors[:1], {**p[0].tensors[1], "name": p[0].tensors[0]["name"]}, *p[0].tensors[2:]]).build(),
        "name appears twice",
    ),
    "overlapping-data": (
        lambda p: replace(p[0], tensors=[*p[0].tensors[:1], {**p[0].tensors[1], "offset": 0}, *p[0].tensors[2:]]).build(),
        "overlaps that of tensor",
    ),
    "duplicate-token": (lambda p: with_kv(p, "tokenizer.ggml.tokens", fz.array(fz.STRING, ["a", "b", "a"])), "appears twice"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_file_is_one_line_from_inspect_plan_and_convert(tmp_path, parts, name):
    make, words = HOSTILE[name]
    bad = write(tmp_path, name, make(parts))
    commands = [("inspect", bad), ("plan", bad, "--vram", "1GiB"), ("convert", bad, tmp_path / "out.gguf")]
    for args in commands if name in ("blocks-2^63", "alignment-0", "duplicate-tensor") else commands[:1]:
        t0 = time.monotonic()
        result = run_cli(*args, timeout=30)
        assert_one_line_error(result, "corrupt GGUF", words)
        assert time.monotonic() - t0 < 10
    assert not (tmp_path / "out.gguf").exists()
    assert [p.name for p in tmp_path.iterdir()] == [bad.name]  # nothing left behind


def test_alignment_llama_cpp_would_abort_on_is_refused_before_loading(tmp_path, parts):
    """general.alignment = 1 passes gguf's own checks, then llama.cpp asserts on the unaligned
    tensor data and aborts the process: the reader must stop it first, in generate as everywhere."""
    p, _ = parts
    kvs = [kv for kv in p.kvs if kv[0] != b"general.alignment"] + [(b"general.alignment", fz.scalar(fz.U32, 1))]
    head = replace(p, kvs=kvs).header()
    bad = write(tmp_path, "align1", head + p.data)  # no padding: the data starts right after the header
    assert_one_line_error(run_cli("generate", bad, "-n", "1"), "general.alignment: 1 is not a power of two from 32")


def test_the_reader_takes_the_valid_models(test_model):
    from rotary_gguf.inventory import read_inventory

    for kwargs in (dict(arch="qwen3moe"), dict(arch="qwen35moe", fused_gate_up=True), dict(arch="qwen3"), dict(arch="qwen35moe", quant="q8_0")):
        inv = read_inventory(test_model(**kwargs))
        assert inv.n_layer == 4 and len(inv.tensors) > 40


def test_seeded_fuzz_run_has_no_traceback_hang_abort_or_accepted_corruption(tmp_path):
    """360 corrupted files (20 of each kind, seeded), llama.cpp loading whatever the reader accepts."""
    report = fz.run(360, seed=19, load_accepted=True, timeout=20, folder=tmp_path)
    print(report.table())
    assert report.tried == 360
    assert report.total("traceback") == report.total("hang") == report.total("abort") == 0, report.examples
    assert report.corrupted_accepted == 0, report.examples
    assert report.total("rejected") >= 340  # bit flips in strings nothing reads may be well-formed
    assert report.seconds < 60
