"""`convert` and `verify`: repacked models hold the input's weights byte for byte (checked with
gguf-py's reader, not ours), compute the same logits in llama.cpp, carry their layout and expert
order in metadata, refuse bad input in one line, and never leave a partial file behind.

Bit-exact logits after reordering need an order that keeps the router softmax's SIMD reduction
(ggml_vec_soft_max_f32: 4, 8 or 16 float lanes) unchanged, such as swapping aligned blocks of 16
experts; any other order changes the rounding of the routing weights (see verify.py), so those
runs are checked for exact weights and logits within verify's tolerance.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from conftest import CLI, assert_one_line_error, run_cli
from synthetic_models import simulated_profile

from rotary_gguf import __version__
from rotary_gguf.convert import convert, copies_per_token, order_experts, pair_probabilities, plan_conversion
from rotary_gguf.errors import UserError
from rotary_gguf.inventory import read_inventory
from rotary_gguf.profile_io import load_profile
from rotary_gguf.verify import verify_models

ARCHS = ("qwen3moe", "qwen35moe")
QUANTS = ("f32", "q8_0", "q4_k_m")
FEW = dict(prompts=("The quick brown fox", "1, 2, 3,"), new_tokens=4)  # enough tokens, kept fast


# --- profiles ------------------------------------------------------------------------------------
def profile_doc(inv, counts: dict[int, list[int]], coactivation: dict[int, list] | None = None, tokens: int = 1000) -> dict:
    layers = []
    for i, c in counts.items():
        entry = {"index": i, "counts": [int(x) for x in c]}
        if coactivation is not None:
            entry["coactivation"] = coactivation[i]
        layers.append(entry)
    model = {"arch": inv.arch, "n_expert": inv.n_expert, "n_expert_used": inv.n_expert_used, "file": inv.path.name, "bytes": inv.file_bytes}
    return {"model": model, "tokens": tokens, "layers": layers}


def chain_profile(inv, order: list[int]) -> dict:
    """Experts that fire in pairs along `order`, hotter towards its start: the best order is `order`."""
    n = inv.n_expert
    pairs = np.zeros((n, n), dtype=int)
    for a, b in zip(order, order[1:]):
        pairs[a, b] = pairs[b, a] = 100
    counts = np.zeros(n, dtype=int)
    counts[order] = np.arange(n, 0, -1) * 10
    layers = range(inv.n_layer)
    return profile_doc(inv, {i: counts for i in layers}, {i: pairs.tolist() for i in layers})


def write_json(path: Path, doc: dict) -> Path:
    path.write_text(json.dumps(doc))
    return path


def block_swap(n_expert: int) -> list[int]:
    """Aligned blocks of 16 experts swapped pairwise: leaves the softmax reduction unchanged."""
    blocks = [list(range(k, k + 16)) for k in range(0, n_expert, 16)]
    return [e for k in range(0, len(blocks), 2) for e in blocks[k + 1] + blocks[k]]


# --- independent reading (gguf-py) -----------------------------------------------------------------
def tensors(path: Path) -> tuple[dict[str, bytes], GGUFReader]:
    reader = GGUFReader(path)
    data = path.read_bytes()
    return {t.name: data[t.data_offset : t.data_offset + int(t.n_bytes)] for t in reader.tensors}, reader


def per_expert(blob: bytes, n: int) -> list[bytes]:
    size = len(blob) // n
    assert size * n == len(blob)
    return [blob[k * size : (k + 1) * size] for k in range(n)]


def gate_up(t: dict[str, bytes], layer: int, n: int) -> list[bytes]:
    """Per expert: gate rows then up rows, whether stored fused or separate."""
    fused = t.get(f"blk.{layer}.ffn_gate_up_exps.weight")
    if fused is not None:
        return per_expert(fused, n)
    gate, up = (per_expert(t[f"blk.{layer}.ffn_{k}_exps.weight"], n) for k in ("gate", "up"))
    return [g + u for g, u in zip(gate, up)]


def stored_order(reader: GGUFReader, layer: int, n: int) -> list[int]:
    field = reader.fields.get(f"rotary.expert_order.blk.{layer}")
    return list(range(n)) if field is None else [int(v) for v in field.contents()]


def assert_repack(src: Path, out: Path) -> dict[int, list[int]]:
    """OUT holds SRC's weights: per-expert slices at the positions its metadata gives, everything
    else byte for byte. Returns OUT's order per block (position -> original id)."""
    ts, rs = tensors(src)
    to, ro = tensors(out)
    inv = read_inventory(src)
    n = inv.n_expert
    orders = {}
    for layer in range(inv.n_layer):
        src_order, out_order = stored_order(rs, layer, n), stored_order(ro, layer, n)
        at_src = {e: p for p, e in enumerate(src_order)}
        take = [at_src[e] for e in out_order]  # out position -> src position
        assert gate_up(to, layer, n) == [gate_up(ts, layer, n)[p] for p in take]
        for name in (f"blk.{layer}.ffn_down_exps.weight", f"blk.{layer}.ffn_gate_inp.weight"):
            assert per_expert(to[name], n) == [per_expert(ts[name], n)[p] for p in take], name
        orders[layer] = out_order
    per_expert_names = ("_exps.", "ffn_gate_inp.weight")
    rest = {k for k in ts if not any(s in k for s in per_expert_names)}
    assert rest == {k for k in to if not any(s in k for s in per_expert_names)}
    assert all(ts[k] == to[k] for k in rest)
    return orders


