"""BLIP-2's Querying Transformer (Li et al. 2023): a small BERT whose first `num_query_tokens` positions are
learned query vectors that read a frozen image encoder through cross-attention, while the rest of the
sequence may be text. What the queries and the text may see of each other is the attention mask, and the
mask is what tells BLIP-2's three stage-1 objectives apart (`attention_mask` below builds each):

    itc  "unimodal"       queries see queries, text sees text       (image-text contrastive)
    itm  "bidirectional"  everything sees everything                (image-text matching)
    itg  "causal"         queries see queries; text sees every      (image-grounded text generation)
                          query and the text before it

One layer (BERT's post-norm layout, the same Attention / MLP / LayerNorm parts every model uses):

    h = LN(x + SelfAttention(x, mask))                    queries and text together
    q = LN(h_q + CrossAttention(h_q, image))              only the queries, every cross_attention_frequency layers
    q = LN(q + MLP_query(q));  t = LN(h_t + MLP_text(h_t))   queries and text have their own feed-forwards

The input is LN([queries ; word + position embeddings of the text]); text positions start at 0 after the
queries. Hugging Face's Blip2QFormerModel is this module (checkpoints/hf_blip2.py holds the key table).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from ..blocks import Attention, build_feedforward
from ..config import ACTIVATIONS, SavedConfig
from ..errors import ConfigError

MASKS = ("unimodal", "bidirectional", "causal")


@dataclass
class QFormerConfig(SavedConfig):
    width: int = 768
    depth: int = 12
    heads: int = 12
    intermediate_size: int = 3072
    activation: str = "gelu"
    norm_eps: float = 1e-12
    vision_width: int = 1408  # width of the image features the cross-attention reads (ViT-g: 1408)
    num_query_tokens: int = 32
    cross_attention_frequency: int = 2  # layers 0, f, 2f, ... cross-attend to the image
    # text_input: the Q-Former reads text too (stage 1: word and position embeddings, one text feed-forward
    # per layer); False: queries only (what stage 2 runs; HF's use_qformer_text_input)
    text_input: bool = True
    vocab_size: int = 30523  # BERT's uncased WordPiece vocabulary + BLIP-2's [DEC] token
    max_positions: int = 512
    pad_token_id: int = 0
    dropout: float = 0.0

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation={self.activation!r} is not one of {list(ACTIVATIONS)}")
        for f in ("width", "depth", "heads", "intermediate_size", "vision_width", "num_query_tokens",
                  "cross_attention_frequency", "vocab_size", "max_positions"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) <= 0:
                raise ConfigError(f"QFormerConfig.{f} must be a positive integer, got {getattr(self, f)!r}")
        if self.width % self.heads:
            raise ConfigError(f"QFormerConfig width={self.width} is not divisible by heads={self.heads}")

    def has_cross(self, layer: int) -> bool:
        return layer % self.cross_attention_frequency == 0


def attention_mask(kind: str, n_query: int, text_mask: Optional[torch.Tensor], batch: int = 1,
                   device=None) -> torch.Tensor:
    """(B, 1, Q + T, Q + T) bool, True = may attend, for `n_query` queries followed by text whose real tokens
    are text_mask (B, T) (None: no text). kind: "unimodal" (ITC), "bidirectional" (ITM) or "causal" (ITG)."""
    if kind not in MASKS:
        raise ConfigError(f"Q-Former mask {kind!r} is not one of {list(MASKS)}")
    if text_mask is None:
        text_mask = torch.zeros(batch, 0, dtype=torch.bool, device=device)
    B, T = text_mask.shape
    Q, device = n_query, text_mask.device
    keys = torch.cat([torch.ones(B, Q, dtype=torch.bool, device=device), text_mask.bool()], dim=1)  # (B, Q+T) real
    is_query = torch.arange(Q + T, device=device) < Q  # (Q+T,)
    if kind == "bidirectional":
        allowed = torch.ones(Q + T, Q + T, dtype=torch.bool, device=device)
    elif kind == "unimodal":  # a query sees only queries, a text token only text
        allowed = is_query[:, None] == is_query[None, :]
    else:  # causal: queries see queries; text token i sees every query and text tokens j <= i
        i = torch.arange(Q + T, device=device)
        allowed = (is_query[:, None] & is_query[None, :]) | (~is_query[:, None] & (is_query[None, :] | (i[None, :] <= i[:, None])))
    return (allowed[None] & keys[:, None, :])[:, None]  # (B, 1, Q+T, Q+T)


class QFormerLayer(nn.Module):
    def __init__(self, c: QFormerConfig, cross: bool):
        super().__init__()
        D, H = c.width, c.heads

        def norm():
            return nn.LayerNorm(D, eps=c.norm_eps)

        def mlp():
            return build_feedforward("MLP", D, c.intermediate_size, c.activation, True, c.dropout)

        self.attn = Attention(D, H, H, D // H, causal=False, dropout=c.dropout)
        self.norm1 = norm()
        self.cross_attn = Attention(D, H, H, D // H, causal=False, cross=True, kv_dim=c.vision_width,
                                    dropout=c.dropout) if cross else None
        self.norm_cross = norm() if cross else None
        self.mlp_query, self.norm_query = mlp(), norm()
        self.mlp_text, self.norm_text = (mlp(), norm()) if c.text_input else (None, None)
        self.drop = nn.Dropout(c.dropout) if c.dropout else nn.Identity()

    def forward(self, x: torch.Tensor, n_query: int, mask: Optional[torch.Tensor], image: Optional[torch.Tensor],
                image_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, Q + T, D) -> (B, Q + T, D); image (B, N, vision_width) or None (text alone)."""
        h = self.norm1(x + self.drop(self.attn(x, mask=mask)))
        q, t = h[:, :n_query], h[:, n_query:]
        if n_query and self.cross_attn is not None:
            if image is None:
                raise ConfigError("the queries cross-attend to the image: pass image features")
            q = self.norm_cross(q + self.drop(self.cross_attn(q, context=image, mask=image_mask)))
        q = self.norm_query(q + self.drop(self.mlp_query(q)))
        if t.shape[1]:
            if self.mlp_text is None:
                raise ConfigError("this Q-Former reads no text (text_input=False); pass queries only")
            t = self.norm_text(t + self.drop(self.mlp_text(t)))
        return torch.cat([q, t], dim=1)


