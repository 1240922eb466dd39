"""CoCa, Contrastive Captioners (Yu et al. 2022): one image tower and one text decoder trained with a contrastive
loss and a captioning loss at once.

  image        the one ViT (models/vit.py) with every token out; two learned-query attention pools over its
               tokens (blocks/vision.py AttentionPool): one query -> the image embedding (contrastive), N
               queries -> the image tokens the captioner cross-attends to
  text         one causal decoder cut in two:
                 unimodal half   the first `unimodal_layers` blocks of a TransformerLM: self-attention only, it
                                 never sees the image; a LayerNorm on its output at the end-of-text token,
                                 projected, is the text embedding
                 multimodal half the remaining blocks, each self-attention + cross-attention to the N image
                                 tokens + feed-forward (the Block's own cross-attention), a final norm and
                                 the LM head: the next-token logits of the caption
  loss         contrastive_weight * CLIP's symmetric InfoNCE + caption_weight * next-token cross-entropy on the
               caption (the paper's weights 1 and 2)

A caption row is [<s>, words..., </s>, <pad>...]: the unimodal half pools at the first </s>, the captioner
predicts every token after <s> up to and including </s>.

    model = CoCa(CoCaConfig.from_name("coca-tiny-shapes", ...))
    out = model(input_ids, pixel_values, attention_mask, return_loss=True)  # out.loss, out.logits_per_image
    model.caption(tokenizer, pixel_values)  # greedy captions
    zero_shot(model, tokenizer, pixel_values, ["a red circle", ...])  # (B, labels) probabilities (models/clip.py)
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..blocks import build_norm, make_block
from ..blocks.vision import AttentionPool
from ..config import Config, ConfigError, SavedConfig
from .clip import contrastive_loss
from .init import init_weights
from .lm import TransformerLM, block_spec
from .vit import ViT, ViTConfig


@dataclass
class CoCaConfig(SavedConfig):
    text: Config  # the whole text decoder, both halves (n_layer = unimodal + multimodal): causal, with an LM head
    vision: ViTConfig  # pooling="none": CoCa pools the tokens itself
    name: str = ""
    description: str = ""
    unimodal_layers: Optional[int] = None  # the first half; None -> text.n_layer // 2
    projection_dim: int = 512
    caption_queries: int = 256  # image tokens the captioner sees (the paper: 256)
    pool_heads: Optional[int] = None  # heads of the two attention pools; None -> vision.heads
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    contrastive_weight: float = 1.0
    caption_weight: float = 2.0  # the paper weighs captioning twice the contrastive loss
    logit_scale_init: float = math.log(1 / 0.07)

    def __post_init__(self):
        t = self.text
        if self.unimodal_layers is None:
            self.unimodal_layers = t.n_layer // 2
        if not 1 <= self.unimodal_layers < t.n_layer:
            raise ConfigError(f"unimodal_layers={self.unimodal_layers} of text.n_layer={t.n_layer}: both halves need "
                              f"at least one layer (a decoder of n_layer >= 2, cut at 1..n_layer-1)")
        if not t.causal or not t.lm_head:
            raise ConfigError("CoCa's text decoder is causal with an LM head: build text with causal=True, lm_head=True")
        if t.cross_attention or t.is_encoder_decoder:
            raise ConfigError("give text as one plain decoder stack; CoCa adds cross-attention to its second half")
        if t.position not in ("learned", "sinusoidal", "none"):
            # the multimodal blocks run outside TransformerLM, which is what hands its blocks the rotary
            # angles or ALiBi / relative biases; absolute positions are all added once at the embedding
            raise ConfigError(f"text.position={t.position!r}: CoCa's decoder takes absolute positions only "
                              f"(learned, sinusoidal or none), added at its embedding")
        if self.vision.pooling != "none":
            raise ConfigError(f"vision.pooling={self.vision.pooling!r}: CoCa pools the image tokens with its own "
                              f"attention pools; build the ViT with pooling='none'")
        for name in ("bos_token_id", "eos_token_id"):
            if not 0 <= getattr(self, name) < t.vocab_size:
                raise ConfigError(f"{name}={getattr(self, name)} is outside the vocabulary of {t.vocab_size}")
        heads = self.pool_heads or self.vision.heads
        if self.vision.width % heads:
            raise ConfigError(f"pool_heads={heads} does not divide the image width {self.vision.width}")
        if self.caption_queries < 1 or self.projection_dim < 1:
            raise ConfigError("caption_queries and projection_dim must be at least 1")

    @property
    def multimodal_layers(self) -> int:
        return self.text.n_layer - self.unimodal_layers

    @classmethod
    def from_name(cls, name: str, **overrides) -> "CoCaConfig":
        from ..errors import UnknownModelError

        if name not in COCA_CONFIGS:
            raise UnknownModelError(name, COCA_CONFIGS)
        return dataclasses.replace(COCA_CONFIGS[name](), name=name, **overrides)


def _coca_text(vocab_size=49408, block_size=76, n_layer=24, n_head=8, n_embd=512, **kw) -> Config:
    return Config(name="coca-text", vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                  n_embd=n_embd, causal=True, position="learned", activation="gelu", lm_head=True,
                  tie_embeddings=False, **kw)


COCA_CONFIGS = {  # name -> a function making the config
    "coca-vit-b-32": lambda: CoCaConfig(  # the sizes of open_clip's coca_ViT-B-32
        _coca_text(), ViTConfig.from_name("clip-vit-base-patch32", pooling="none", final_norm="tokens"),
        unimodal_layers=12, projection_dim=512, caption_queries=256, pool_heads=8,
        description="CoCa ViT-B/32: 12 unimodal + 12 multimodal text layers of 512, 256 captioning queries"),
    "coca-tiny-shapes": lambda: CoCaConfig(  # the CoCa the benchmark trains here (the shapes' word vocabulary)
        _coca_text(vocab_size=30, block_size=16, n_layer=4, n_head=4, n_embd=64),
        ViTConfig.from_name("vit-tiny-shapes", pooling="none", final_norm="tokens"),
        projection_dim=64, caption_queries=16, bos_token_id=2, eos_token_id=1,
        description="a 2 + 2 layer CoCa for the 32x32 synthetic shapes (trains on a CPU)"),
}


@dataclass
class CoCaOutput:
    logits_per_image: torch.Tensor  # (images, texts)
    logits_per_text: torch.Tensor  # (texts, images)
    text_embeds: torch.Tensor  # (texts, P) unit length
    image_embeds: torch.Tensor  # (images, P) unit length
    logits: torch.Tensor  # (B, T, vocab) next-token logits of the captioner (row b reads image b)
    loss: Optional[torch.Tensor] = None  # contrastive_weight * contrastive + caption_weight * caption
    contrastive_loss: Optional[torch.Tensor] = None
    caption_loss: Optional[torch.Tensor] = None


def caption_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of logits[:, t] against input_ids[:, t + 1] over the real (unpadded) targets."""
    labels = input_ids[:, 1:].clone()
    if attention_mask is not None:
        labels[attention_mask[:, 1:] == 0] = -100
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)