def metadata(path: Path) -> dict:
    reader = GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("rotary.")}


# --- the matrix ------------------------------------------------------------------------------------
@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_repack_is_exact_with_and_without_a_profile(test_model, tmp_path, arch, quant):
    src = test_model(arch=arch, quant=quant)
    inv = read_inventory(src)
    if quant == "q4_k_m":  # really a K-quant, not a fallback type
        assert {"Q4_K"} <= {t.type_name for t in inv.expert_tensors}
    swap = block_swap(inv.n_expert)
    profile = write_json(tmp_path / "swap.json", chain_profile(inv, swap))

    for name, prof in (("plain", None), ("swap", profile)):
        out = tmp_path / f"{name}.gguf"
        convert(src, out, profile=prof, show_progress=False)
        orders = assert_repack(src, out)
        meta = metadata(out)
        assert meta["rotary.layout_version"] == 1 and meta["rotary.converter_version"] == __version__
        if prof is None:
            assert not any(k.startswith("rotary.expert_order") for k in meta)
        else:
            assert all(o == swap for o in orders.values())
            assert [meta[f"rotary.expert_order.blk.{i}"] for i in range(inv.n_layer)] == [swap] * inv.n_layer

        out_inv = read_inventory(out)
        assert out_inv.layout == "rotary-v1"
        assert out_inv.fused_gate_up == (arch == "qwen35moe")  # qwen3moe's loader reads only separate tensors
        assert out_inv.tensor_types().keys() == inv.tensor_types().keys()
        result = verify_models(src, out, **FEW)
        assert result.identical, result.summary()
        assert result.max_abs_diff == 0.0 and result.first_divergence is None


@pytest.mark.parametrize("arch", ARCHS)
def test_profile_order_keeps_coactivated_experts_adjacent_and_verifies(test_model, tmp_path, arch):
    src = test_model(arch=arch, router_skew=1.0)
    inv = read_inventory(src)
    profile = write_json(tmp_path / "p.json", simulated_profile(inv, seed=1))
    plan = plan_conversion(inv, load_profile(profile, inv))
    assert plan.copies_after < plan.copies_before
    assert plan.reordered_layers == list(range(inv.n_layer))

    out = tmp_path / "out.gguf"
    result = convert(src, out, profile=profile, verify=True, show_progress=False)
    assert assert_repack(src, out) == plan.orders
    v = result.verification
    assert v.passed and v.weights_difference is None and v.orders_differ, v.summary()
    assert v.max_abs_diff <= v.tolerance and v.first_divergence is None


def test_order_experts_groups_clusters():
    """16 experts in 4 clusters that always fire together, scattered over the ids."""
    rng = np.random.default_rng(0)
    ids = rng.permutation(16)
    clusters = [set(ids[k : k + 4]) for k in range(0, 16, 4)]
    pair_p = np.zeros((16, 16))
    for c in clusters:
        for a in c:
            for b in c:
                if a != b:
                    pair_p[a, b] = 0.2
    order = order_experts(pair_p, pair_p.sum(axis=1))
    assert sorted(order) == list(range(16))
    assert all(set(order[k : k + 4]) in clusters for k in range(0, 16, 4))
    assert copies_per_token(order, pair_p, 4) < copies_per_token(list(range(16)), pair_p, 4)
    # no information: the order stays as it is
    assert order_experts(np.zeros((16, 16)), np.zeros(16)) == list(range(16))


