"""Training: seeded batches, the learning-rate schedule, the optimizer, the held-out loss, and
checkpoints that a run with the same settings resumes from."""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import time

import numpy as np
import torch
import torch.nn.functional as F

from .qwen3moe import DemoMoE
from .settings import Settings


def batch_at(stream: np.ndarray, step: int, s: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of the training stream; depends only on (seed, step), so resuming is exact."""
    rng = np.random.default_rng([s.seed, 2, step])
    starts = rng.integers(0, len(stream) - s.seq_len - 1, size=s.batch)
    windows = np.stack([stream[i : i + s.seq_len + 1] for i in starts]).astype(np.int64)
    t = torch.from_numpy(windows)
    return t[:, :-1], t[:, 1:]


def lr_at(step: int, s: Settings) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: DemoMoE, s: Settings) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=s.lr, betas=(0.9, 0.95),
    )


@torch.no_grad()
def heldout_nll(model: DemoMoE, stream: np.ndarray, seq_len: int, max_windows: int = 0) -> float:
    """Mean next-token negative log-likelihood over consecutive windows of the held-out stream."""
    total, count = 0.0, 0
    n_windows = (len(stream) - 1) // seq_len
    if max_windows:
        n_windows = min(n_windows, max_windows)
    for w in range(n_windows):
        chunk = torch.from_numpy(stream[w * seq_len : (w + 1) * seq_len + 1].astype(np.int64))
        logits, _, _ = model(chunk[None, :-1])
        total += F.cross_entropy(logits[0], chunk[1:], reduction="sum").item()
        count += seq_len
    return total / max(1, count)


def train(model: DemoMoE, train_stream: np.ndarray, held_stream: np.ndarray, s: Settings,
          work_dir: pathlib.Path, checkpoint_every: int, eval_every: int) -> dict:
    """Train to s.steps, resuming from work_dir/checkpoint.pt when its settings match."""
    opt = make_optimizer(model, s)
    ckpt_path = work_dir / "checkpoint.pt"
    step, seconds = 0, 0.0
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=False)
        if ckpt["settings"] == dataclasses.asdict(s):
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            step, seconds = ckpt["step"], ckpt["seconds"]
            print(f"resuming at step {step} ({seconds / 60:.1f} min trained)", flush=True)
    model.train()
    t_last = time.perf_counter()
    while step < s.steps:
        inputs, targets = batch_at(train_stream, step, s)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, s)
        if s.arch == "qwen35moe":
            hidden, aux, _ = model.trunk(inputs)
            logits = hidden @ model.token_embd.weight.T
            # the head reads the trunk's states without training them; the tied embedding learns from both
            mtp_logits, mtp_aux = model.mtp_logits(inputs, hidden.detach())
            mtp = F.cross_entropy(mtp_logits.reshape(-1, s.vocab), targets.reshape(-1))
            extra, aux = s.mtp_loss * mtp, aux + mtp_aux / s.layers
        else:
            logits, aux, _ = model(inputs)
            extra = mtp = logits.new_zeros(())
        loss = F.cross_entropy(logits.reshape(-1, s.vocab), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        (loss + extra + s.aux_loss * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        now = time.perf_counter()
        seconds += now - t_last
        t_last = now
        if step % 10 == 0 or step == s.steps:
            print(f"step {step}/{s.steps} loss {loss.item():.3f} mtp {mtp.item():.3f} aux {aux.item():.3f} "
                  f"lr {lr_at(step - 1, s):.2e} {seconds / step:.2f} s/step", flush=True)
        if eval_every and (step % eval_every == 0 or step == s.steps):
            model.eval()
            nll = heldout_nll(model, held_stream, s.seq_len, max_windows=16)
            model.train()
            print(f"step {step} held-out loss {nll:.3f} (perplexity {math.exp(nll):.1f})", flush=True)
            t_last = time.perf_counter()
        if step % checkpoint_every == 0 or step == s.steps:
            tmp = ckpt_path.with_suffix(".tmp")
            torch.save({"settings": dataclasses.asdict(s), "model": model.state_dict(),
                        "optimizer": opt.state_dict(), "step": step, "seconds": seconds}, tmp)
            os.replace(tmp, ckpt_path)
            t_last = time.perf_counter()
    model.eval()
    return {"train_seconds": round(seconds, 1), "seconds_per_step": round(seconds / max(1, step), 3)}
