"""Per-layer attention patterns: dense ("global"), a causal sliding window ("local": GPT-3's locally
banded layers, GPT-Neo, Mistral) and the Sparse Transformer's "strided" pattern (keys at distances
0, stride, 2*stride, ...).

A pattern is a rule on absolute indices: query i may see key j when j <= i and
  local:   i - j < window         (the last `window` keys, itself included)
  strided: (i - j) % stride == 0
Indices count cache slots (padding included), exactly as GPT-Neo's banded buffer does.

A local layer over a long sequence never builds the T x T mask: queries are cut into blocks of
`window`; each block attends to its own keys and the previous `window` ones, so the cost is
T * 2 * window (linear in T), and each block's softmax runs in torch's fused SDPA kernel.
During generation a local layer keeps only its last `window` keys (`WindowKVCache`)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def pattern_allowed(kind: str, q_idx: torch.Tensor, k_idx: torch.Tensor, window: int, stride: int) -> torch.Tensor:
    """(T,) query and (S,) key absolute indices -> (T, S) bool: which keys each query may see."""
    dist = q_idx[:, None] - k_idx[None, :]  # (T, S), >= 0 for past keys
    allowed = dist >= 0
    if kind == "local":
        allowed = allowed & (dist < window)
    elif kind == "strided":
        allowed = allowed & (dist % stride == 0)
    return allowed


def patterned_attention(q, k, v, *, kind: str, window: int, stride: int, q_start: int, k_idx: torch.Tensor,
                        key_mask: Optional[torch.Tensor], mask: Optional[torch.Tensor], scale, dropout_p: float,
                        gqa: bool) -> torch.Tensor:
    """q (B, H, T, D) at absolute indices q_start..q_start+T-1; k, v (B, H_kv, S, D) at `k_idx` (S,).
    key_mask (B, >= max(k_idx)+1) bool: real tokens by absolute index, or None. mask: the model's dense
    mask or bias (relative positions, packed documents) over the same absolute keys, or None.
    Returns (B, H, T, D)."""
    T, S = q.shape[2], k.shape[2]
    contiguous = bool(S == 0 or (k_idx[-1] - k_idx[0] == S - 1))
    if kind == "local" and mask is None and T > 2 * window and contiguous:
        valid = key_mask[:, int(k_idx[0]):int(k_idx[0]) + S] if key_mask is not None else None
        return local_blocked(q, k, v, window=window, q_start=q_start, k_start=int(k_idx[0]), key_valid=valid,
                             scale=scale, dropout_p=dropout_p, gqa=gqa)
    q_idx = torch.arange(q_start, q_start + T, device=q.device)
    allowed = pattern_allowed(kind, q_idx, k_idx, window, stride)[None, None]  # (1, 1, T, S)
    if key_mask is not None:
        allowed = allowed & key_mask[:, k_idx][:, None, None, :]
    if mask is not None:  # the model's dense mask covers keys 0..end; keep the columns this layer holds
        mask = mask[..., k_idx] if mask.shape[-1] != S else mask
    if mask is not None and mask.dtype == torch.bool:
        allowed, mask = allowed & mask, None
    allowed = allowed | ~allowed.any(-1, keepdim=True)  # a padding query sees itself: softmax stays finite
    if mask is not None:  # an additive bias (ALiBi, T5 buckets) with -inf where the model masks
        allowed = mask.masked_fill(~allowed, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, dropout_p=dropout_p,
                                          enable_gqa=gqa)


def local_blocked(q, k, v, *, window: int, q_start: int, k_start: int, key_valid: Optional[torch.Tensor],
                  scale, dropout_p: float, gqa: bool) -> torch.Tensor:
    """Sliding-window causal attention in blocks of `window` queries, each against 2 * window keys.
    q (B, H, T, D) at absolute q_start..; k, v (B, H_kv, S, D) at k_start..q_start+T-1 (contiguous);
    key_valid (B, S) bool or None. Returns (B, H, T, D), equal to the masked dense computation."""
    B, H, T, D = q.shape
    W = window
    P = q_start - k_start  # keys before the first query; only the last W of them can be seen
    if P > W:
        k, v, P = k[:, :, P - W:], v[:, :, P - W:], W
        key_valid = key_valid[:, -(W + T):] if key_valid is not None else None
    nb = -(-T // W)  # number of query blocks
    pad_left, pad_right = W - P, nb * W - T
    # key slot s of the padded row holds absolute index q_start - W + s
    kp = F.pad(k, (0, 0, pad_left, pad_right))  # (B, H_kv, W + nb*W, D)
    vp = F.pad(v, (0, 0, pad_left, pad_right))
    valid = torch.ones(B, P + T, dtype=torch.bool, device=q.device) if key_valid is None else key_valid
    valid = F.pad(valid, (pad_left, pad_right), value=False)  # (B, W + nb*W)
    qb = F.pad(q, (0, 0, 0, pad_right)).view(B, H, nb, W, D)
    kb = kp.unfold(2, 2 * W, W).transpose(-1, -2)  # (B, H_kv, nb, 2W, D): block b sees slots bW .. bW+2W-1
    vb = vp.unfold(2, 2 * W, W).transpose(-1, -2)
    qi = torch.arange(W, device=q.device)[:, None]
    kk = torch.arange(2 * W, device=q.device)[None, :]
    band = (kk > qi) & (kk <= qi + W)  # (W, 2W): query W+qi's window in slot units
    allowed = band & valid.unfold(1, 2 * W, W)[:, :, None, :]  # (B, nb, W, 2W)
    allowed = allowed | ~allowed.any(-1, keepdim=True)  # padding queries (left pad, right fill) see something
    flat = lambda t: t.transpose(1, 2).reshape(B * nb, t.shape[1], *t.shape[3:])  # noqa: E731  (B*nb, H, ., D)
    y = F.scaled_dot_product_attention(flat(qb), flat(kb), flat(vb), attn_mask=allowed.reshape(B * nb, 1, W, 2 * W),
                                       scale=scale, dropout_p=dropout_p, enable_gqa=gqa)  # (B*nb, H, W, D)
    return y.view(B, nb, H, W, D).transpose(1, 2).reshape(B, H, nb * W, D)[:, :, :T]


class WindowKVCache:
    """The keys/values a local layer still needs: the last `window` of them, in a ring of that size.
    One new token is written in place (its slot is position % window); a longer chunk is attended
    together with the ring's keys in order, then its tail is written back."""

    def __init__(self, batch: int, n_kv_head: int, window: int, head_dim: int, dtype, device):
        shape = (batch, n_kv_head, window, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.window, self.end = window, 0
        self.index = torch.zeros(0, dtype=torch.long, device=device)  # absolute index of each returned key

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor):
        if start != self.end:
            from ..errors import AllformersError

            raise AllformersError(f"a local layer's window cache continues at position {self.end}, not {start}; "
                                  f"start a new cache to rewind")
        W, T = self.window, k.shape[2]
        end = start + T
        device = k.device
        slots = torch.arange(W, device=device)
        if T == 1 and start >= W:  # the ring is full: overwrite the oldest slot
            self.k[:, :, start % W], self.v[:, :, start % W] = k[:, :, 0], v[:, :, 0]
            self.index, self.end = start - (start - slots) % W, end
            return self.k, self.v
        n_old = min(start, W)
        old = torch.arange(start - n_old, start, device=device) % W
        keys, values = torch.cat([self.k[:, :, old], k], dim=2), torch.cat([self.v[:, :, old], v], dim=2)
        keep = min(W, n_old + T)
        tail = torch.arange(end - keep, end, device=device) % W
        self.k[:, :, tail], self.v[:, :, tail] = keys[:, :, -keep:], values[:, :, -keep:]
        self.index, self.end = torch.arange(start - n_old, end, device=device), end
        return keys, values

    def positions(self, end: int) -> torch.Tensor:
        return self.index

    def reorder(self, index: torch.Tensor):
        self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)
