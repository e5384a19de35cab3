"""The demo model's qwen35moe architecture in torch, computing what llama.cpp's qwen35moe graph
computes (src/models/qwen35moe.cpp, delta-net-base.cpp, build_moe_ffn in llama-graph.cpp), and
its multi-token-prediction (MTP, NextN) head: train_demo_model.py's ``--arch qwen35moe``.

Block ``i`` is Gated DeltaNet (linear attention with a short causal convolution) unless ``i + 1`` is
a multiple of ``ATTN_INTERVAL``, then gated full attention with partial rotary embedding; every
block has routed experts and a shared expert behind a sigmoid gate, each after a post-attention
norm. The MTP head is one more full-attention block over ``eh_proj([enorm(embedding of token p),
hnorm(trunk's normed hidden state at p - 1)])``, read through its own norm and the tied LM head:
it predicts token p + 1 one position before the trunk does.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ATTN_INTERVAL = 4  # llama.cpp's default full_attention_interval
CONV_KERNEL = 4
CHUNK = 64  # tokens per chunk of the DeltaNet's chunked form


class RMSNorm(nn.Module):
    def __init__(self, n: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def moe_ffn(h: torch.Tensor, router: nn.Linear, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
            used: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Routed SwiGLU experts of tokens h [n, E] (softmax, top-`used`, weights renormalised):
    the output, the Switch-Transformer balance loss and the chosen experts [n, used]."""
    n_expert = gate.shape[0]
    probs = torch.softmax(router(h), dim=-1)
    weights, chosen = probs.topk(used, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    flat = chosen.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=n_expert)
    token_of = order // used
    weight_of = weights.reshape(-1)[order]
    y = torch.zeros_like(h)
    start = 0
    # unbound views: backward stacks the experts' gradients once instead of a full-size zero tensor per expert
    gates, ups, downs = gate.unbind(0), up.unbind(0), down.unbind(0)
    for e, n in enumerate(counts.tolist()):
        if n == 0:
            continue
        tok = token_of[start : start + n]
        xs = h[tok]
        out = (F.silu(xs @ gates[e].T) * (xs @ ups[e].T)) @ downs[e].T
        y.index_add_(0, tok, out * weight_of[start : start + n, None])
        start += n
    # experts' share of selections times their mean probability
    aux = n_expert * (counts.float() / flat.numel() * probs.mean(0)).sum()
    return y, aux, chosen


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """`x` through each block in turn: the last hidden state, the blocks' mean balance loss and each
    block's chosen experts (both demo models' trunks)."""
    aux, chosen = x.new_zeros(()), []
    for block in blocks:
        x, a, c = block(x)
        aux = aux + a
        chosen.append(c)
    return x, aux / len(blocks), chosen


