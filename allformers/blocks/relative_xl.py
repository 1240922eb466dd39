"""Transformer-XL's relative attention (Dai et al. 2019), also the core of XLNet (Yang et al. 2019).

No position is added to a token. Query i (at key index m + i, m = memory length) scores key j as

    (q_i + u) . k_j                       "AC": content, with the learned content bias u
  + (q_i + v) . W_r sin(m + i - j)        "BD": the sinusoid of the distance through this layer's
                                                 position projection W_r, with the position bias v
 [+ (q_i + s) . seg[i and j differ]       "EF": XLNet's relative segment encoding]

The BD term is computed against every distance once, (T, R) instead of (T, S) vectors, and moved
into place with the rel-shift (the paper's appendix B trick: a reshape, no gather). Keys and values
come from [memory ; segment]: the previous segment's hidden states of this layer, computed before and
never differentiated through (the model detaches them).

XLNet adds a second stream: the query stream g attends to the content stream's keys and values but
(through its mask) not to its own token. The model hands both streams in one tensor, [h ; g] along
the time axis, so the Block's residuals, norms and feed-forward treat them row by row unchanged;
`n_query` says how many rows at the end are g."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .attention import Attention, register_attention

NEG = -1e30  # XLNet's masking value: a query that may see nothing averages every value instead of NaN


def distances(q_len: int, k_len: int, causal: bool, device=None) -> torch.Tensor:
    """Relative distances the BD term is computed against, largest first: k_len .. -q_len + 1 for a
    bidirectional model, k_len .. 0 for a causal one (future keys are masked anyway)."""
    end = 0 if causal else -q_len + 1
    return torch.arange(k_len, end - 1, -1, device=device, dtype=torch.float32)


def sinusoid(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """(R,) distances -> (R, dim): [sin | cos] halves, frequencies 1 / 10000^(2k / dim)."""
    inv_freq = 1.0 / torch.pow(10000, torch.arange(0, dim, 2, dtype=torch.float32, device=pos.device) / dim)
    angles = pos[:, None] * inv_freq
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class XLPositions(nn.Module):
    """The sinusoids of the distances, computed once per forward pass and read by every layer (each
    projects them with its own W_r). No parameters. clamp_len caps distances; bi_data gives the second
    half of the batch the negated distances (XLNet's bidirectional data pipeline)."""

    @classmethod
    def from_config(cls, c) -> "XLPositions":
        return cls(c.n_embd, causal=c.causal, clamp_len=c.clamp_len, bi_data=c.bi_data)

    def __init__(self, dim: int, causal: bool, clamp_len: int = 0, bi_data: bool = False):
        super().__init__()
        self.dim, self.causal, self.clamp_len, self.bi_data = dim, causal, clamp_len, bi_data

    def forward(self, q_len: int, k_len: int, batch: int, device=None) -> torch.Tensor:
        """-> (1 or B, R, C) with R = k_len + 1 (causal) or k_len + q_len."""
        fwd = distances(q_len, k_len, self.causal, device)
        seqs = [fwd, -fwd] if self.bi_data else [fwd]
        if self.clamp_len > 0:
            seqs = [s.clamp(-self.clamp_len, self.clamp_len) for s in seqs]
        if not self.bi_data:
            return sinusoid(seqs[0], self.dim)[None]
        if batch % 2:
            raise ConfigError(f"bi_data=True reads the second half of a batch backwards; a batch of {batch} rows "
                              f"does not split in two halves — use an even batch size or bi_data=False")
        half = batch // 2
        return torch.cat([sinusoid(s, self.dim)[None].expand(half, -1, -1) for s in seqs])


def rel_shift(x: torch.Tensor, k_len: int) -> torch.Tensor:
    """(B, H, T, R) scores against distances (largest first) -> (B, H, T, k_len) scores against keys.

    Row i must start at distance index T - i: viewing the buffer as (R, T), dropping the first row and
    viewing it back as (T, R - 1) shifts row i left by T - i. Entries past the last valid distance of a
    causal row wrap around; they belong to future keys, which the mask removes."""
    B, H, T, R = x.shape
    return x.reshape(B, H, R, T)[:, :, 1:].reshape(B, H, T, R - 1)[..., :k_len]


@register_attention
class RelativeXLAttention(Attention):
    """Attention (fused q/k/v, output projection) plus the position projection W_r (`pos`), the biases
    u (`u`, HF's r_w_bias) and v (`v`, r_r_bias) and, with segments, s (`seg_bias`) and the two segment
    vectors (`seg_embed`), all per head."""

    @classmethod
    def from_config(cls, c) -> "RelativeXLAttention":
        if c.position != "relative_xl":
            raise ConfigError(f"attention_class='RelativeXLAttention' needs position='relative_xl' "
                              f"(got {c.position!r}): it reads the model's relative sinusoids and memory")
        return cls(c.n_embd, c.n_head, c.head_dim, bias=c.attn_bias, out_bias=c.attn_out_bias, scale=c.attn_scale,
                   dropout=c.dropout, causal=c.causal, segments=c.relative_segments)

    def __init__(self, dim: int, n_head: int, head_dim: int, *, bias: bool = False, out_bias: bool = False,
                 scale: Optional[float] = None, dropout: float = 0.0, causal: bool = True, segments: bool = False):
        scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
        super().__init__(dim, n_head, n_head, head_dim, bias=bias, out_bias=out_bias, scale=scale,
                         dropout=dropout, causal=causal)
        self.pos = nn.Linear(dim, n_head * head_dim, bias=False)
        self.u = nn.Parameter(torch.zeros(n_head, head_dim))
        self.v = nn.Parameter(torch.zeros(n_head, head_dim))
        if segments:
            self.seg_bias = nn.Parameter(torch.zeros(n_head, head_dim))
            self.seg_embed = nn.Parameter(torch.zeros(2, n_head, head_dim))  # [same segment, different segment]
        self.segments = segments

    def _project(self, x: torch.Tensor, which: int) -> torch.Tensor:
        """x (B, L, C) through the q (0), k (1) or v (2) rows of the fused projection -> (B, H, L, D)."""
        size = self.n_head * self.head_dim
        w = self.qkv.weight[which * size:(which + 1) * size]
        b = self.qkv.bias[which * size:(which + 1) * size] if self.qkv.bias is not None else None
        return self._heads(F.linear(x, w, b), self.n_head)

    def _attend(self, q, k, v, r, mask, seg_diff):
        """q (B, H, T, D) at the segment's T positions; k, v (B, H, S, D); r (1 or B, H, R, D) -> (B, H, T, D)."""
        S = k.shape[2]
        bias = rel_shift(torch.matmul(q + self.v[:, None], r.transpose(-1, -2)), S)  # BD: (B, H, T, S)
        if seg_diff is not None:  # EF: pick the same- or different-segment score for each pair
            ef = torch.einsum("bhtd,shd->bhts", q + self.seg_bias[:, None], self.seg_embed)  # (B, H, T, 2)
            bias = bias + torch.where(seg_diff[:, None], ef[..., 1:], ef[..., :1])
        bias = bias * self.scale
        if mask is not None:  # (B or 1, 1, T, S) additive, NEG where blocked
            bias = bias + mask
        # AC through the fused kernel: ((q + u) . k) * scale + bias
        return F.scaled_dot_product_attention(q + self.u[:, None], k, v, attn_mask=bias, scale=self.scale,
                                              dropout_p=self.dropout if self.training else 0.0)

    def forward(self, x: torch.Tensor, *, pos_emb: Optional[torch.Tensor] = None, mask=None,
                memory: Optional[torch.Tensor] = None, seg_diff: Optional[torch.Tensor] = None, n_query: int = 0,
                query_mask=None, target_mapping: Optional[torch.Tensor] = None, **unused) -> torch.Tensor:
        """x (B, T + n_query, C): the content stream h, then the query stream g (XLNet). pos_emb (1 or B, R, C):
        the model's sinusoids. memory (B, M, C): this layer's previous hidden states. mask / query_mask: additive
        (B or 1, 1, T, M + T) for h / g. seg_diff (B, T, M + T) bool: query and key in different segments.
        target_mapping (B, n_query, T): which position each query-stream row predicts."""
        if pos_emb is None:
            raise ConfigError("RelativeXLAttention needs the relative sinusoids: build the model with "
                              "allformers.models.build_model (TransformerXL), which passes pos_emb and memory")
        B, L, _ = x.shape
        T = L - n_query
        h = x[:, :T]
        hm = h if memory is None else torch.cat([memory, h], dim=1)  # (B, M + T, C)
        k, v = self._project(hm, 1), self._project(hm, 2)
        r = self.pos(pos_emb)  # (1 or B, R, H*D)
        r = r.view(r.shape[0], r.shape[1], self.n_head, self.head_dim).transpose(1, 2)  # (1 or B, H, R, D)
        out = self._attend(self._project(h, 0), k, v, r, mask, seg_diff)  # (B, H, T, D)
        if n_query:
            # Query-stream rows sit at the positions their target_mapping names (a weighted sum, as XLNet does).
            qg = torch.einsum("bhmd,bml->bhld", self._project(x[:, T:], 0), target_mapping)
            og = self._attend(qg, k, v, r, query_mask, seg_diff)
            out = torch.cat([out, torch.einsum("bhld,bml->bhmd", og, target_mapping)], dim=2)
        return self.proj(out.transpose(1, 2).reshape(B, L, self.n_head * self.head_dim))
