"""One transformer layer. It receives its parts (attention, feed-forward, norms) and only
knows how to wire them: pre-norm, post-norm or parallel residual."""
from typing import Optional

import torch
import torch.nn as nn


class Block(nn.Module):
    def __init__(self, attn: nn.Module, mlp: nn.Module, norm1: nn.Module, norm2: Optional[nn.Module],
                 placement: str = "pre", parallel: bool = False, dropout: float = 0.0):
        super().__init__()
        self.attn, self.mlp, self.norm1 = attn, mlp, norm1
        self.norm2 = norm2  # None with a parallel residual that shares norm1 (PaLM)
        self.placement, self.parallel = placement, parallel
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor, **attn_kwargs) -> torch.Tensor:
        if self.parallel:  # GPT-J / NeoX / PaLM: both branches read x
            h = self.norm1(x)
            h2 = h if self.norm2 is None else self.norm2(x)
            return x + self.drop(self.attn(h, **attn_kwargs)) + self.drop(self.mlp(h2))
        if self.placement == "pre":  # GPT-2 / LLaMA
            x = x + self.drop(self.attn(self.norm1(x), **attn_kwargs))
            return x + self.drop(self.mlp(self.norm2(x)))
        # post-norm: original Transformer, GPT-1, BERT
        x = self.norm1(x + self.drop(self.attn(x, **attn_kwargs)))
        return self.norm2(x + self.drop(self.mlp(x)))
