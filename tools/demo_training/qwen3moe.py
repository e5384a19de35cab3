"""The demo model's qwen3moe architecture in torch: llama.cpp's qwen3moe graph
(src/models/qwen3moe.cpp, build_moe_ffn in llama-graph.cpp)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .qwen35moe import RMSNorm, moe_ffn, run_blocks
from .settings import Settings


def rope(x: torch.Tensor, base: float) -> torch.Tensor:
    """NEOX-style rotary embedding (pairs i, i + d/2) of x [batch, tokens, heads, head_dim]."""
    d = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, d // 2, dtype=torch.float64) * 2 / d)
    angle = torch.arange(x.shape[1], dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = angle.cos().float()[None, :, None, :], angle.sin().float()[None, :, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Block(nn.Module):
    def __init__(self, s: Settings):
        super().__init__()
        self.s = s
        E, HD, X, FF = s.embd, s.head_dim, s.experts, s.ff
        self.attn_norm = RMSNorm(E, s.rms_eps)
        self.attn_q = nn.Linear(E, s.heads * HD, bias=False)
        self.attn_k = nn.Linear(E, s.kv_heads * HD, bias=False)
        self.attn_v = nn.Linear(E, s.kv_heads * HD, bias=False)
        self.attn_output = nn.Linear(s.heads * HD, E, bias=False)
        self.attn_q_norm = RMSNorm(HD, s.rms_eps)
        self.attn_k_norm = RMSNorm(HD, s.rms_eps)
        self.ffn_norm = RMSNorm(E, s.rms_eps)
        self.ffn_gate_inp = nn.Linear(E, X, bias=False)
        self.ffn_gate_exps = nn.Parameter(torch.empty(X, FF, E))
        self.ffn_up_exps = nn.Parameter(torch.empty(X, FF, E))
        self.ffn_down_exps = nn.Parameter(torch.empty(X, E, FF))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns the block output, the aux load-balancing loss and the selected experts."""
        s = self.s
        B, T, E = x.shape
        h = self.attn_norm(x)
        q = self.attn_q_norm(self.attn_q(h).view(B, T, s.heads, s.head_dim))
        k = self.attn_k_norm(self.attn_k(h).view(B, T, s.kv_heads, s.head_dim))
        v = self.attn_v(h).view(B, T, s.kv_heads, s.head_dim)
        q, k = rope(q, s.rope_base), rope(k, s.rope_base)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
        )
        x = x + F.dropout(self.attn_output(a.transpose(1, 2).reshape(B, T, s.heads * s.head_dim)),
                          s.dropout, self.training)

        h = self.ffn_norm(x).view(B * T, E)
        y, aux, chosen = moe_ffn(h, self.ffn_gate_inp, self.ffn_gate_exps, self.ffn_up_exps,
                                 self.ffn_down_exps, s.used)
        return x + F.dropout(y.view(B, T, E), s.dropout, self.training), aux, chosen.view(B, T, s.used)


class DemoMoE(nn.Module):
    """Token embedding (tied with the output head), blocks, final norm."""

    def __init__(self, s: Settings):
        super().__init__()
        self.s = s
        self.token_embd = nn.Embedding(s.vocab, s.embd)
        self.blocks = nn.ModuleList(Block(s) for _ in range(s.layers))
        self.output_norm = RMSNorm(s.embd, s.rms_eps)
        self._init_weights()

    def _init_weights(self) -> None:
        out_std = 0.02 / math.sqrt(2 * self.s.layers)
        for name, p in self.named_parameters():
            if p.ndim < 2:
                continue
            std = out_std if name.endswith(("attn_output.weight", "ffn_down_exps")) else 0.02
            nn.init.normal_(p, std=std)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        x, aux, chosen = run_blocks(self.blocks, self.token_embd(tokens))
        return self.output_norm(x) @ self.token_embd.weight.T, aux, chosen
