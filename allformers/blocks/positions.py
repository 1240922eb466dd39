"""Position schemes. Absolute ones (learned, sinusoidal) are added to the token embeddings;
relative ones (rotary, ALiBi) act inside attention and are computed once per forward pass,
then shared by every layer."""
import math

import torch
import torch.nn as nn


class LearnedPositions(nn.Module):
    def __init__(self, max_len: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(max_len, dim))

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, C)
        return self.weight[position_ids]


class SinusoidalPositions(nn.Module):
    """The fixed sin/cos table of "Attention Is All You Need". layout "interleaved": sin and cos of each
    frequency side by side (sin, cos, sin, cos, ...); "halves": all sines, then all cosines (CTRL)."""

    def __init__(self, max_len: int, dim: int, layout: str = "interleaved"):
        super().__init__()
        pos = torch.arange(max_len, dtype=torch.float32)[:, None]
        inv = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
        table = torch.zeros(max_len, dim)
        if layout == "halves":  # [sin | cos]
            table[:, : (dim + 1) // 2] = torch.sin(pos * inv)
            table[:, (dim + 1) // 2:] = torch.cos(pos * inv[: dim // 2])
        else:
            table[:, 0::2] = torch.sin(pos * inv)
            table[:, 1::2] = torch.cos(pos * inv[: dim // 2])
        self.register_buffer("table", table, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.table[position_ids]


class Rotary(nn.Module):
    """Rotary embeddings on the first `n_elem` dims of each head (all of them for LLaMA,
    a quarter for GPT-NeoX). Uses the "rotate half" layout of GPT-NeoX / HF LLaMA."""

    def __init__(self, n_elem: int, base: float = 10000.0):
        super().__init__()
        self.n_elem = n_elem
        inv_freq = 1.0 / (base ** (torch.arange(0, n_elem, 2, dtype=torch.float32) / n_elem))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor):
        """(B, T) positions -> cos, sin of shape (B, 1, T, n_elem), ready to broadcast over heads."""
        freqs = position_ids[..., None].float() * self.inv_freq  # (B, T, n_elem/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos()[:, None], emb.sin()[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); rotates x[..., :n_elem] and passes the rest through."""
    n = cos.shape[-1]
    rot, rest = x[..., :n], x[..., n:]
    half = n // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = rot * cos + rotated * sin
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


def alibi_slopes(n_head: int) -> torch.Tensor:
    """Per-head slopes of ALiBi (Press et al.), with the paper's rule for non-powers of two."""
    def powers(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]

    if math.log2(n_head).is_integer():
        return torch.tensor(powers(n_head))
    closest = 2 ** math.floor(math.log2(n_head))
    extra = powers(2 * closest)[0::2][: n_head - closest]
    return torch.tensor(powers(closest) + extra)
