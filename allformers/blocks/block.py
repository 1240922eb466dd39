"""One transformer layer. It receives its parts (attention, feed-forward, norms and, in an
encoder-decoder's decoder, cross-attention) and only knows how to wire them: pre-norm,
post-norm or parallel residual.

`BlockSpec` is everything a layer needs to know (sizes, norm, residual layout, MLP kind) and nothing
about a model; `make_block(spec)` builds one from it. TransformerLM derives a spec from its Config
(models/lm.py), the ViT from its ViTConfig, DETR's decoder from its arguments."""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from ..errors import ConfigError
from .attention import Attention
from .feedforward import build_feedforward
from .norms import build_norm


@dataclass
class BlockSpec:
    dim: int
    n_head: int
    n_kv_head: Optional[int] = None  # None -> n_head
    head_dim: Optional[int] = None  # None -> dim // n_head
    intermediate_size: Optional[int] = None  # None -> 4 * dim
    causal: bool = False
    attn_bias: bool = True
    attn_out_bias: Optional[bool] = None  # None -> attn_bias
    attn_scale: Optional[float] = None  # None -> 1/sqrt(head_dim)
    norm_class: str = "LayerNorm"
    norm_eps: float = 1e-5
    norm_bias: bool = True
    norm_placement: str = "pre"
    parallel_residual: bool = False
    shared_parallel_norm: bool = False
    mlp_class: str = "MLP"
    activation: str = "gelu"
    mlp_bias: bool = True
    dropout: float = 0.0
    cross_attention: bool = False  # a decoder layer: queries from x, keys/values from a context
    cross_dim: Optional[int] = None  # width of that context (None -> dim)
    layer_scale: Optional[float] = None  # per-channel scales on both branches, starting at this value (CaiT, DINOv2)

    def __post_init__(self):
        if self.head_dim is None:
            if self.dim % self.n_head:
                raise ConfigError(f"width {self.dim} is not divisible by {self.n_head} heads")
            self.head_dim = self.dim // self.n_head
        self.n_kv_head = self.n_kv_head or self.n_head
        self.intermediate_size = self.intermediate_size or 4 * self.dim
        self.attn_out_bias = self.attn_bias if self.attn_out_bias is None else self.attn_out_bias


class LayerScale(nn.Module):
    """x -> gamma * x with one learned scale per channel (Touvron et al. 2021, "Going deeper with image
    transformers"): residual branches start small (DINOv2: 1e-5 at init, stored checkpoints say more)."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def make_block(s: BlockSpec, attn: Optional[nn.Module] = None, mlp: Optional[nn.Module] = None) -> "Block":
    """One layer from its spec. `attn` / `mlp` given: use them (another attention class, a shared part)."""
    if attn is None:
        attn = Attention(s.dim, s.n_head, s.n_kv_head, s.head_dim, bias=s.attn_bias, out_bias=s.attn_out_bias,
                         scale=s.attn_scale, dropout=s.dropout, causal=s.causal)
    if mlp is None:
        mlp = build_feedforward(s.mlp_class, s.dim, s.intermediate_size, s.activation, s.mlp_bias, s.dropout)
    norm1 = build_norm(s.norm_class, s.dim, s.norm_eps, s.norm_bias)
    norm2 = None if s.shared_parallel_norm else build_norm(s.norm_class, s.dim, s.norm_eps, s.norm_bias)
    cross = norm_cross = None
    if s.cross_attention:
        cross = Attention(s.dim, s.n_head, s.n_kv_head, s.head_dim, bias=s.attn_bias, out_bias=s.attn_out_bias,
                          scale=s.attn_scale, dropout=s.dropout, causal=False, cross=True, kv_dim=s.cross_dim)
        norm_cross = build_norm(s.norm_class, s.dim, s.norm_eps, s.norm_bias)
    ls1 = ls2 = None
    if s.layer_scale is not None:
        ls1, ls2 = LayerScale(s.dim, s.layer_scale), LayerScale(s.dim, s.layer_scale)
    return Block(attn, mlp, norm1, norm2, placement=s.norm_placement, parallel=s.parallel_residual,
                 dropout=s.dropout, cross_attn=cross, norm_cross=norm_cross, ls1=ls1, ls2=ls2)


class Block(nn.Module):
    def __init__(self, attn: nn.Module, mlp: nn.Module, norm1: nn.Module, norm2: Optional[nn.Module],
                 placement: str = "pre", parallel: bool = False, dropout: float = 0.0,
                 cross_attn: Optional[nn.Module] = None, norm_cross: Optional[nn.Module] = None,
                 ls1: Optional[nn.Module] = None, ls2: Optional[nn.Module] = None):
        super().__init__()
        self.attn, self.mlp, self.norm1 = attn, mlp, norm1
        # LayerScale on the attention / MLP branch (DINOv2); absent: the branch is added as it is
        self.ls1, self.ls2 = ls1 or nn.Identity(), ls2 or nn.Identity()
        self.cross_attn, self.norm_cross = cross_attn, norm_cross
        self.norm2 = norm2  # None with a parallel residual that shares norm1 (PaLM)
        self.placement, self.parallel = placement, parallel
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()

    def _attn(self, x, attn_kwargs):
        return self.drop(self.ls1(self.attn(x, **attn_kwargs)))

    def _mlp(self, x):
        return self.drop(self.ls2(self.mlp(x)))

    def _cross(self, x, context, context_mask, cross_cache):
        return self.drop(self.cross_attn(x, mask=context_mask, cache=cross_cache, context=context))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                context_mask: Optional[torch.Tensor] = None, cross_cache=None, **attn_kwargs) -> torch.Tensor:
        if self.cross_attn is not None:  # decoder of an encoder-decoder
            if self.placement == "pre":  # T5
                x = x + self._attn(self.norm1(x), attn_kwargs)
                x = x + self._cross(self.norm_cross(x), context, context_mask, cross_cache)
                return x + self._mlp(self.norm2(x))
            x = self.norm1(x + self._attn(x, attn_kwargs))  # BART, original Transformer
            x = self.norm_cross(x + self._cross(x, context, context_mask, cross_cache))
            return self.norm2(x + self._mlp(x))
        if self.parallel:  # GPT-J / NeoX / PaLM: both branches read x
            h = self.norm1(x)
            h2 = h if self.norm2 is None else self.norm2(x)
            return x + self._attn(h, attn_kwargs) + self._mlp(h2)
        if self.placement == "pre":  # GPT-2 / LLaMA / ViT
            x = x + self._attn(self.norm1(x), attn_kwargs)
            return x + self._mlp(self.norm2(x))
        # post-norm: original Transformer, GPT-1, BERT
        x = self.norm1(x + self._attn(x, attn_kwargs))
        return self.norm2(x + self._mlp(x))