class CoCa(nn.Module):
    def __init__(self, config: CoCaConfig):
        super().__init__()
        self.config = c = config
        t, v = c.text, c.vision
        self.vision = ViT(v)
        heads = c.pool_heads or v.heads
        self.contrastive_pool = AttentionPool(v.width, heads, 1)
        self.caption_pool = AttentionPool(v.width, heads, c.caption_queries)
        self.pool_norm = nn.LayerNorm(v.width, eps=v.norm_eps)
        self.visual_projection = nn.Linear(v.width, c.projection_dim, bias=False)
        # the unimodal half: token + position embeddings and the first blocks, no final norm, no head
        self.unimodal = TransformerLM(t.replace(n_layer=c.unimodal_layers, lm_head=False, final_norm=False))
        self.text_norm = build_norm(t.norm_class, t.n_embd, t.norm_eps, t.norm_bias)
        self.text_projection = nn.Linear(t.n_embd, c.projection_dim, bias=False)
        # the multimodal half: the same blocks with cross-attention to the image tokens (of the image's width)
        spec = dataclasses.replace(block_spec(t), cross_attention=True, cross_dim=v.width)
        self.multimodal = nn.ModuleList(make_block(spec) for _ in range(c.multimodal_layers))
        self.decoder_norm = build_norm(t.norm_class, t.n_embd, t.norm_eps, t.norm_bias)
        self.lm_head = None if t.tie_embeddings else nn.Linear(t.n_embd, t.vocab_size, bias=t.lm_head_bias)
        self.logit_scale = nn.Parameter(torch.tensor(float(c.logit_scale_init)))
        init_weights(self.multimodal, t)  # the text config's scheme, as the unimodal half has

    @property
    def device(self):
        return self.logit_scale.device

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ the two towers
    def encode_image(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) normalised pixels -> (image embedding (B, P) not normalised, image tokens (B, N, width))."""
        x = self.vision(pixel_values).last_hidden_state  # (B, tokens, width)
        pooled = self.pool_norm(self.contrastive_pool(x))[:, 0]  # (B, width)
        return self.visual_projection(pooled), self.pool_norm(self.caption_pool(x))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) ids -> (text embedding (B, P) not normalised, unimodal hidden states (B, T, C)).
        The image takes no part: this is the unimodal half alone."""
        h = self.unimodal(input_ids, attention_mask=attention_mask, return_hidden=True)  # (B, T, C)
        at = (input_ids == self.config.eos_token_id).int().argmax(dim=-1)  # the first </s>
        pooled = self.text_norm(h[torch.arange(h.shape[0], device=h.device), at])
        return self.text_projection(pooled), h

    def get_text_features(self, input_ids, attention_mask=None) -> torch.Tensor:
        return self.encode_text(input_ids, attention_mask)[0]

    def get_image_features(self, pixel_values) -> torch.Tensor:
        return self.encode_image(pixel_values)[0]

    def decode(self, hidden: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """The multimodal half: unimodal states (B, T, C) + image tokens (B, N, width) -> logits (B, T, vocab).
        Causal self-attention, so a right-padded row's real tokens never read its padding."""
        x = hidden
        for block in self.multimodal:
            x = block(x, context=image_tokens)
        x = self.decoder_norm(x)
        return self.lm_head(x) if self.lm_head is not None else F.linear(x, self.unimodal.wte.weight)

    def logits(self, text_embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """Unit-length (texts, P) and (images, P) -> logits_per_text (texts, images)."""
        return text_embeds @ image_embeds.t() * self.logit_scale.exp()

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                return_loss: bool = False) -> CoCaOutput:
        """input_ids (B, T) rows [<s>, words, </s>, pad...] of the B pictures (B, C, H, W) -> CoCaOutput."""
        image, image_tokens = self.encode_image(pixel_values)
        text, hidden = self.encode_text(input_ids, attention_mask)
        logits = self.decode(hidden, image_tokens)
        image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
        per_text = self.logits(text, image)
        out = CoCaOutput(per_text.t(), per_text, text, image, logits)
        if return_loss:
            c = self.config
            out.contrastive_loss = contrastive_loss(per_text)
            out.caption_loss = caption_loss(logits, input_ids, attention_mask)
            out.loss = c.contrastive_weight * out.contrastive_loss + c.caption_weight * out.caption_loss
        return out

    # ------------------------------------------------------------------ captioning
    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, max_new_tokens: Optional[int] = None) -> torch.Tensor:
        """Greedy captions: (B, C, H, W) -> (B, 1 + n) ids starting with <s>; rows that finished are padded
        with </s>. Each step reruns the (short) caption so far through both halves."""
        c = self.config
        limit = c.text.block_size - 1 if max_new_tokens is None else min(max_new_tokens, c.text.block_size - 1)
        _, image_tokens = self.encode_image(pixel_values)
        ids = torch.full((pixel_values.shape[0], 1), c.bos_token_id, dtype=torch.long, device=self.device)
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=self.device)
        for _ in range(limit):
            nxt = self.decode(self.unimodal(ids, return_hidden=True), image_tokens)[:, -1].argmax(dim=-1)
            nxt = torch.where(done, torch.full_like(nxt, c.eos_token_id), nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            done |= nxt == c.eos_token_id
            if bool(done.all()):
                break
        return ids

    def caption(self, tokenizer, pixel_values: torch.Tensor, max_new_tokens: Optional[int] = None) -> list[str]:
        """Greedy captions as text (everything before the first </s>)."""
        out = []
        for row in self.generate(pixel_values, max_new_tokens).tolist():
            row = row[1:]
            if self.config.eos_token_id in row:
                row = row[:row.index(self.config.eos_token_id)]
            out.append(tokenizer.decode(row))
        return out

    def text_inputs(self, tokenizer, texts: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts -> (ids, mask) (B, block_size) rows [<s>, words, </s>, pad...], as CoCa was trained."""
        from .clip import text_inputs

        return text_inputs(tokenizer, texts, self.config.text.block_size, bos_id=self.config.bos_token_id,
                           eos_id=self.config.eos_token_id)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "CoCa":
        return cls(CoCaConfig.from_name(name, **overrides))

    def save(self, path, format: str = "allformers", tokenizer=None):
        from ..checkpoints import save

        return save(self, path, format=format, tokenizer=tokenizer)
