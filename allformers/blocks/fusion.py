"""Gated cross-attention fusion of image features into text states (Multimodal-CoT, Zhang et al. 2023,
section 4.2), placed between a T5 encoder and its decoder:

    H_img = Linear(patch_dim -> d_model)(features)                  (B, N, D)
    H_att = single-head attention(query=H_text, key=value=H_img)     (B, S, D)
    gate  = sigmoid(W [H_text; H_att])                              (B, S, D)
    H     = (1 - gate) * H_text + gate * H_att                      -> the decoder

Padded image positions are masked out of the keys. A question without an image has no keys at
all: its H_att is defined as 0 (attention over an empty set), so H = (1 - gate) * H_text.
`force_gate` pins the gate to a constant (0 turns the image off: H = H_text exactly)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .attention import Attention


class GatedFusion(nn.Module):
    def __init__(self, d_model: int, patch_dim: int):
        super().__init__()
        self.image_proj = nn.Linear(patch_dim, d_model)
        # one head whose width is the model's: the reference's nn.MultiheadAttention(num_heads=1)
        self.attn = Attention(d_model, 1, 1, d_model, bias=True, out_bias=True, causal=False, cross=True)
        self.gate = nn.Linear(2 * d_model, d_model)
        self.force_gate: Optional[float] = None

    def forward(self, h_text: torch.Tensor, features: Optional[torch.Tensor],
                feature_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """h_text (B, S, D), features (B, N, P) or None (no image anywhere), feature_mask (B, N) bool
        (True = a real image position; None = all real) -> (H (B, S, D), gate (B, S, D))."""
        if features is None:
            h_att = torch.zeros_like(h_text)
        else:
            B, N, _ = features.shape
            if feature_mask is None:
                feature_mask = torch.ones(B, N, dtype=torch.bool, device=h_text.device)
            feature_mask = feature_mask.bool()
            has_image = feature_mask.any(-1)  # (B,)
            # rows with no image attend to everything (keeps softmax finite), then are zeroed
            keys = (feature_mask | ~has_image[:, None])[:, None, None, :]  # (B, 1, 1, N)
            h_img = self.image_proj(features)  # (B, N, D)
            h_att = self.attn(h_text, mask=keys, context=h_img)  # (B, S, D)
            h_att = h_att * has_image[:, None, None].to(h_att.dtype)
        if self.force_gate is not None:
            gate = torch.full_like(h_text, float(self.force_gate))
        else:
            gate = torch.sigmoid(self.gate(torch.cat([h_text, h_att], dim=-1)))
        return (1 - gate) * h_text + gate * h_att, gate
