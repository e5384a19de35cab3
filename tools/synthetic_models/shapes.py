"""A test model's hyper-parameters: architecture, widths, attention layout and its MTP block."""

from __future__ import annotations

import math
from typing import Dict, List

ARCHS = ("qwen3moe", "qwen35moe", "qwen3")
# Multi-token-prediction blocks: "random" weights (its drafts are mostly rejected), or "mirror":
# the block passes the token's embedding straight to the LM head, so it drafts what the trunk
# would predict from that token alone, which the model often agrees with.
MTP_KINDS = ("random", "mirror")

DEFAULT_LAYERS = 4
DEFAULT_EXPERTS = 32
DEFAULT_USED = 4
DEFAULT_EMBD = 64
DEFAULT_FF = 32
# K-quants (Q4_K/Q6_K) work on 256-wide blocks along a row.
DEFAULT_EMBD_KQUANT = 256
DEFAULT_FF_KQUANT = 256

CONTEXT_LENGTH = 4096
RMS_EPS = 1e-6


def _rope_sections(n_pairs: int) -> List[int]:
    """Split ``n_pairs`` rotary pairs over (t, h, w) like Qwen3.5's [11,11,10]."""
    base, rem = divmod(n_pairs, 3)
    secs = [base + (1 if i < rem else 0) for i in range(3)]
    return secs + [0]


def model_dims(
    *,
    arch: str = "qwen3moe",
    layers: int = DEFAULT_LAYERS,
    experts: int = DEFAULT_EXPERTS,
    used: int = DEFAULT_USED,
    embd: int = DEFAULT_EMBD,
    ff: int = DEFAULT_FF,
) -> Dict[str, object]:
    """All derived hyper-parameters of a generated model."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    if layers < 1:
        raise ValueError("layers must be >= 1")
    if embd < 16 or embd % 8:
        raise ValueError("embd must be a multiple of 8 and >= 16")
    if ff < 1:
        raise ValueError("ff must be >= 1")
    moe = arch != "qwen3"
    if moe:
        if experts < 2 or experts > 512:
            raise ValueError("experts must be in [2, 512]")
        if used < 1 or used > experts:
            raise ValueError("used must be in [1, experts]")

    d: Dict[str, object] = {
        "arch": arch,
        "moe": moe,
        "layers": layers,
        "embd": embd,
        "ff": ff,
        "experts": experts if moe else 0,
        "used": used if moe else 0,
        "n_head": 4,
        "n_head_kv": 2,
    }
    if arch == "qwen35moe" and layers < 4:
        # llama.cpp aborts (GGML_ASSERT(buffer) in ggml-backend) when a hybrid
        # model has no full-attention block, i.e. an empty KV cache
        raise ValueError("qwen35moe needs layers >= 4 (block 3 is the first full-attention block)")
    if arch == "qwen35moe":
        # real: n_embd 2048, head_dim 256, rope dims 64 (partial 0.25),
        # sections [11, 11, 10, 0], linear attn: 16 k-heads, 32 v-heads, dim 128
        head_dim = max(16, embd // 2)
        n_rot = max(4, head_dim // 4)
        d.update(
            head_dim=head_dim,
            n_rot=n_rot,
            rope_sections=_rope_sections(n_rot // 2),
            rope_base=1e7,
            full_attention_interval=4,
            ff_shexp=ff,
            ssm_d_state=max(8, head_dim // 2),
            ssm_n_group=2,
            ssm_dt_rank=4,
            ssm_d_conv=4,
        )
        d["ssm_d_inner"] = d["ssm_d_state"] * d["ssm_dt_rank"]
        d["recurrent"] = [(i + 1) % 4 != 0 for i in range(layers)]
    else:
        # real Qwen3-30B-A3B: n_embd 2048, 32 heads, 4 kv heads, head_dim 128
        head_dim = max(16, embd // 4)
        d.update(head_dim=head_dim, n_rot=head_dim, rope_base=1e6)
        d["recurrent"] = [False] * layers
    return d


def add_mtp(d: Dict[str, object], mtp: str | None, trunk_gain: float = 1.0) -> None:
    """Give the model ``d`` one multi-token-prediction (nextn) block of kind ``mtp``, and scale what
    its trunk blocks write into the residual stream by ``trunk_gain``: below 1 the model leans on
    the last token alone, as a mirror head does, so more of its drafts are accepted (to measure
    drafts at a trained head's acceptance rate)."""
    if not math.isfinite(trunk_gain) or trunk_gain < 0:
        raise ValueError("trunk_gain must be a finite value >= 0")
    d["trunk_gain"] = float(trunk_gain)
    if mtp is None:
        return
    if mtp not in MTP_KINDS:
        raise ValueError(f"unknown mtp kind {mtp!r}; expected one of {MTP_KINDS}")
    if d["arch"] != "qwen35moe":
        raise ValueError("an MTP block is only supported for arch 'qwen35moe'")
    d.update(nextn=1, mtp=mtp)
