"""DeBERTa's disentangled attention (He et al. 2020; v2 and v3 use the same layer).

A token is a content vector; positions are not added to it. Instead every layer scores

    content-to-content   q_i . k_j
    content-to-position  q_i . Pk[r(i, j)]      ("c2p")
    position-to-content  Pq[r(i, j)] . k_j      ("p2c")

where r(i, j) is the (log-bucketed) relative distance i - j and Pq / Pk are ONE relative
embedding table, shared by all layers, projected by each layer's own query and key projections
(`share_att_key`). The sum is scaled by 1/sqrt(head_dim * (1 + number of position terms)).

`DisentangledPositions` is the relative module the model runs once per forward pass: it owns
the table (and its LayerNorm) and hands every layer {"rel_embeddings", "rel_pos"}. The position
terms become an additive bias, so the score computation is still torch's fused SDPA."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .attention import Attention, register_attention
from .norms import build_norm


def pos_att_terms(spec: str) -> tuple:
    """"c2p|p2c" -> ("c2p", "p2c"); "" -> () (content-to-content only)."""
    return tuple(t for t in spec.split("|") if t)


def log_bucket_position(rel: torch.Tensor, buckets: int, max_position: int) -> torch.Tensor:
    """DeBERTa's buckets of the distance i - j: exact within +-buckets/2, then logarithmically
    wider up to max_position, sign kept. Float32 throughout, as DeBERTa computes it, so the
    ceilings land on the same bucket."""
    mid = buckets // 2
    sign = torch.sign(rel)
    abs_pos = torch.where((rel < mid) & (rel > -mid), torch.full_like(rel, mid - 1), rel.abs())
    denom = torch.log(torch.tensor((max_position - 1) / mid, dtype=torch.float32, device=rel.device))
    log_pos = torch.ceil(torch.log(abs_pos.float() / mid) / denom * (mid - 1)) + mid
    return torch.where(abs_pos <= mid, rel.float(), log_pos * sign).long()


class DisentangledPositions(nn.Module):
    """The relative embedding table of the whole model: 2 * span rows (span = position_buckets, the
    buckets per side, HF's name: config.rel_buckets / 2; or max_relative_positions = config.rel_max_distance
    without buckets), normalised once per forward pass."""

    @classmethod
    def from_config(cls, c) -> "DisentangledPositions":
        return cls(c.n_embd, c.rel_buckets // 2, c.rel_max_distance,
                   build_norm(c.norm_class, c.n_embd, c.norm_eps, c.norm_bias))

    def __init__(self, dim: int, position_buckets: int, max_relative_positions: int, norm: Optional[nn.Module]):
        super().__init__()
        self.buckets, self.max_position = position_buckets, max_relative_positions
        self.span = position_buckets if position_buckets > 0 else max_relative_positions
        self.emb = nn.Embedding(2 * self.span, dim)
        self.norm = norm

    def relative_index(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """(B, Tq), (B, Tk) positions -> (B, Tq, Tk) row of the table for each query/key pair."""
        rel = q_pos[:, :, None] - k_pos[:, None, :]
        if self.buckets > 0:
            rel = log_bucket_position(rel, self.buckets, self.max_position)
        return (rel + self.span).clamp(0, 2 * self.span - 1)

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> dict:
        table = self.emb.weight
        if self.norm is not None:
            table = self.norm(table)
        return {"rel_embeddings": table, "rel_pos": self.relative_index(q_pos, k_pos)}


@register_attention
class DisentangledAttention(Attention):
    """Attention (fused q/k/v, output projection, KV cache) plus the c2p / p2c terms.
    Positions are projected with the layer's own q and k weights (DeBERTa's share_att_key)."""

    @classmethod
    def from_config(cls, c) -> "DisentangledAttention":
        if c.position != "disentangled":
            raise ConfigError(f"attention_class='DisentangledAttention' needs position='disentangled' "
                              f"(got {c.position!r}): it reads the shared relative embeddings")
        return cls(c.n_embd, c.n_head, c.head_dim, bias=c.attn_bias, out_bias=c.attn_out_bias, scale=c.attn_scale,
                   dropout=c.dropout, causal=c.causal, terms=pos_att_terms(c.pos_att_type))

    def __init__(self, dim: int, n_head: int, head_dim: int, *, bias: bool = True, out_bias: bool = True,
                 scale: Optional[float] = None, dropout: float = 0.0, causal: bool = False,
                 terms: tuple = ("c2p", "p2c")):
        self.terms = tuple(terms)
        scale = scale if scale is not None else 1.0 / math.sqrt(head_dim * (1 + len(self.terms)))
        super().__init__(dim, n_head, n_head, head_dim, bias=bias, out_bias=out_bias, scale=scale,
                         dropout=dropout, causal=causal)
        self.pos_drop = nn.Dropout(dropout) if dropout else nn.Identity()

    def position_bias(self, q: torch.Tensor, k: torch.Tensor, rel_embeddings: torch.Tensor,
                      rel_pos: torch.Tensor) -> torch.Tensor:
        """q (B, H, Tq, D), k (B, H, Tk, D), table (2S, C), rel_pos (B, Tq, Tk) -> (B, H, Tq, Tk), scaled."""
        B, H, Tq, D = q.shape
        Tk = k.shape[2]
        size = H * D
        # The table through this layer's query and key projections: (H, 2S, D) each.
        w = self.qkv.weight[: 2 * size]
        b = self.qkv.bias[: 2 * size] if self.qkv.bias is not None else None
        pq, pk = F.linear(self.pos_drop(rel_embeddings), w, b).split(size, dim=-1)
        pq, pk = (t.view(-1, H, D).transpose(0, 1) for t in (pq, pk))
        bias = q.new_zeros(B, H, Tq, Tk)
        if "c2p" in self.terms:  # q_i . Pk[r(i, j)]
            c2p = torch.matmul(q, pk.transpose(-1, -2))  # (B, H, Tq, 2S)
            bias = bias + torch.gather(c2p, -1, rel_pos[:, None].expand(B, H, Tq, Tk))
        if "p2c" in self.terms:  # k_j . Pq[r(i, j)]
            p2c = torch.matmul(k, pq.transpose(-1, -2))  # (B, H, Tk, 2S)
            index = rel_pos.transpose(1, 2)[:, None].expand(B, H, Tk, Tq)
            bias = bias + torch.gather(p2c, -1, index).transpose(-1, -2)
        return bias * self.scale

    def forward(self, x: torch.Tensor, *, rope=None, mask: Optional[torch.Tensor] = None, cache=None,
                cache_start: int = 0, rel_embeddings: Optional[torch.Tensor] = None,
                rel_pos: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        if rel_embeddings is None or rel_pos is None:
            raise ConfigError("DisentangledAttention needs the shared relative embeddings: build the model with "
                              "position='disentangled' so TransformerLM passes rel_embeddings and rel_pos")
        B, T, _ = x.shape
        size = self.n_head * self.head_dim
        q, k, v = (self._heads(t, self.n_head) for t in self.qkv(x).split(size, dim=-1))
        if cache is not None:
            k, v = cache.update(cache_start, k, v)
        S = k.shape[2]
        if mask is None and self.causal and T > 1:  # called without the model's mask
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
        attn_mask = mask
        if self.terms:
            attn_mask = self.position_bias(q, k, rel_embeddings, rel_pos)
            if mask is not None:
                attn_mask = attn_mask.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else attn_mask + mask
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, size))
