"""One transformer layer. It receives its parts (attention, feed-forward, norms and, in an
encoder-decoder's decoder, cross-attention) and only knows how to wire them: pre-norm,
post-norm or parallel residual."""
from typing import Optional

import torch
import torch.nn as nn


class Block(nn.Module):
    def __init__(self, attn: nn.Module, mlp: nn.Module, norm1: nn.Module, norm2: Optional[nn.Module],
                 placement: str = "pre", parallel: bool = False, dropout: float = 0.0,
                 cross_attn: Optional[nn.Module] = None, norm_cross: Optional[nn.Module] = None):
        super().__init__()
        self.attn, self.mlp, self.norm1 = attn, mlp, norm1
        self.cross_attn, self.norm_cross = cross_attn, norm_cross
        self.norm2 = norm2  # None with a parallel residual that shares norm1 (PaLM)
        self.placement, self.parallel = placement, parallel
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()

    def _cross(self, x, context, context_mask, cross_cache):
        return self.drop(self.cross_attn(x, mask=context_mask, cache=cross_cache, context=context))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                context_mask: Optional[torch.Tensor] = None, cross_cache=None, **attn_kwargs) -> torch.Tensor:
        if self.cross_attn is not None:  # decoder of an encoder-decoder
            if self.placement == "pre":  # T5
                x = x + self.drop(self.attn(self.norm1(x), **attn_kwargs))
                x = x + self._cross(self.norm_cross(x), context, context_mask, cross_cache)
                return x + self.drop(self.mlp(self.norm2(x)))
            x = self.norm1(x + self.drop(self.attn(x, **attn_kwargs)))  # BART, original Transformer
            x = self.norm_cross(x + self._cross(x, context, context_mask, cross_cache))
            return self.norm2(x + self.drop(self.mlp(x)))
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