def rope_dims(s) -> int:
    """Rotary dimensions per head: a quarter, as Qwen3.5/3.6 rotate 64 of 256."""
    return max(4, s.head_dim // 4)


def rope_sections(n_pairs: int) -> list[int]:
    """The M-RoPE sections (time, height, width, extra) over `n_pairs` rotary pairs."""
    base, rem = divmod(n_pairs, 3)
    return [base + (1 if i < rem else 0) for i in range(3)] + [0]


def imrope(x: torch.Tensor, n_rot: int, base: float) -> torch.Tensor:
    """ggml's interleaved M-RoPE for text (time, height and width positions all the token's, the
    extra one 0) on the first `n_rot` dims of x [batch, tokens, heads, head_dim], NEOX pairs."""
    secs = rope_sections(n_rot // 2)
    pairs = torch.arange(n_rot // 2)
    sector = pairs % sum(secs)
    moves = torch.zeros(n_rot // 2, dtype=torch.bool)
    for r in range(3):  # sector % 3 == r takes section r's position while within 3 * section
        moves |= (sector % 3 == r) & (sector < 3 * secs[r])
    inv_freq = base ** (-pairs.double() * 2 / n_rot) * moves.double()
    angle = torch.arange(x.shape[1], dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = angle.cos().float()[None, :, None, :], angle.sin().float()[None, :, None, :]
    half = n_rot // 2
    x1, x2, rest = x[..., :half], x[..., half:n_rot], x[..., n_rot:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def l2_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """llama.cpp's GDN L2 norm: x / sqrt(sum(x^2) + eps)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def gated_delta_rule(q, k, v, g, beta, chunk: int = CHUNK) -> torch.Tensor:
    """Outputs o_t = S_t q_t of S_t = exp(g_t) S_{t-1} (I - b_t k_t k_t^T) + b_t v_t k_t^T, for
    q, k, v [B, H, T, D] and g, beta [B, H, T], in chunks: within a chunk the state updates form
    a unit lower-triangular system (the WY form), solved at once; the state passes between chunks."""
    B, H, T, D = q.shape
    pad = (-T) % chunk
    if pad:  # g = 0, beta = 0: the padded steps leave the state as it is
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        g, beta = F.pad(g, (0, pad)), F.pad(beta, (0, pad))
    N = (T + pad) // chunk
    q, k, v = (t.reshape(B, H, N, chunk, D) for t in (q, k, v))
    G = g.reshape(B, H, N, chunk).cumsum(-1)
    beta = beta.reshape(B, H, N, chunk)
    lower = torch.ones(chunk, chunk, dtype=torch.bool).tril()
    decay = torch.where(lower, G[..., :, None] - G[..., None, :], -math.inf).exp()  # exp(G_i - G_j), j <= i
    kb = k * beta[..., None]
    eye = torch.eye(chunk)
    system = eye + (kb @ k.transpose(-1, -2) * decay).tril(-1)
    u = torch.linalg.solve_triangular(system, v * beta[..., None], upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(system, kb * G.exp()[..., None], upper=False, unitriangular=True)
    qk = q @ k.transpose(-1, -2) * decay
    state = q.new_zeros(B, H, D, D)  # S^T: [key dim, value dim]
    out = []
    for n in range(N):
        fresh = u[:, :, n] - w[:, :, n] @ state
        out.append((q[:, :, n] * G[:, :, n].exp()[..., None]) @ state + qk[:, :, n] @ fresh)
        last = G[:, :, n, -1:]
        state = (state * last.exp()[..., None]
                 + (k[:, :, n] * (last - G[:, :, n]).exp()[..., None]).transpose(-1, -2) @ fresh)
    return torch.stack(out, dim=2).reshape(B, H, N * chunk, D)[:, :, :T]


class DeltaNet(nn.Module):
    """Gated DeltaNet: q, k, v through a causal depthwise convolution and SiLU, L2-normed q and k,
    the gated delta rule per head, then an RMS norm gated by SiLU(z)."""

    def __init__(self, s):
        super().__init__()
        self.s = s
        E, D, H = s.embd, s.head_dim, s.heads
        self.attn_qkv = nn.Linear(E, 3 * H * D, bias=False)
        self.attn_gate = nn.Linear(E, H * D, bias=False)
        self.ssm_conv1d = nn.Parameter(torch.empty(3 * H * D, CONV_KERNEL))
        self.ssm_beta = nn.Linear(E, H, bias=False)
        self.ssm_alpha = nn.Linear(E, H, bias=False)
        self.ssm_dt = nn.Parameter(torch.empty(H))  # bias of alpha
        self.a_log = nn.Parameter(torch.empty(H))  # exported as ssm_a = -exp(a_log)
        self.ssm_norm = RMSNorm(D, s.rms_eps)
        self.ssm_out = nn.Linear(H * D, E, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.s
        B, T, _ = x.shape
        H, D = s.heads, s.head_dim
        qkv = F.conv1d(F.pad(self.attn_qkv(x).transpose(1, 2), (CONV_KERNEL - 1, 0)),
                       self.ssm_conv1d[:, None, :], groups=self.ssm_conv1d.shape[0])
        qkv = F.silu(qkv).transpose(1, 2).reshape(B, T, 3, H, D)
        q = l2_normalize(qkv[:, :, 0], s.rms_eps) / math.sqrt(D)
        k = l2_normalize(qkv[:, :, 1], s.rms_eps)
        beta = torch.sigmoid(self.ssm_beta(x))
        g = F.softplus(self.ssm_alpha(x) + self.ssm_dt) * -self.a_log.exp()
        o = gated_delta_rule(q.transpose(1, 2), k.transpose(1, 2), qkv[:, :, 2].transpose(1, 2),
                             g.transpose(1, 2), beta.transpose(1, 2)).transpose(1, 2)
        z = self.attn_gate(x).view(B, T, H, D)
        return self.ssm_out((self.ssm_norm(o) * F.silu(z)).reshape(B, T, H * D))


class GatedAttention(nn.Module):
    """Full attention with per-head q and k norms, partial M-RoPE and a sigmoid output gate that
    attn_q projects next to each head's query."""

    def __init__(self, s):
        super().__init__()
        self.s = s
        E, D = s.embd, s.head_dim
        self.attn_q = nn.Linear(E, 2 * s.heads * D, bias=False)
        self.attn_k = nn.Linear(E, s.kv_heads * D, bias=False)
        self.attn_v = nn.Linear(E, s.kv_heads * D, bias=False)
        self.attn_output = nn.Linear(s.heads * D, E, bias=False)
        self.attn_q_norm = RMSNorm(D, s.rms_eps)
        self.attn_k_norm = RMSNorm(D, s.rms_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.s
        B, T, _ = x.shape
        qg = self.attn_q(x).view(B, T, s.heads, 2 * s.head_dim)
        q, gate = self.attn_q_norm(qg[..., : s.head_dim]), qg[..., s.head_dim :]
        k = self.attn_k_norm(self.attn_k(x).view(B, T, s.kv_heads, s.head_dim))
        v = self.attn_v(x).view(B, T, s.kv_heads, s.head_dim)
        q, k = imrope(q, rope_dims(s), s.rope_base), imrope(k, rope_dims(s), s.rope_base)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=True).transpose(1, 2)
        return self.attn_output((a * torch.sigmoid(gate)).reshape(B, T, s.heads * s.head_dim))


class Block(nn.Module):
    """attn_norm -> mixer -> residual; post_attention_norm -> routed + gated shared experts -> residual."""

    def __init__(self, s, recurrent: bool):
        super().__init__()
        self.s = s
        E, X, FF = s.embd, s.experts, s.ff
        self.attn_norm = RMSNorm(E, s.rms_eps)
        self.mixer = DeltaNet(s) if recurrent else GatedAttention(s)
        self.post_attention_norm = RMSNorm(E, s.rms_eps)
        self.ffn_gate_inp = nn.Linear(E, X, bias=False)
        self.ffn_gate_exps = nn.Parameter(torch.empty(X, FF, E))
        self.ffn_up_exps = nn.Parameter(torch.empty(X, FF, E))
        self.ffn_down_exps = nn.Parameter(torch.empty(X, E, FF))
        self.ffn_gate_inp_shexp = nn.Parameter(torch.zeros(E))
        self.ffn_gate_shexp = nn.Linear(E, FF, bias=False)
        self.ffn_up_shexp = nn.Linear(E, FF, bias=False)
        self.ffn_down_shexp = nn.Linear(FF, E, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self.s
        B, T, E = x.shape
        x = x + F.dropout(self.mixer(self.attn_norm(x)), s.dropout, self.training)
        h = self.post_attention_norm(x).view(B * T, E)
        y, aux, chosen = moe_ffn(h, self.ffn_gate_inp, self.ffn_gate_exps, self.ffn_up_exps,
                                 self.ffn_down_exps, s.used)
        shared = self.ffn_down_shexp(F.silu(self.ffn_gate_shexp(h)) * self.ffn_up_shexp(h))
        y = y + shared * torch.sigmoid(h @ self.ffn_gate_inp_shexp)[:, None]
        return x + F.dropout(y.view(B, T, E), s.dropout, self.training), aux, chosen.view(B, T, s.used)


class Qwen35MoE(nn.Module):
    """Token embedding (tied with the LM head), the blocks, the final norm, and the MTP head."""

    def __init__(self, s):
        super().__init__()
        self.s = s
        E = s.embd
        self.token_embd = nn.Embedding(s.vocab, E)
        self.blocks = nn.ModuleList(Block(s, (i + 1) % ATTN_INTERVAL != 0) for i in range(s.layers))
        self.output_norm = RMSNorm(E, s.rms_eps)
        self.mtp = Block(s, recurrent=False)
        self.mtp_eh_proj = nn.Linear(2 * E, E, bias=False)
        self.mtp_enorm = RMSNorm(E, s.rms_eps)
        self.mtp_hnorm = RMSNorm(E, s.rms_eps)
        self.mtp_head_norm = RMSNorm(E, s.rms_eps)
        self._init_weights()

    def _init_weights(self) -> None:
        out_std = 0.02 / math.sqrt(2 * (self.s.layers + 1))
        for name, p in self.named_parameters():
            if name.endswith("ssm_conv1d"):
                nn.init.uniform_(p, -1 / math.sqrt(CONV_KERNEL), 1 / math.sqrt(CONV_KERNEL))
            elif name.endswith("a_log"):  # decay rates exp(a_log) in [1, 16], as Mamba 2 and GDN start
                with torch.no_grad():
                    p.copy_(torch.empty_like(p).uniform_(1, 16).log())
            elif name.endswith("ssm_dt"):  # softplus(ssm_dt) log-uniform in [1e-3, 0.1]
                with torch.no_grad():
                    dt = torch.empty_like(p).uniform_(math.log(1e-3), math.log(0.1)).exp()
                    p.copy_(dt + torch.log(-torch.expm1(-dt)))
            elif p.ndim >= 2:
                down = name.endswith(("attn_output.weight", "ssm_out.weight", "ffn_down_exps",
                                      "ffn_down_shexp.weight"))
                nn.init.normal_(p, std=out_std if down else 0.02)

    def trunk(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """The normed last hidden state (what llama.cpp hands the MTP head), the mean balance loss
        and each block's chosen experts."""
        x, aux, chosen = run_blocks(self.blocks, self.token_embd(tokens))
        return self.output_norm(x), aux, chosen

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        hidden, aux, chosen = self.trunk(tokens)
        return hidden @ self.token_embd.weight.T, aux, chosen

    def mtp_logits(self, tokens: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's logits at each position p (for token p + 1) from the token at p and the trunk's
        `hidden` state at p - 1 (zeros before the first, as the engine gives it), and its balance loss."""
        before = torch.cat([hidden.new_zeros(hidden[:, :1].shape), hidden[:, :-1]], dim=1)
        x = self.mtp_eh_proj(torch.cat([self.mtp_enorm(self.token_embd(tokens)), self.mtp_hnorm(before)], -1))
        x, aux, _ = self.mtp(x)
        return self.mtp_head_norm(x) @ self.token_embd.weight.T, aux

    def gguf_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The weights under llama.cpp's qwen35moe names (numpy shapes are ggml's ne reversed); the
        MTP head is block `layers`."""
        yield "token_embd.weight", self.token_embd.weight
        for i, b in enumerate([*self.blocks, self.mtp]):
            p = f"blk.{i}."
            yield p + "attn_norm.weight", b.attn_norm.weight
            m = b.mixer
            if isinstance(m, DeltaNet):
                for name in ("attn_qkv", "attn_gate", "ssm_beta", "ssm_alpha", "ssm_norm", "ssm_out"):
                    yield p + name + ".weight", getattr(m, name).weight
                yield p + "ssm_conv1d.weight", m.ssm_conv1d
                yield p + "ssm_dt.bias", m.ssm_dt
                yield p + "ssm_a", -m.a_log.exp()
            else:
                for name in ("attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm", "attn_k_norm"):
                    yield p + name + ".weight", getattr(m, name).weight
            yield p + "post_attention_norm.weight", b.post_attention_norm.weight
            yield p + "ffn_gate_inp.weight", b.ffn_gate_inp.weight
            for name in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_gate_inp_shexp"):
                yield p + name + ".weight", getattr(b, name)
            for name in ("ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"):
                yield p + name + ".weight", getattr(b, name).weight
        p = f"blk.{self.s.layers}.nextn."
        yield p + "eh_proj.weight", self.mtp_eh_proj.weight
        yield p + "enorm.weight", self.mtp_enorm.weight
        yield p + "hnorm.weight", self.mtp_hnorm.weight
        yield p + "shared_head_norm.weight", self.mtp_head_norm.weight
        yield "output_norm.weight", self.output_norm.weight


def add_hparams(w, s) -> None:
    """qwen35moe's keys beyond qwen3moe's: the MTP block, partial M-RoPE, the shared expert and
    the DeltaNet's sizes (as many key as value heads, each head_dim wide)."""
    arch = "qwen35moe"
    w.add_block_count(s.layers + 1)
    w.add_uint32(f"{arch}.nextn_predict_layers", 1)
    w.add_rope_dimension_count(rope_dims(s))
    w.add_rope_dimension_sections(rope_sections(rope_dims(s) // 2))
    w.add_expert_shared_feed_forward_length(s.ff)
    w.add_full_attention_interval(ATTN_INTERVAL)
    w.add_ssm_conv_kernel(CONV_KERNEL)
    w.add_ssm_inner_size(s.heads * s.head_dim)
    w.add_ssm_state_size(s.head_dim)
    w.add_ssm_time_step_rank(s.heads)
    w.add_ssm_group_count(s.heads)


# ---------------------------------------------------------------------------------------------
# report: the MTP head in torch and through the engine's --draft mtp


@torch.no_grad()
def mtp_heldout(model: Qwen35MoE, stream, seq_len: int) -> dict:
    """Over consecutive held-out windows (torch): the head's perplexity for the token after next
    as seen from the trunk, and how often its top token is the trunk's own next pick (what a greedy
    draft needs to be accepted)."""
    nll, agree, count = 0.0, 0, 0
    for w in range((len(stream) - 1) // seq_len):
        chunk = torch.from_numpy(stream[w * seq_len : (w + 1) * seq_len + 1].astype(np.int64))
        hidden, _, _ = model.trunk(chunk[None, :-1])
        logits, _ = model.mtp_logits(chunk[None, :-1], hidden)
        nll += F.cross_entropy(logits[0], chunk[1:], reduction="sum").item()
        agree += int((logits[0].argmax(-1) == (hidden[0] @ model.token_embd.weight.T).argmax(-1)).sum())
        count += seq_len
    return {"tokens": count, "mtp_perplexity": round(math.exp(nll / max(1, count)), 2),
            "agreement_with_trunk": round(agree / max(1, count), 3)}


@torch.no_grad()
def mtp_logit_check(path, model: Qwen35MoE, tokens: list[int]) -> dict:
    """llama.cpp's MTP head (the engine's drafter) against torch's at every position: the draft
    for token p + 1 once the target has evaluated the tokens before p."""
    from rotary_gguf.engine import Engine

    t = torch.tensor([tokens])
    ref = model.mtp_logits(t, model.trunk(t)[0])[0][0].numpy()
    got = []
    with Engine.load(path, n_ctx=len(tokens), n_threads=1, draft="mtp", draft_max=1) as engine:
        for p, token in enumerate(tokens):
            engine.drafter.draft(token, p, 1)
            got.append(engine.drafter.logits().copy())
            engine.eval([token])
    got = np.stack(got)
    diff = np.abs(got - ref)
    return {"tokens": len(tokens), "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "logit_range": float(np.abs(ref).max()), "argmax_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean())}


def mtp_acceptance(path, prompts: list[list[int]], n_tokens: int, draft_max: int = 3) -> dict:
    """Greedy generations after held-out prompts through the engine with `--draft mtp`: the share
    of drafts accepted, drafts accepted per round, and whether the text equals the one without drafts."""
    from rotary_gguf.engine import Engine

    def run(**draft) -> tuple[list[list[int]], list]:
        with Engine.load(path, n_threads=1, **draft) as engine:
            outs, stats = [], []
            for prompt in prompts:
                events = list(engine.generate(prompt, max_tokens=n_tokens))
                outs.append([e.token for e in events if e.token is not None])
                stats.append(events[-1].stats)
        return outs, stats

    plain, _ = run()
    drafted, stats = run(draft="mtp", draft_max=draft_max)
    n_drafted, accepted = sum(x.drafted_tokens for x in stats), sum(x.draft_accepted for x in stats)
    rounds = sum(x.draft_rounds for x in stats)
    return {"prompts": len(prompts), "generated_tokens": sum(map(len, drafted)), "draft_max": draft_max,
            "drafted": n_drafted, "accepted": accepted,
            "acceptance": round(accepted / n_drafted, 3) if n_drafted else None,
            "accepted_per_round": round(accepted / rounds, 2) if rounds else None,
            "same_as_without_drafts": drafted == plain}