class TextEmbeddings(nn.Module):
    """BERT's word + learned position embeddings of the Q-Former's text (no norm: the Q-Former normalises
    [queries ; text] together). Positions count from 0 at the first text token."""

    def __init__(self, c: QFormerConfig):
        super().__init__()
        self.max_positions = c.max_positions
        self.word = nn.Embedding(c.vocab_size, c.width)
        self.position = nn.Embedding(c.max_positions, c.width)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, D)
        T = input_ids.shape[1]
        if T > self.max_positions:
            raise ConfigError(f"{T} text tokens; the Q-Former has {self.max_positions} positions")
        return self.word(input_ids) + self.position.weight[:T]


class QFormer(nn.Module):
    """LayerNorm over the input embeddings, then the layers (HF's Blip2QFormerModel). The learned queries and
    the text embeddings belong to the model around it (models/blip2.py), as in BLIP-2's checkpoints."""

    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.config = c = config
        self.norm = nn.LayerNorm(c.width, eps=c.norm_eps)
        self.drop = nn.Dropout(c.dropout) if c.dropout else nn.Identity()
        self.layers = nn.ModuleList(QFormerLayer(c, c.has_cross(i)) for i in range(c.depth))

    def forward(self, embeds: torch.Tensor, n_query: int, image: Optional[torch.Tensor] = None,
                text_mask: Optional[torch.Tensor] = None, mask: str = "bidirectional",
                image_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """embeds (B, Q + T, D): the n_query query vectors then the text embeddings; image (B, N, vision_width)
        features of the frozen encoder (needed when n_query > 0); text_mask (B, T) real text tokens; mask: which
        of the three attention patterns (`attention_mask`). -> (B, Q + T, D) hidden states, queries first."""
        B, L, _ = embeds.shape
        if text_mask is None:
            text_mask = torch.ones(B, L - n_query, dtype=torch.bool, device=embeds.device)
        m = attention_mask(mask, n_query, text_mask, B, embeds.device)
        if bool(m.all()):
            m = None  # nothing masked: the fused kernel
        im = image_mask[:, None, None, :].bool() if image_mask is not None else None
        x = self.drop(self.norm(embeds))
        for layer in self.layers:
            x = layer(x, n_query, m, image, im)
        return x
