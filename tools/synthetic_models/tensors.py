"""Every tensor of a test model, in file order: seeded random weights that keep the routing bias
channel for the routers alone."""

from __future__ import annotations

import math
import zlib
from typing import Callable, Dict, Iterator, Sequence, Tuple

import numpy as np

from .routing import BIAS_CHANNEL, BIAS_VALUE, ROUTER_SKEW_GAIN, hot_experts

# random attention mostly averages values over the context, which adds a
# component common to all tokens; keeping it small keeps routing token-specific
ATTN_OUT_GAIN = 0.5


class Weights:
    """Deterministic per-tensor random weights (depend on seed + name only)."""

    def __init__(self, seed: int) -> None:
        if seed < 0:
            raise ValueError("seed must be >= 0")
        self.seed = int(seed)

    def rng(self, name: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, zlib.crc32(name.encode())])

    def normal(self, name: str, shape: Sequence[int], std: float) -> np.ndarray:
        x = self.rng(name).standard_normal(tuple(shape), dtype=np.float32)
        return x * np.float32(std)

    def linear(self, name: str, n_out: int, n_in: int, gain: float = 1.0) -> np.ndarray:
        """numpy (n_out, n_in) == ggml ne {n_in, n_out}."""
        return self.normal(name, (n_out, n_in), gain / math.sqrt(n_in))

    def norm(self, name: str, n: int) -> np.ndarray:
        return np.float32(1.0) + self.normal(name, (n,), 0.02)

    def uniform(self, name: str, shape: Sequence[int], lo: float, hi: float) -> np.ndarray:
        return self.rng(name).uniform(lo, hi, size=tuple(shape)).astype(np.float32)


def no_bias_write(w: np.ndarray) -> np.ndarray:
    """Zero the output row of the bias channel (numpy axis -2 is ggml ne[1])."""
    w[..., BIAS_CHANNEL, :] = 0.0
    return w


def no_bias_read(w: np.ndarray) -> np.ndarray:
    """Zero the input column of the bias channel (numpy axis -1 is ggml ne[0]),
    so that only the router sees the constant."""
    w[..., BIAS_CHANNEL] = 0.0
    return w


def model_tensors(d: Dict[str, object], n_vocab: int, control_ids: Sequence[int],
                  seed: int, router_skew: float, fused_gate_up: bool,
                  routed_experts: Callable[[str, float], Iterator[Tuple[str, object]]] | None = None,
                  ) -> Iterator[Tuple[str, np.ndarray]]:
    """Every tensor in file order. ``routed_experts(prefix)``, when given, yields a block's routed
    expert tensors in place of the random f32 ones (``prefix`` is ``"blk.N."``; ``gain`` scales
    the experts' output)."""
    W = Weights(seed)
    arch = d["arch"]
    E = int(d["embd"])
    F = int(d["ff"])
    NH, NKV, HD = int(d["n_head"]), int(d["n_head_kv"]), int(d["head_dim"])
    X = int(d["experts"])

    emb = W.normal("token_embd.weight", (n_vocab, E), 1.0)
    emb[:, BIAS_CHANNEL] = BIAS_VALUE
    yield "token_embd.weight", emb

    hot = hot_experts(int(d["layers"]), X, int(d["used"]), seed) if d["moe"] else None

    layers, mirror = int(d["layers"]), d.get("mtp") == "mirror"
    for il in range(layers + int(d.get("nextn", 0))):
        p = f"blk.{il}."
        nextn = il >= layers  # the MTP block: full attention + MoE, and the nextn tensors
        # how much the block writes into the residual stream (a mirror head: nothing)
        gain = (0.0 if mirror else 1.0) if nextn else float(d.get("trunk_gain", 1.0))
        yield p + "attn_norm.weight", W.norm(p + "attn_norm.weight", E)

        if not nextn and d["recurrent"][il]:
            # Gated DeltaNet (linear attention)
            ds, ng, nv, kc = (int(d["ssm_d_state"]), int(d["ssm_n_group"]),
                              int(d["ssm_dt_rank"]), int(d["ssm_d_conv"]))
            key_dim, value_dim = ds * ng, ds * nv
            conv_dim = 2 * key_dim + value_dim
            yield p + "attn_qkv.weight", no_bias_read(W.linear(p + "attn_qkv.weight", conv_dim, E))
            yield p + "attn_gate.weight", no_bias_read(W.linear(p + "attn_gate.weight", value_dim, E))
            yield p + "ssm_conv1d.weight", W.normal(p + "ssm_conv1d.weight", (conv_dim, kc), 1.0 / math.sqrt(kc))
            yield p + "ssm_dt.bias", np.float32(1.0) + W.normal(p + "ssm_dt.bias", (nv,), 0.1)
            # ssm_a = -exp(A_log) < 0 so that the decay exp(softplus(.) * a) is in (0, 1)
            yield p + "ssm_a", -W.uniform(p + "ssm_a", (nv,), 0.5, 8.0)
            yield p + "ssm_beta.weight", no_bias_read(W.linear(p + "ssm_beta.weight", nv, E))
            yield p + "ssm_alpha.weight", no_bias_read(W.linear(p + "ssm_alpha.weight", nv, E))
            yield p + "ssm_norm.weight", W.norm(p + "ssm_norm.weight", ds)
            yield p + "ssm_out.weight", no_bias_write(W.linear(p + "ssm_out.weight", E, value_dim, gain))
        else:
            if arch == "qwen35moe":
                # query and output gate interleaved per head: [q_h, gate_h] x n_head
                q_out = 2 * NH * HD
            else:
                q_out = NH * HD
            yield p + "attn_q.weight", no_bias_read(W.linear(p + "attn_q.weight", q_out, E))
            yield p + "attn_k.weight", no_bias_read(W.linear(p + "attn_k.weight", NKV * HD, E))
            yield p + "attn_v.weight", no_bias_read(W.linear(p + "attn_v.weight", NKV * HD, E))
            yield p + "attn_output.weight", no_bias_write(W.linear(p + "attn_output.weight", E, NH * HD, gain * ATTN_OUT_GAIN))
            yield p + "attn_q_norm.weight", W.norm(p + "attn_q_norm.weight", HD)
            yield p + "attn_k_norm.weight", W.norm(p + "attn_k_norm.weight", HD)

        if arch == "qwen35moe":
            yield p + "post_attention_norm.weight", W.norm(p + "post_attention_norm.weight", E)
        else:
            yield p + "ffn_norm.weight", W.norm(p + "ffn_norm.weight", E)

        if not d["moe"]:
            yield p + "ffn_gate.weight", no_bias_read(W.linear(p + "ffn_gate.weight", F, E))
            yield p + "ffn_up.weight", no_bias_read(W.linear(p + "ffn_up.weight", F, E))
            yield p + "ffn_down.weight", no_bias_write(W.linear(p + "ffn_down.weight", E, F))
            continue

        # router: nothing reads the bias channel except the hot experts' boost
        router = W.linear(p + "ffn_gate_inp.weight", X, E)
        router[:, BIAS_CHANNEL] = 0.0
        if router_skew and not nextn:
            router[hot[il], BIAS_CHANNEL] = np.float32(router_skew * ROUTER_SKEW_GAIN)
        yield p + "ffn_gate_inp.weight", router

        if routed_experts is not None:
            yield from routed_experts(p, gain)
        else:
            yield from _f32_experts(W, p, X, F, E, fused_gate_up, gain)

        if arch == "qwen35moe":
            FS = int(d["ff_shexp"])
            yield p + "ffn_gate_inp_shexp.weight", no_bias_read(W.normal(p + "ffn_gate_inp_shexp.weight", (E,), 1.0 / math.sqrt(E)))
            yield p + "ffn_gate_shexp.weight", no_bias_read(W.linear(p + "ffn_gate_shexp.weight", FS, E))
            yield p + "ffn_up_shexp.weight", no_bias_read(W.linear(p + "ffn_up_shexp.weight", FS, E))
            yield p + "ffn_down_shexp.weight", no_bias_write(W.linear(p + "ffn_down_shexp.weight", E, FS, gain))
        if nextn:
            yield from _nextn_tensors(W, p, E, mirror)

    yield "output_norm.weight", W.norm("output_norm.weight", E)
    out = W.linear("output.weight", n_vocab, E)
    out[:, BIAS_CHANNEL] = 0.0
    # control tokens get logit 0, which a greedy sampler never picks over the
    # random logits of the ordinary tokens, so generation never stops early
    out[list(control_ids), :] = 0.0
    yield "output.weight", out


