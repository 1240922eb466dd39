"""Relative position schemes that act as an additive bias on the attention scores.
The model computes the bias once per forward pass and every layer adds it (T5 computes it in
its first layer and shares it the same way)."""
import math

import torch
import torch.nn as nn

from .disentangled import DisentangledPositions
from .positions import alibi_slopes


class AlibiBias(nn.Module):
    """ALiBi (BLOOM): -slope_h * |distance|, no parameters."""

    def __init__(self, n_head: int):
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(n_head), persistent=False)

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """(B, Tq), (B, Tk) positions -> (B, H, Tq, Tk) bias."""
        dist = (k_pos[:, None, :] - q_pos[:, :, None]).abs().float()
        return -self.slopes[None, :, None, None] * dist[:, None]


def t5_bucket(relative: torch.Tensor, bidirectional: bool, n_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bucketing of key - query distances: exact buckets for small distances, then
    logarithmically wider ones up to max_distance. Encoders give half the buckets to each side."""
    buckets = torch.zeros_like(relative)
    if bidirectional:
        n_buckets //= 2
        buckets = buckets + (relative > 0).long() * n_buckets
        relative = relative.abs()
    else:
        relative = -relative.clamp(max=0)  # only the past is visible
    exact = n_buckets // 2
    large = exact + (torch.log(relative.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                     * (n_buckets - exact)).long()
    large = large.clamp(max=n_buckets - 1)
    return buckets + torch.where(relative < exact, relative, large)


class T5RelativeBias(nn.Module):
    """A learned scalar per (bucket, head), looked up by distance bucket."""

    def __init__(self, n_head: int, n_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True):
        super().__init__()
        self.emb = nn.Embedding(n_buckets, n_head)
        self.n_buckets, self.max_distance, self.bidirectional = n_buckets, max_distance, bidirectional

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        rel = k_pos[:, None, :] - q_pos[:, :, None]  # (B, Tq, Tk)
        b = t5_bucket(rel, self.bidirectional, self.n_buckets, self.max_distance)
        return self.emb(b).permute(0, 3, 1, 2)  # (B, H, Tq, Tk)


def build_relative(c):
    """The config's relative-position module, or None for absolute/rotary schemes."""
    if c.position == "alibi":
        return AlibiBias(c.n_head)
    if c.position == "relative_bias":
        return T5RelativeBias(c.n_head, c.rel_buckets, c.rel_max_distance, bidirectional=not c.causal)
    if c.position == "disentangled":  # DeBERTa: one relative embedding table, handed to every layer
        return DisentangledPositions.from_config(c)
    return None
