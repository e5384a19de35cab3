"""Routed experts at real widths written straight as random, valid Q4_K blocks (no f32 copy, no
quantizer): the benchmark models' experts."""

from __future__ import annotations

import math
from typing import Callable, Dict, Iterator, Tuple

import numpy as np

import gguf

from .routing import BIAS_CHANNEL
from .tensors import Weights

Q4_K = gguf.GGMLQuantizationType.Q4_K
Q4_K_WEIGHTS, Q4_K_BYTES = gguf.GGML_QUANT_SIZES[Q4_K]  # 256 weights in 144 bytes
# ggml's block_q4_K: d (f16), dmin (f16), scales[12] (eight 6-bit scales and mins of 32-weight
# sub-blocks, packed), qs[128] (4-bit quants). A weight is d*scale*q - dmin*min. Random blocks
# use scale == min and dmin == 7.5*d, so weights are d*scale*(q - 7.5): zero-mean.
_Q4_K_SCALES = np.arange(32, 64)  # drawn uniformly; q is uniform in 0..15
_Q4_K_UNIT_STD = math.sqrt(np.mean(_Q4_K_SCALES.astype(np.float64) ** 2) * 85 / 4)  # std of scale*(q - 7.5)


class Q4KExperts:
    """A routed-expert tensor of random, valid Q4_K blocks (numpy shape (n_expert, n_out,
    n_in)), generated only when written. Like ``no_bias_read``/``no_bias_write``, it can
    leave the bias channel alone: ``no_read`` zeroes the whole 32-weight sub-block holding input
    column ``BIAS_CHANNEL`` of every row, ``no_write`` zeroes output row ``BIAS_CHANNEL``."""

    def __init__(self, W: Weights, name: str, shape: Tuple[int, int, int], std: float,
                 *, no_read: bool = False, no_write: bool = False) -> None:
        self.W, self.name, self.shape, self.std = W, name, shape, std
        self.no_read, self.no_write = no_read, no_write
        self.byte_shape = (shape[0], shape[1], shape[2] // Q4_K_WEIGHTS * Q4_K_BYTES)
        self.nbytes = math.prod(self.byte_shape)

    def blocks(self) -> np.ndarray:
        rng = self.W.rng(self.name)
        n = self.nbytes // Q4_K_BYTES
        out = np.empty((n, Q4_K_BYTES), dtype=np.uint8)
        d = self.std / _Q4_K_UNIT_STD
        out[:, 0:4] = np.array([d, 7.5 * d], dtype="<f2").view(np.uint8)
        sc = rng.integers(_Q4_K_SCALES[0], _Q4_K_SCALES[-1] + 1, size=(n, 8), dtype=np.uint8)
        low, high = sc[:, :4], sc[:, 4:]
        packed_low = low | ((high >> 4) << 6)  # scales 0-3 (and the top bits of 4-7)
        out[:, 4:8] = packed_low  # scales
        out[:, 8:12] = packed_low  # mins (== scales)
        out[:, 12:16] = (high & 0x0F) | ((high & 0x0F) << 4)  # low bits of scales and mins 4-7
        out[:, 16:] = rng.integers(0, 2**64 - 1, size=n * 16, dtype=np.uint64, endpoint=True).view(np.uint8).reshape(n, 128)
        rows = out.reshape(self.shape[0], self.shape[1], -1, Q4_K_BYTES)
        if self.no_read:
            block, sub = divmod(BIAS_CHANNEL, Q4_K_WEIGHTS)
            assert sub < 4 * 32, "the bias channel must be in one of the first four sub-blocks"
            rows[:, :, block, 4 + sub // 32] &= 0xC0  # its scale...
            rows[:, :, block, 8 + sub // 32] &= 0xC0  # ...and min: every weight there is 0
        if self.no_write:
            rows[:, BIAS_CHANNEL] = 0  # d = dmin = 0
        return out.reshape(self.byte_shape)


def q4k_experts(W: Weights, d: Dict[str, object]) -> Callable[[str, float], Iterator[Tuple[str, Q4KExperts]]]:
    """``model_tensors``' routed_experts: separate gate, up and down, all Q4_K, with the f32 weights'
    spread and bias-channel rules."""
    X, F, E = int(d["experts"]), int(d["ff"]), int(d["embd"])

    def block(p: str, gain: float) -> Iterator[Tuple[str, Q4KExperts]]:
        for kind in ("gate", "up"):
            name = p + f"ffn_{kind}_exps.weight"
            yield name, Q4KExperts(W, name, (X, F, E), 1.0 / math.sqrt(E), no_read=True)
        name = p + "ffn_down_exps.weight"
        yield name, Q4KExperts(W, name, (X, E, F), gain / math.sqrt(F), no_write=True)

    return block
