"""Tests for tools/make_test_model.py and its synthetic_models: the GGUF models load and run
in llama-cpp-python, are reproducible, and route the way they claim to."""

from __future__ import annotations

import collections
import ctypes
import hashlib
import logging
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import synthetic_models  # tools/ is on sys.path (conftest)

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "make_test_model.py"


gguf = pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

N_THREADS = 2
PROMPT = b"Hello, the world is a test of the model and it is on."
ROUTING_TEXT = (
    b"The quick brown fox jumps over the lazy dog. In the beginning there was "
    b"a small test model, and it was routed well; then 42 tokens went by!\n"
    b"Is this the end of the story? No: what you see is what you get."
)

# small dims used where the defaults would only cost time
QK_DIMS = dict(layers=4, experts=4, used=2, embd=256, ff=256)


@pytest.fixture(scope="module", autouse=True)
def _quiet_llama():
    # llama-cpp-python prints llama.cpp's log through this logger
    logger = logging.getLogger("llama-cpp-python")
    old = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(old)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Generate each variant once per module; returns name -> path."""
    folder = tmp_path_factory.mktemp("test_models")
    cache = {}

    def get(name, **kw):
        if name not in cache:
            cache[name] = synthetic_models.make_model(folder / f"{name}.gguf", **kw)
        return cache[name]

    return get


def sha256(path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------
# llama.cpp helpers (low-level API)


class _GgmlTensor(ctypes.Structure):
    # leading part of struct ggml_tensor (ggml.h) up to name[64]
    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
    ]


assert _GgmlTensor.ne.offset == 16 and _GgmlTensor.nb.offset == 48
assert _GgmlTensor.data.offset == 248 and _GgmlTensor.name.offset == 256


class _Session:
    def __init__(self, path, cb_eval=None, n_ctx=512):
        self.model = llama_cpp.llama_model_load_from_file(
            os.fsencode(str(path)), llama_cpp.llama_model_default_params()
        )
        assert self.model, f"llama.cpp failed to load {path}"
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_ctx
        cp.n_ubatch = n_ctx
        cp.n_threads = N_THREADS
        cp.n_threads_batch = N_THREADS
        if cb_eval is not None:
            cp.cb_eval = cb_eval
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        assert self.ctx, "llama_init_from_model failed"
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)

    def tokenize(self, text: bytes, special=True):
        buf = (llama_cpp.llama_token * 1024)()
        n = llama_cpp.llama_tokenize(self.vocab, text, len(text), buf, 1024, False, special)
        assert n > 0
        return list(buf[:n])

    def greedy(self, tokens, n_new=16):
        out = []
        batch = list(tokens)
        for _ in range(n_new):
            arr = (llama_cpp.llama_token * len(batch))(*batch)
            rc = llama_cpp.llama_decode(self.ctx, llama_cpp.llama_batch_get_one(arr, len(batch)))
            assert rc == 0, f"llama_decode returned {rc}"
            logits = np.ctypeslib.as_array(
                llama_cpp.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,)
            )
            assert np.isfinite(logits).all()
            tok = int(np.argmax(logits))
            out.append(tok)
            batch = [tok]
        return out

    def close(self):
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)


def greedy_tokens(path, n_new=16):
    s = _Session(path, n_ctx=256)
    try:
        return s.greedy(s.tokenize(PROMPT), n_new)
    finally:
        s.close()


def routing_counts(path, n_new=16):
    """Per layer Counter of expert ids chosen by the router (ffn_moe_topk)."""
    counts = collections.defaultdict(collections.Counter)

    @llama_cpp.ggml_backend_sched_eval_callback
    def cb(t, ask, user_data):
        tensor = _GgmlTensor.from_address(t)
        name = tensor.name.decode(errors="replace")
        if not name.startswith("ffn_moe_topk-"):
            return False
        if ask:
            return True
        layer = int(name.rsplit("-", 1)[1])
        n_used, n_tokens = tensor.ne[0], tensor.ne[1]
        for row in range(n_tokens):  # a non-contiguous view: rows are nb[1] apart
            ids = (ctypes.c_int32 * n_used).from_address(tensor.data + row * tensor.nb[1])
            counts[layer].update(ids)
        return True

    s = _Session(path, cb_eval=cb)
    try:
        s.greedy(s.tokenize(ROUTING_TEXT, special=False), n_new)
    finally:
        s.close()
    return counts


def top_share(counts, k):
    """Mean over layers of the share of selections taken by the top-k experts."""
    shares = []
    for c in counts.values():
        total = sum(c.values())
        shares.append(sum(v for _, v in c.most_common(k)) / total)
    return float(np.mean(shares))


# ---------------------------------------------------------------------------
# loading and generation


@pytest.mark.parametrize(
    "arch,quant",
    [
        ("qwen3moe", "f32"),
        ("qwen35moe", "f32"),
        ("qwen3moe", "q8_0"),
        ("qwen35moe", "q8_0"),
        ("qwen35moe", "f16"),
        ("qwen3", "f32"),
    ],
)
def test_generates_deterministically(models, arch, quant):
    path = models(f"{arch}-{quant}", arch=arch, quant=quant)
    first = greedy_tokens(path)
    second = greedy_tokens(path)
    assert len(first) == 16
    assert first == second
    # not a degenerate model that only ever emits one token
    assert len(set(first)) > 1


def test_q4_k_m_uses_k_quants_and_generates(models):
    path = models("qwen35moe-q4km", arch="qwen35moe", quant="q4_k_m", **QK_DIMS)
    reader = gguf.GGUFReader(str(path))
    kquants = {gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K}
    expert_types = {t.name: t.tensor_type for t in reader.tensors if "_exps." in t.name}
    assert expert_types and all(tt in kquants for tt in expert_types.values()), expert_types
    assert any(tt == gguf.GGMLQuantizationType.Q4_K for tt in expert_types.values())
    file_type = reader.fields["general.file_type"]
    assert int(file_type.parts[file_type.data[0]][0]) == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    out = greedy_tokens(path)
    assert out == greedy_tokens(path) and len(out) == 16
    # byte-identical when regenerated
    again = synthetic_models.make_model(path.parent / "q4km-again.gguf", arch="qwen35moe", quant="q4_k_m", **QK_DIMS)
    assert sha256(again) == sha256(path)


def test_high_level_llama_tokenizer_and_chat(models):
    path = models("qwen35moe-f32", arch="qwen35moe", quant="f32")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=N_THREADS, verbose=False)
    try:
        text = "Hello world, this is the test.\nSpaces  and ünïcödé!"
        toks = llm.tokenize(text.encode(), add_bos=False, special=False)
        assert llm.detokenize(toks).decode() == text
        assert len(toks) < len(text.encode())  # merges are applied
        specials = llm.tokenize(b"<|im_start|>user<|im_end|>", add_bos=False, special=True)
        tok = synthetic_models.build_tokenizer()
        assert specials[0] == tok["im_start_id"]
        assert specials[-1] == tok["eos_id"] == llm.token_eos()
        assert llm.detokenize(specials[1:-1]) == b"user"
        res = llm.create_chat_completion(
            messages=[{"role": "user", "content": "Say hi"}], max_tokens=8, temperature=0.0
        )
        assert res["choices"][0]["message"]["role"] == "assistant"
        assert res["usage"]["completion_tokens"] == 8
    finally:
        llm.close()


# ---------------------------------------------------------------------------
# reproducibility


def test_same_args_same_bytes_different_seed_different_bytes(tmp_path):
    for quant in ("f32", "q8_0"):
        kw = dict(arch="qwen35moe", quant=quant, router_skew=1.0, seed=7)
        a = synthetic_models.make_model(tmp_path / f"a-{quant}.gguf", **kw)
        b = synthetic_models.make_model(tmp_path / f"b-{quant}.gguf", **kw)
        c = synthetic_models.make_model(tmp_path / f"c-{quant}.gguf", **{**kw, "seed": 8})
        assert sha256(a) == sha256(b)
        assert sha256(a) != sha256(c)
    # written atomically: nothing but the outputs is left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{x}-{q}.gguf" for x in "abc" for q in ("f32", "q8_0")
    )


# ---------------------------------------------------------------------------
# fused gate+up experts


def test_fused_gate_up_is_concatenation_and_matches_unfused(models):
    plain = models("qwen35moe-f32", arch="qwen35moe", quant="f32")
    fused = models("qwen35moe-f32-fused", arch="qwen35moe", quant="f32", fused_gate_up=True)

    plain_t = {t.name: t for t in gguf.GGUFReader(str(plain)).tensors}
    fused_t = {t.name: t for t in gguf.GGUFReader(str(fused)).tensors}
    n_layers = 4
    for il in range(n_layers):
        p = f"blk.{il}."
        assert p + "ffn_gate_exps.weight" not in fused_t
        gu = fused_t[p + "ffn_gate_up_exps.weight"]
        gate = plain_t[p + "ffn_gate_exps.weight"]
        up = plain_t[p + "ffn_up_exps.weight"]
        # ggml ne order: {n_embd, 2*ff, n_expert}
        assert list(gu.shape) == [gate.shape[0], 2 * gate.shape[1], gate.shape[2]]
        ff = int(gate.shape[1])
        gu_data = np.asarray(gu.data)  # numpy order: (n_expert, 2*ff, n_embd)
        np.testing.assert_array_equal(gu_data[:, :ff, :], np.asarray(gate.data))
        np.testing.assert_array_equal(gu_data[:, ff:, :], np.asarray(up.data))
    assert set(plain_t) - set(fused_t) == {
        f"blk.{il}.ffn_{w}_exps.weight" for il in range(n_layers) for w in ("gate", "up")
    }

    assert greedy_tokens(fused) == greedy_tokens(plain)

    q_plain = models("qwen35moe-q8_0", arch="qwen35moe", quant="q8_0")
    q_fused = models("qwen35moe-q8_0-fused", arch="qwen35moe", quant="q8_0", fused_gate_up=True)
    assert greedy_tokens(q_fused) == greedy_tokens(q_plain)


def test_fused_gate_up_rejected_where_llama_cpp_ignores_it(tmp_path):
    with pytest.raises(ValueError):
        synthetic_models.make_model(tmp_path / "x.gguf", arch="qwen3moe", fused_gate_up=True)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------
# layout / metadata


def _field(reader, key):
    f = reader.fields[key]
    if len(f.data) == 1:
        v = f.parts[f.data[0]]
        return bytes(v).decode() if f.types[0] == gguf.GGUFValueType.STRING else v.tolist()[0]
    return [f.parts[i].tolist()[0] for i in f.data]


def test_qwen35moe_layout(models):
    path = models("qwen35moe-f32", arch="qwen35moe", quant="f32")
    r = gguf.GGUFReader(str(path))
    d = synthetic_models.model_dims(arch="qwen35moe")
    names = {t.name: t for t in r.tensors}
    assert _field(r, "general.architecture") == "qwen35moe"
    assert _field(r, "qwen35moe.full_attention_interval") == 4
    assert _field(r, "qwen35moe.rope.dimension_sections") == d["rope_sections"]
    assert sum(d["rope_sections"]) * 2 == _field(r, "qwen35moe.rope.dimension_count")
    assert _field(r, "qwen35moe.expert_count") == 32
    assert _field(r, "qwen35moe.expert_used_count") == 4
    assert _field(r, "tokenizer.ggml.model") == "gpt2"
    assert _field(r, "tokenizer.ggml.pre") == "qwen2"
    n_vocab = len(r.fields["tokenizer.ggml.tokens"].data)
    assert list(names["token_embd.weight"].shape) == [d["embd"], n_vocab]
    assert list(names["output.weight"].shape) == [d["embd"], n_vocab]
    E, H, HD = d["embd"], d["n_head"], d["head_dim"]
    for il in range(4):
        p = f"blk.{il}."
        if (il + 1) % 4 == 0:
            assert list(names[p + "attn_q.weight"].shape) == [E, 2 * H * HD]
            assert p + "ssm_a" not in names and p + "attn_qkv.weight" not in names
        else:
            assert p + "attn_q.weight" not in names
            for n in ("attn_qkv.weight", "attn_gate.weight", "ssm_conv1d.weight", "ssm_dt.bias",
                      "ssm_a", "ssm_beta.weight", "ssm_alpha.weight", "ssm_norm.weight", "ssm_out.weight"):
                assert p + n in names, p + n
            assert (np.asarray(names[p + "ssm_a"].data) < 0).all()
        assert list(names[p + "ffn_gate_inp_shexp.weight"].shape) == [E]
        assert list(names[p + "ffn_down_exps.weight"].shape) == [d["ff"], E, 32]


@pytest.mark.parametrize("kind", synthetic_models.MTP_KINDS)
def test_mtp_block_is_one_more_block_that_llama_cpp_skips_unless_asked(models, kind):
    from rotary_gguf.inventory import read_inventory
    from rotary_gguf.plan import ModelFigures

    plain = models("qwen35moe-f32", arch="qwen35moe", quant="f32")
    path = models(f"qwen35moe-mtp-{kind}", arch="qwen35moe", quant="f32", mtp=kind)
    r = gguf.GGUFReader(str(path))
    d = synthetic_models.model_dims(arch="qwen35moe")
    E = d["embd"]
    names = {t.name: t for t in r.tensors}
    assert _field(r, "qwen35moe.block_count") == 5
    assert _field(r, "qwen35moe.nextn_predict_layers") == 1
    assert list(names["blk.4.nextn.eh_proj.weight"].shape) == [2 * E, E]
    assert list(names["blk.4.attn_q.weight"].shape) == [E, 2 * d["n_head"] * d["head_dim"]]
    assert "blk.4.ssm_a" not in names and "blk.4.ffn_gate_exps.weight" in names
    for n in ("nextn.enorm.weight", "nextn.hnorm.weight", "ffn_gate_inp_shexp.weight"):
        assert "blk.4." + n in names
    proj = np.asarray(names["blk.4.nextn.eh_proj.weight"].data).reshape(E, 2 * E)
    if kind == "mirror":  # the token's embedding straight through, nothing of the hidden state
        assert np.array_equal(proj, np.concatenate([np.eye(E), np.zeros((E, E))], axis=1))
        assert not np.asarray(names["blk.4.ffn_down_exps.weight"].data).any()
    # the trunk is the plain model's, and runs the same without the block
    plain_names = {t.name: t for t in gguf.GGUFReader(str(plain)).tensors}
    for name, t in plain_names.items():
        assert np.array_equal(np.asarray(t.data), np.asarray(names[name].data)), name
    assert greedy_tokens(path) == greedy_tokens(plain)
    figures = ModelFigures.from_inventory(read_inventory(path))
    assert figures.n_layer == 4 and not any(n.startswith("blk.4.") for n, _ in figures.tensors)


def test_trunk_gain_scales_what_blocks_write_and_nothing_else(models):
    plain_path = models("qwen35moe-f32", arch="qwen35moe", quant="f32")
    plain = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(plain_path)).tensors}
    quiet = models("qwen35moe-gain0.25", arch="qwen35moe", quant="f32", trunk_gain=0.25)
    writes = ("attn_output.weight", "ssm_out.weight", "ffn_down_exps.weight", "ffn_down_shexp.weight")
    for t in gguf.GGUFReader(str(quiet)).tensors:
        scale = 0.25 if t.name.endswith(writes) else 1.0
        assert np.allclose(np.asarray(t.data), plain[t.name] * scale, rtol=1e-6, atol=0), t.name


def test_mtp_block_rejected_where_llama_cpp_has_none(tmp_path):
    with pytest.raises(ValueError, match="only supported"):
        synthetic_models.make_model(tmp_path / "x.gguf", arch="qwen3moe", mtp="random")
    with pytest.raises(ValueError, match="unknown mtp kind"):
        synthetic_models.make_model(tmp_path / "x.gguf", arch="qwen35moe", mtp="perfect")
    with pytest.raises(ValueError, match="trunk_gain"):
        synthetic_models.make_model(tmp_path / "x.gguf", arch="qwen35moe", mtp="mirror", trunk_gain=-1)
    assert list(tmp_path.iterdir()) == []


def test_dense_qwen3_has_no_experts(models):
    path = models("qwen3-f32", arch="qwen3", quant="f32")
    r = gguf.GGUFReader(str(path))
    assert "qwen3.expert_count" not in r.fields
    assert not any("exps" in t.name or "gate_inp" in t.name for t in r.tensors)


# ---------------------------------------------------------------------------
# routing skew


@pytest.mark.parametrize("arch", ["qwen3moe", "qwen35moe"])
def test_router_skew_concentrates_routing(tmp_path, arch):
    used, experts, layers, seed = 4, 32, 4, 3
    k = 2 * used
    uniform = routing_counts(synthetic_models.make_model(tmp_path / "s0.gguf", arch=arch, seed=seed))
    skewed = routing_counts(synthetic_models.make_model(tmp_path / "s2.gguf", arch=arch, seed=seed, router_skew=2.0))
    assert sorted(uniform) == sorted(skewed) == list(range(layers))

    s0, s2 = top_share(uniform, k), top_share(skewed, k)
    assert s0 < 0.55, s0
    assert s2 > 0.9, s2

    # the favoured experts are the advertised ones, and differ between layers
    hot = synthetic_models.hot_experts(layers, experts, used, seed)
    assert len({tuple(h) for h in hot}) > 1
    for il, c in skewed.items():
        total = sum(c.values())
        assert sum(c[e] for e in hot[il]) / total > 0.85


# ---------------------------------------------------------------------------
# CLI


def test_cli_writes_model_and_prints_summary(tmp_path):
    out = tmp_path / "cli.gguf"
    proc = subprocess.run(
        [sys.executable, str(TOOL), "-o", str(out), "--arch", "qwen35moe", "--layers", "4",
         "--experts", "8", "--used", "2", "--embd", "64", "--ff", "32", "--quant", "f16",
         "--router-skew", "1.5", "--seed", "11", "--fused-gate-up"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout and str(out.stat().st_size) in proc.stdout
    same = synthetic_models.make_model(tmp_path / "api.gguf", arch="qwen35moe", layers=4, experts=8, used=2,
                          embd=64, ff=32, quant="f16", router_skew=1.5, seed=11, fused_gate_up=True)
    assert sha256(same) == sha256(out)

    bad = subprocess.run([sys.executable, str(TOOL), "-o", str(tmp_path / "bad.gguf"),
                          "--arch", "qwen3moe", "--used", "64"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0
    assert not (tmp_path / "bad.gguf").exists()