def _nextn_tensors(W: Weights, p: str, E: int, mirror: bool) -> Iterator[Tuple[str, np.ndarray]]:
    """The MTP block's own tensors (its LM head and norm are the model's). The block's input is
    eh_proj([enorm(token embedding), hnorm(target hidden state)]); with ``mirror`` it keeps just
    the token embedding, so the head predicts what the trunk would say from that token alone."""
    if mirror:
        proj = np.concatenate([np.eye(E, dtype=np.float32), np.zeros((E, E), dtype=np.float32)], axis=1)
        enorm = np.ones(E, dtype=np.float32)
    else:
        proj = W.linear(p + "nextn.eh_proj.weight", E, 2 * E)
        enorm = W.norm(p + "nextn.enorm.weight", E)
    yield p + "nextn.eh_proj.weight", proj
    yield p + "nextn.enorm.weight", enorm
    yield p + "nextn.hnorm.weight", W.norm(p + "nextn.hnorm.weight", E)


def _f32_experts(W: Weights, p: str, X: int, F: int, E: int, fused_gate_up: bool, gain: float = 1.0
                 ) -> Iterator[Tuple[str, np.ndarray]]:
    """One block's routed experts, random f32 (their output scaled by ``gain``)."""
    # numpy (n_expert, n_out, n_in) == ggml {n_in, n_out, n_expert}
    gate = no_bias_read(W.normal(p + "ffn_gate_exps.weight", (X, F, E), 1.0 / math.sqrt(E)))
    up = no_bias_read(W.normal(p + "ffn_up_exps.weight", (X, F, E), 1.0 / math.sqrt(E)))
    down = no_bias_write(W.normal(p + "ffn_down_exps.weight", (X, E, F), gain / math.sqrt(F)))
    if fused_gate_up:
        # per expert: rows [0, ff) are gate, rows [ff, 2ff) are up
        yield p + "ffn_gate_up_exps.weight", np.concatenate([gate, up], axis=1)
    else:
        yield p + "ffn_gate_exps.weight", gate
        yield p + "ffn_up_exps.weight", up
    yield p + "ffn_down_exps.weight", down


def keep_f32(name: str, arr: np.ndarray) -> bool:
    """Tensors llama.cpp expects in f32 (mirrors convert_hf_to_gguf)."""
    return (
        arr.ndim <= 1
        or name.endswith("_norm.weight")
        or ".ffn_gate_inp." in name
        or ".ffn_gate_inp_shexp." in name
        or ".ssm_conv1d." in name
    )


# ---------------------------------------------------------------------------
# writing
