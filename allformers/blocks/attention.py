"""Multi-head attention for every model in the zoo: MHA, MQA and GQA, self- or cross-attention,
with rotary applied inside and any mask or additive bias (ALiBi, T5's relative bias) passed in.

The score computation is torch's `F.scaled_dot_product_attention`, which picks a fused
kernel (flash on CPU and GPU) whenever the mask allows it."""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import config
from ..errors import ConfigError
from .norms import build_norm
from .positions import apply_rotary
from .sparse import patterned_attention


class KVCache:
    """Pre-allocated keys/values of one layer: (B, H_kv, T_max, D). Writing in place avoids
    a torch.cat per step, which is what makes cached decoding cheap."""

    def __init__(self, batch: int, n_kv_head: int, max_len: int, head_dim: int, dtype, device):
        shape = (batch, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor):
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def positions(self, end: int) -> torch.Tensor:
        """Absolute index of each key `update` returned (all of them, in order)."""
        return torch.arange(end, device=self.k.device)

    def reorder(self, index: torch.Tensor):
        """Keep batch rows `index` (beam search)."""
        self.k = self.k.index_select(0, index)
        self.v = self.v.index_select(0, index)


class CrossKV:
    """Cross-attention keys/values of one layer: the encoder output does not change while the
    decoder runs, so they are projected once and reused at every step."""

    def __init__(self):
        self.k = self.v = None

    def reorder(self, index: torch.Tensor):
        if self.k is not None:
            self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)


ATTENTION_CLASSES: dict = {}  # Config.attention_class -> class (config.ATTENTION_CLASSES names them all)


def register_attention(cls):
    if cls.__name__ not in config.ATTENTION_CLASSES:
        raise ConfigError(f"attention class {cls.__name__} is not named in config.ATTENTION_CLASSES; add it there "
                          f"(and to ATTENTION_FOR_POSITION with its position scheme)")
    ATTENTION_CLASSES[cls.__name__] = cls
    return cls


@register_attention
class Attention(nn.Module):
    @classmethod
    def from_config(cls, c) -> "Attention":
        return cls(c.n_embd, c.n_head, c.n_kv_head, c.head_dim, bias=c.attn_bias, out_bias=c.attn_out_bias,
                   scale=c.attn_scale, dropout=c.dropout, causal=c.causal)

    def __init__(self, dim: int, n_head: int, n_kv_head: int, head_dim: int, *, bias: bool = True,
                 out_bias: bool = True, scale: Optional[float] = None, dropout: float = 0.0,
                 causal: bool = True, cross: bool = False, kv_dim: Optional[int] = None,
                 qk_norm: Optional[str] = None, qk_norm_eps: float = 1e-5):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim
        self.scale, self.dropout, self.causal, self.cross = scale, dropout, causal, cross
        q_size, kv_size = n_head * head_dim, n_kv_head * head_dim
        if cross:  # queries from x, keys/values from the encoder output
            self.q = nn.Linear(dim, q_size, bias=bias)
            self.kv = nn.Linear(kv_dim or dim, 2 * kv_size, bias=bias)
        else:  # one matmul for q, k and v: rows are [q; k; v]
            self.qkv = nn.Linear(dim, q_size + 2 * kv_size, bias=bias)
        self.proj = nn.Linear(q_size, dim, bias=out_bias)
        # "LayerNorm" / "RMSNorm" over each head's queries and keys (Idefics's cross-attention and perceiver)
        self.q_norm = build_norm(qk_norm, head_dim, qk_norm_eps) if qk_norm else None
        self.k_norm = build_norm(qk_norm, head_dim, qk_norm_eps) if qk_norm else None
        self.pattern, self.window, self.stride = "global", None, None  # blocks/sparse.py; set by use_pattern

    def use_pattern(self, kind: str, window: int, stride: int) -> "Attention":
        """Make this a "local" (sliding window) or "strided" layer; "global" is plain causal attention."""
        self.pattern, self.window, self.stride = kind, window, stride
        return self

    def _heads(self, t: torch.Tensor, n: int) -> torch.Tensor:  # (B, T, n*D) -> (B, n, T, D)
        B, T, _ = t.shape
        return t.view(B, T, n, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, *, rope=None, mask: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, cache_start: int = 0,
                context: Optional[torch.Tensor] = None, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """key_mask (B, start+T) bool, real tokens: patterned layers build their own mask from it
        (the model then passes `mask` only when it carries more than causality and padding)."""
        B, T, _ = x.shape
        q_size, kv_size = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        if self.cross:
            q = self._heads(self.q(x), self.n_head)
            if cache is not None and cache.k is not None:  # projected at the first step
                k, v = cache.k, cache.v
            else:
                k, v = self.kv(context).split(kv_size, dim=-1)
                k, v = self._heads(k, self.n_kv_head), self._heads(v, self.n_kv_head)
                if self.k_norm is not None:
                    k = self.k_norm(k)
                if cache is not None:
                    cache.k, cache.v = k, v
            cache = None  # nothing more to append
        else:
            q, k, v = self.qkv(x).split((q_size, kv_size, kv_size), dim=-1)
            q, k, v = self._heads(q, self.n_head), self._heads(k, self.n_kv_head), self._heads(v, self.n_kv_head)
            if self.k_norm is not None:
                k = self.k_norm(k)
        if self.q_norm is not None:  # per head, before the rotation
            q = self.q_norm(q)
        if rope is not None:  # (B, H, T, D) rotated on the first n_elem dims
            cos, sin = rope
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if getattr(cache, "ragged", False):  # the server's batch: rows of different lengths (serve/engine.py)
            pattern = None if self.pattern == "global" else (self.pattern, self.window, self.stride)
            y = cache.attend(q, k, v, scale=self.scale, pattern=pattern)  # (1, H, T, D)
            return self.proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))
        if cache is not None:
            k, v = cache.update(cache_start, k, v)
        if self.pattern != "global":
            k_idx = cache.positions(cache_start + T) if cache is not None else torch.arange(T, device=x.device)
            y = patterned_attention(q, k, v, kind=self.pattern, window=self.window, stride=self.stride,
                                    q_start=cache_start if cache is not None else 0, k_idx=k_idx, key_mask=key_mask,
                                    mask=mask, scale=self.scale, dropout_p=self.dropout if self.training else 0.0,
                                    gqa=self.n_kv_head != self.n_head)  # (B, H, T, D)
            return self.proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))
        # The fused causal kernel is only right when queries and keys start together.
        is_causal = self.causal and mask is None and T > 1 and k.shape[2] == T
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scale,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head)  # (B, H, T, D)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))