def test_counts_only_profile_uses_independent_pair_estimate(test_model, tmp_path):
    inv = read_inventory(test_model())
    counts = {i: [(e * 37) % 101 for e in range(inv.n_expert)] for i in range(inv.n_layer)}
    profile = load_profile(write_json(tmp_path / "c.json", profile_doc(inv, counts)), inv)
    p = np.array(counts[0]) / 1000
    assert np.allclose(pair_probabilities(profile, 0), np.outer(p, p) - np.diag(p * p))
    plan = plan_conversion(inv, profile)
    assert plan.copies_after < plan.copies_before
    hottest = int(np.argmax(counts[0]))
    assert hottest in plan.orders[0][: inv.n_expert // 2]  # the hotter half comes first


def test_reconverting_composes_orders(test_model, tmp_path):
    """A new profile is in original ids whatever the input's order: converting twice gives the
    same file as converting once, and an identity order brings the original layout back."""
    src = test_model(arch="qwen35moe", quant="q8_0")
    inv = read_inventory(src)
    first = write_json(tmp_path / "1.json", simulated_profile(inv, seed=2))
    second = write_json(tmp_path / "2.json", simulated_profile(inv, seed=3))
    identity = write_json(tmp_path / "id.json", chain_profile(inv, list(range(inv.n_expert))))

    convert(src, tmp_path / "a.gguf", profile=first, show_progress=False)
    convert(tmp_path / "a.gguf", tmp_path / "a-again.gguf", show_progress=False)  # no profile: as it is
    assert (tmp_path / "a-again.gguf").read_bytes() == (tmp_path / "a.gguf").read_bytes()
    convert(tmp_path / "a.gguf", tmp_path / "ab.gguf", profile=second, show_progress=False)
    convert(src, tmp_path / "b.gguf", profile=second, show_progress=False)
    assert (tmp_path / "ab.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
    assert_repack(src, tmp_path / "ab.gguf")
    assert_repack(tmp_path / "a.gguf", tmp_path / "ab.gguf")

    convert(tmp_path / "ab.gguf", tmp_path / "back.gguf", profile=identity, show_progress=False)
    convert(src, tmp_path / "plain.gguf", show_progress=False)
    assert (tmp_path / "back.gguf").read_bytes() == (tmp_path / "plain.gguf").read_bytes()
    assert read_inventory(tmp_path / "back.gguf").expert_order(0) is None


def test_fused_input_stays_fused_and_matches_converted_separate(test_model, tmp_path):
    separate = test_model(arch="qwen35moe", quant="q8_0")
    fused = test_model(arch="qwen35moe", quant="q8_0", fused_gate_up=True)
    inv = read_inventory(fused)
    profile = write_json(tmp_path / "p.json", simulated_profile(inv, seed=4))
    for src in (separate, fused):
        convert(src, tmp_path / f"{src.stem}.gguf", profile=profile, show_progress=False)
    a, b = (tmp_path / f"{s.stem}.gguf" for s in (separate, fused))
    assert read_inventory(b).fused_gate_up
    assert_repack(fused, b)
    # the same tensors and metadata (llama.cpp's quantizer sorted the fused input's tensors by name)
    assert tensors(a)[0] == tensors(b)[0]
    assert read_inventory(a).kv_raw == read_inventory(b).kv_raw


def test_input_is_only_read(test_model, tmp_path):
    src = test_model(arch="qwen35moe")
    before = (src.read_bytes(), src.stat().st_mtime_ns)
    convert(src, tmp_path / "out.gguf", show_progress=False)
    assert (src.read_bytes(), src.stat().st_mtime_ns) == before
    assert not list(tmp_path.glob(".*rotary-tmp*"))


# --- CLI and errors ----------------------------------------------------------------------------------
def test_cli_convert_verify_and_inspect(test_model, tmp_path):
    src = test_model(arch="qwen35moe", quant="q8_0")
    inv = read_inventory(src)
    profile = write_json(tmp_path / "p.json", simulated_profile(inv, seed=5))
    out = tmp_path / "out.gguf"
    r = run_cli("convert", src, out, "--profile", profile, "--verify")
    assert r.returncode == 0, r.stderr
    assert "verify" in r.stdout and "weights match" in r.stdout and "rotary-v1" in r.stdout
    s = json.loads(run_cli("inspect", out, "--json").stdout)
    assert s["layout"] == "rotary-v1" and s["fused_gate_up"] and s["expert_tensor_types"] == ["Q8_0"]

    r = run_cli("verify", src, out, "--json")
    assert r.returncode == 0, r.stderr
    v = json.loads(r.stdout)
    assert v["passed"] and v["orders_differ"] and v["weights_difference"] is None
    assert v["greedy_a"] == v["greedy_b"] and v["max_abs_diff"] <= v["tolerance"]

    r = run_cli("verify", test_model(), test_model(seed=1))
    assert r.returncode == 1
    assert "outputs differ" in r.stderr and "differs" in r.stderr


def test_cli_refusals(test_model, tmp_path):
    src = test_model()
    out = tmp_path / "out.gguf"
    out.write_bytes(b"keep me")
    assert_one_line_error(run_cli("convert", src, out), "exists", "--force")
    assert out.read_bytes() == b"keep me"
    assert run_cli("convert", src, out, "--force").returncode == 0
    assert read_inventory(out).layout == "rotary-v1"

    assert_one_line_error(run_cli("convert", src, src, "--force"), "is the input file")
    assert_one_line_error(run_cli("convert", test_model(arch="qwen3"), tmp_path / "d.gguf"), "not a Mixture-of-Experts")
    bad = write_json(tmp_path / "bad.json", {"model": {}})
    assert_one_line_error(run_cli("convert", src, tmp_path / "x.gguf", "--profile", bad), "missing 'arch'")
    with pytest.raises(UserError, match="no such file"):
        convert(tmp_path / "missing.gguf", tmp_path / "x.gguf")
    with pytest.raises(UserError, match="no such folder"):
        convert(src, tmp_path / "no" / "x.gguf")
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "d.gguf").exists()


def test_unsupported_moe_arch_is_refused(tmp_path):
    import gguf

    path = tmp_path / "llama-moe.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_expert_count(4)
    w.add_expert_used_count(2)
    w.add_tensor("blk.0.ffn_gate_exps.weight", np.zeros((4, 8, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_one_line_error(run_cli("convert", path, tmp_path / "out.gguf"), "does not support arch 'llama'", "qwen35moe")


def test_profile_validation(test_model, tmp_path):
    inv = read_inventory(test_model(arch="qwen35moe"))
    n = inv.n_expert
    good = profile_doc(inv, {i: [1] * n for i in range(inv.n_layer)})
    load_profile(write_json(tmp_path / "good.json", good), inv)

    def refused(doc, *fragments):
        with pytest.raises(UserError) as e:
            load_profile(write_json(tmp_path / "p.json", doc), inv)
        assert all(f in str(e.value) for f in fragments), str(e.value)

    refused({**good, "model": {**good["model"], "arch": "qwen3moe"}}, "arch 'qwen3moe'", "'qwen35moe'")
    refused({**good, "model": {**good["model"], "n_expert": n + 1}}, f"n_expert {n + 1}", f"has {n}")
    refused({**good, "layers": good["layers"][:1] + good["layers"][3:]}, "no counts for block(s) 1-2")
    negative = json.loads(json.dumps(good))
    negative["layers"][0]["counts"][3] = -1
    refused(negative, "negative count -1")
    short = json.loads(json.dumps(good))
    short["layers"][2]["counts"] = [1, 2]
    refused(short, "layers[2] counts", f"expected {n} counts")
    asym = json.loads(json.dumps(good))
    m = np.zeros((n, n), dtype=int)
    m[0, 1] = 3
    asym["layers"][0]["coactivation"] = m.tolist()
    refused(asym, "not symmetric")
    refused({**good, "layers": good["layers"] + [good["layers"][0]]}, "appears twice")
    refused({**good, "tokens": "many"}, "'tokens' must be an int")
    with pytest.raises(UserError, match="not valid JSON"):
        (tmp_path / "broken.json").write_text("{")
        load_profile(tmp_path / "broken.json", inv)


# --- interruption --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    """~100 MB: the write takes long enough to be interrupted in the middle."""
    from synthetic_models import make_model

    return make_model(tmp_path_factory.mktemp("big") / "big.gguf", arch="qwen3moe", layers=2, experts=64, embd=256, ff=256)


def temps(folder: Path) -> list[Path]:
    return list(folder.glob(".*.rotary-tmp-*"))


def writing_into(proc: subprocess.Popen, folder: Path) -> bool:
    """Whether `proc` has a file open in `folder`: its output, unnamed or a temp file."""
    fds = Path(f"/proc/{proc.pid}/fd")
    targets = []
    for fd in (fds.iterdir() if fds.is_dir() else ()):
        with contextlib.suppress(OSError):
            targets.append(os.readlink(fd))
    return any(t.startswith(f"{folder}/") for t in targets)


def start_and_interrupt(src: Path, out: Path, sig: int) -> subprocess.CompletedProcess:
    """Start a conversion, send `sig` as soon as it writes its output, wait for the end."""
    proc = subprocess.Popen([CLI, "convert", str(src), str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not writing_into(proc, out.parent) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.0005)
    seen = writing_into(proc, out.parent)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the conversion finished before the signal arrived")
    assert seen, f"the conversion never wrote: {stderr}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 128 + signal.SIGTERM)], ids=["SIGINT", "SIGTERM"])
def test_interrupted_conversion_leaves_nothing(big_model, tmp_path, sig, code):
    out = tmp_path / "out.gguf"
    r = start_and_interrupt(big_model, out, sig)
    assert r.returncode == code, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines == [f"error: interrupted by {signal.Signals(sig).name}: {out} was not written"], r.stderr
    assert list(tmp_path.iterdir()) == []


def test_hard_kill_leaves_nothing(big_model, tmp_path):
    """The output has no name until it is complete, so SIGKILL in the middle leaves no trace."""
    out = tmp_path / "out.gguf"
    r = start_and_interrupt(big_model, out, signal.SIGKILL)
    assert r.returncode == -signal.SIGKILL
    assert list(tmp_path.iterdir()) == []
    r = run_cli("convert", big_model, out)
    assert r.returncode == 0, r.stderr
    assert read_inventory(out).layout == "rotary-v1" and list(tmp_path.iterdir()) == [out]


def test_stale_temps_of_dead_processes_are_removed_at_the_start(test_model, tmp_path):
    """Where the file system cannot make unnamed files the output is a named temp until complete;
    the next conversion into the folder removes those of dead processes, even one that fails."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".other.gguf.rotary-tmp-{dead.pid}"
    live = tmp_path / f".other.gguf.rotary-tmp-{os.getpid()}"  # this test process: alive
    stale.write_bytes(b"half a model")
    live.write_bytes(b"being written")
    out = tmp_path / "out.gguf"
    out.write_bytes(b"old")
    r = run_cli("convert", test_model(), out)  # refused: out exists and no --force
    assert r.returncode == 2 and "exists; pass --force" in r.stderr
    assert "interrupted conversion" in r.stderr
    assert not stale.exists() and live.exists() and out.read_bytes() == b"old"


@pytest.fixture
def read_only_folder(tmp_path):
    """A read-only file system (a tmpfs mounted read-only; needs root)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only file system here (needs root)")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_read_only_destination_is_one_line(test_model, read_only_folder):
    r = run_cli("convert", test_model(), read_only_folder / "out.gguf")
    assert_one_line_error(r, "could not write", "read-only file system")
    assert list(read_only_folder.iterdir()) == []


def test_write_error_leaves_nothing(test_model, tmp_path):
    """A real write failure (the file-size limit, like a full disk): one line, no partial file."""
    src = test_model()
    out = tmp_path / "out.gguf"
    limit = src.stat().st_size // 2

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = subprocess.run([CLI, "convert", str(src), str(out)], capture_output=True, text=True, timeout=60, preexec_fn=limit_file_size)
    assert_one_line_error(r, "could not write", "too large")
    assert not out.exists() and not temps(tmp_path)
