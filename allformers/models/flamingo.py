"""Flamingo (Alayrac et al. 2022): a frozen vision encoder and a frozen decoder LM joined by two trained parts.

    pixels (B, M, 3, H, W), M images per row -> frozen ViT -> (B*M, N, D) patch features (any N)
      -> Perceiver resampler: n_latents learned latents attend to [features; latents], depth times -> (B, M, L, D)
    text ids with one placeholder (image_token_id) where each image stands
      -> the frozen LM; before every cross_attn_every-th block a gated cross-attention dense layer:
         x = x + tanh(attn_gate) * xattn(norm(x), media)      each token sees only the latest image at or
         x = x + tanh(ff_gate)   * ffw(norm(x))               before it (media masking); gates start at 0

A fresh Flamingo is its LM exactly (tanh(0) = 0); training opens the gates. The media mask follows Hugging Face
Idefics's processor ("only attend to the immediately preceding image"): the placeholder itself sees its image,
tokens before the first image see none, and after an end-of-chunk token (end_of_chunk_id: Flamingo's <EOC>,
Idefics's EOS) none until the next image. IdeficsForVisionText2Text loads and saves both ways
(checkpoints/hf_idefics.py).

    >>> import torch
    >>> from allformers import Config
    >>> from allformers.models.vit import ViTConfig
    >>> from allformers.models.flamingo import Flamingo, FlamingoConfig
    >>> text = Config(vocab_size=50, block_size=64, n_layer=2, n_head=2, n_embd=32)
    >>> vision = ViTConfig(image_size=16, patch_size=8, width=32, depth=1, heads=2)
    >>> model = Flamingo(FlamingoConfig(text, vision, image_token_id=3, end_of_chunk_id=4, n_latents=4,
    ...                                 resampler_depth=1, resampler_heads=2, resampler_head_dim=16)).freeze()
    >>> ids = torch.tensor([[3, 10, 11, 4, 3, 12]])       # <image> a b <EOC> <image> c
    >>> out = model(ids, torch.rand(1, 2, 3, 16, 16))    # both images of the row, in order
    >>> out.logits.shape
    torch.Size([1, 6, 50])
    >>> torch.equal(out.logits, model.lm(ids))           # gates at 0: the frozen LM exactly
    True
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..blocks import Attention, CrossKV, build_feedforward, build_norm
from ..blocks.feedforward import ACTIVATIONS, MLP
from ..config import Config, SavedConfig
from ..errors import ConfigError
from .lm import TransformerLM
from .vit import ViT, ViTConfig
from .vlm import FrozenParts, ImageTokenError, generate_from_embeds, left_padded

GATE_TYPES = ("float", "vector")


@dataclass
class FlamingoConfig(SavedConfig):
    text: Config  # the decoder-only LM (frozen)
    vision: ViTConfig  # the image encoder (frozen); its last_hidden_state, every token, is what the resampler reads
    name: str = ""
    description: str = ""
    image_token_id: int = 0  # one placeholder per image in the text
    end_of_chunk_id: Optional[int] = None  # tokens after it see no image until the next one (None: never reset)
    cross_attn_every: int = 1  # a gated cross-attention layer before blocks 0, k, 2k, ... (Idefics: cross_layer_interval)
    use_resampler: bool = True  # False: the text cross-attends to the ViT's tokens directly
    n_latents: int = 64
    resampler_depth: int = 6
    resampler_heads: int = 16
    resampler_head_dim: int = 96
    resampler_intermediate_size: Optional[int] = None  # None -> 4 * vision width
    resampler_activation: str = "relu"
    resampler_qk_norm: bool = False  # LayerNorm over each head's queries and keys (Idefics's qk_layer_norms_perceiver)
    resampler_norm_eps: float = 1e-5
    xattn_qk_norm: bool = False  # the LM's norm over each cross-attention head's queries and keys (qk_layer_norms)
    gate_type: str = "float"  # one tanh gate per branch ("float") or one per channel ("vector")
    # the last rows of the vocabulary that Idefics keeps apart (additional_vocab_size: <image>, <fake_token...>);
    # only the Hugging Face export reads it
    additional_vocab_size: int = 0

    def __post_init__(self):
        t = self.text
        if t.is_encoder_decoder or not t.causal or not t.lm_head:
            raise ConfigError("the language model of a FlamingoConfig is a decoder-only LM with its head (task='lm')")
        for fname in ("image_token_id", "end_of_chunk_id"):
            v = getattr(self, fname)
            if v is not None and not 0 <= v < t.vocab_size:
                raise ConfigError(f"{fname}={v} is outside the LM's vocabulary of {t.vocab_size}")
        if not isinstance(self.cross_attn_every, int) or not 1 <= self.cross_attn_every <= t.n_layer:
            raise ConfigError(f"cross_attn_every={self.cross_attn_every} must be in [1, n_layer={t.n_layer}]")
        if self.gate_type not in GATE_TYPES:
            raise ConfigError(f"gate_type={self.gate_type!r} is not one of {list(GATE_TYPES)}")
        if self.resampler_activation not in ACTIVATIONS:
            raise ConfigError(f"resampler_activation={self.resampler_activation!r} is not one of {list(ACTIVATIONS)}")
        if self.resampler_intermediate_size is None:
            self.resampler_intermediate_size = 4 * self.vision.width
        for fname in ("n_latents", "resampler_depth", "resampler_heads", "resampler_head_dim"):
            if self.use_resampler and getattr(self, fname) <= 0:
                raise ConfigError(f"{fname}={getattr(self, fname)} must be positive (or use_resampler=False)")
        if not 0 <= self.additional_vocab_size < t.vocab_size:
            raise ConfigError(f"additional_vocab_size={self.additional_vocab_size} must be in [0, {t.vocab_size})")

    @property
    def xattn_layers(self) -> list:
        """The LM blocks a gated cross-attention layer runs before."""
        return list(range(0, self.text.n_layer, self.cross_attn_every))

    @property
    def tokens_per_image(self) -> int:
        return self.n_latents if self.use_resampler else self.vision.num_tokens

    def replace(self, **changes) -> "FlamingoConfig":
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------- the two trained parts
class PerceiverLayer(nn.Module):
    """latents (N, L, D) attend to [normed features; normed latents] (queries from the latents only), then a
    pre-LN bias-free MLP; both residual."""

    def __init__(self, c: FlamingoConfig):
        super().__init__()
        D, eps = c.vision.width, c.resampler_norm_eps
        self.context_norm, self.latents_norm = nn.LayerNorm(D, eps=eps), nn.LayerNorm(D, eps=eps)
        self.attn = Attention(D, c.resampler_heads, c.resampler_heads, c.resampler_head_dim, bias=False,
                              out_bias=False, causal=False, cross=True, kv_dim=D,
                              qk_norm="LayerNorm" if c.resampler_qk_norm else None, qk_norm_eps=eps)
        self.mlp_norm = nn.LayerNorm(D, eps=eps)
        self.mlp = MLP(D, c.resampler_intermediate_size, c.resampler_activation, bias=False)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        h = self.latents_norm(latents)  # (N, L, D)
        kv = torch.cat([self.context_norm(features), h], dim=1)  # (N, S + L, D): the paper's concatenation
        latents = latents + self.attn(h, context=kv)
        return latents + self.mlp(self.mlp_norm(latents))


class PerceiverResampler(nn.Module):
    """Any number of visual features (N, S, D) -> a fixed number of latents (N, n_latents, D)."""

    def __init__(self, c: FlamingoConfig):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(c.n_latents, c.vision.width))
        self.layers = nn.ModuleList(PerceiverLayer(c) for _ in range(c.resampler_depth))
        self.norm = nn.LayerNorm(c.vision.width, eps=c.resampler_norm_eps)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        latents = self.latents.to(features.dtype).expand(features.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(features, latents)
        return self.norm(latents)


class GatedCrossAttention(nn.Module):
    """Flamingo's GATED XATTN-DENSE layer, in the LM's own parts (its norm, heads, feed-forward):
    x + tanh(attn_gate) * xattn(norm1(x), media), then + tanh(ff_gate) * ffw(norm2(x)). Both gates start at 0."""

    def __init__(self, c: FlamingoConfig):
        super().__init__()
        t = c.text
        self.norm1 = build_norm(t.norm_class, t.n_embd, t.norm_eps, t.norm_bias)
        self.attn = Attention(t.n_embd, t.n_head, t.n_head, t.head_dim, bias=t.attn_bias, out_bias=t.attn_out_bias,
                              scale=t.attn_scale, dropout=t.dropout, causal=False, cross=True, kv_dim=c.vision.width,
                              qk_norm=t.norm_class if c.xattn_qk_norm else None, qk_norm_eps=t.norm_eps)
        self.norm2 = build_norm(t.norm_class, t.n_embd, t.norm_eps, t.norm_bias)
        self.mlp = build_feedforward(t.mlp_class, t.n_embd, t.intermediate_size, t.activation, t.mlp_bias, t.dropout)
        shape = (1,) if c.gate_type == "float" else (1, 1, t.n_embd)
        self.attn_gate = nn.Parameter(torch.zeros(shape))
        self.ff_gate = nn.Parameter(torch.zeros(shape))

    def forward(self, x: torch.Tensor, media: Optional[torch.Tensor], allowed: Optional[torch.Tensor],
                sees: Optional[torch.Tensor], cache: Optional[CrossKV] = None) -> torch.Tensor:
        """x (B, T, C); media (B, S, D) every image's tokens of the row; allowed (B, 1, T, S) bool the keys each
        token may see (all of them for a token that sees no image, to keep softmax finite); sees (B, T) bool.
        media None: no image anywhere, only the dense branch runs."""
        if media is not None:
            h = self.attn(self.norm1(x), mask=allowed, context=media, cache=cache)  # (B, T, C)
            x = x + torch.tanh(self.attn_gate) * h.masked_fill(~sees[..., None], 0.0)
        return x + torch.tanh(self.ff_gate) * self.mlp(self.norm2(x))


# ---------------------------------------------------------------------- media masking
def media_index(input_ids: torch.Tensor, image_token_id: int, end_of_chunk_id: Optional[int] = None,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, T) ids -> (B, T) the row's index of the latest image at or before each token, -1 where none: before the
    first placeholder, and after an end-of-chunk token until the next placeholder. Padding is never an image."""
    ids = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, -1)
    is_img = ids == image_token_id
    idx = is_img.long().cumsum(1) - 1  # (B, T)
    if end_of_chunk_id is not None:
        t = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        last_img = torch.where(is_img, t, -1).cummax(1).values
        eoc = torch.where(ids == end_of_chunk_id, t, -1).cummax(1).values  # the latest end of chunk at or before t
        eoc = torch.cat([torch.full_like(eoc[:, :1], -1), eoc[:, :-1]], dim=1)  # ... strictly before t
        idx = idx.masked_fill(eoc > last_img, -1)
    return idx


def media_mask(index: torch.Tensor, n_images: int) -> torch.Tensor:
    """(B, T) image index (-1 none) -> (B, T, n_images) bool: which of the row's images each token sees
    (Hugging Face Idefics's image_attention_mask)."""
    if index.numel() and int(index.max()) >= n_images:
        raise ImageTokenError(f"a row holds {int(index.max()) + 1} image placeholders but {n_images} image(s) per row "
                              f"were given; pass pixel_values (B, M, 3, H, W) with M at least the most placeholders "
                              f"in a row")
    return F.one_hot(index.clamp(min=0), n_images).bool() & (index >= 0)[..., None]


@dataclass
class FlamingoOutput:
    logits: torch.Tensor  # (B, T, V)
    loss: Optional[torch.Tensor] = None
    media: Optional[torch.Tensor] = None  # (B, M, L, D) the resampled images


class Flamingo(FrozenParts):
    """The frozen ViT and LM, the Perceiver resampler and the gated cross-attention layers (self.xattn[j] runs
    before LM block config.xattn_layers[j]). freeze(vision=True, lm=True) is Flamingo's training setting."""

    def __init__(self, config: FlamingoConfig):
        super().__init__()
        self.config = c = config
        self.vision = ViT(c.vision)
        self.resampler = PerceiverResampler(c) if c.use_resampler else None
        self.xattn = nn.ModuleList(GatedCrossAttention(c) for _ in c.xattn_layers)
        self.lm = TransformerLM(c.text)

    @property
    def device(self):
        return self.lm.device

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def freeze(self, vision: bool = True, lm: bool = True) -> "Flamingo":
        return self.freeze_parts([n for n, on in (("vision", vision), ("lm", lm)) if on])

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, M, 3, H, W) normalised pixels, or (B, 3, H, W) one image per row -> (B, M, L, D) media tokens."""
        if pixel_values.dim() == 4:
            pixel_values = pixel_values[:, None]
        B, M = pixel_values.shape[:2]
        h = self.vision(pixel_values.flatten(0, 1).to(self.device)).last_hidden_state  # (B*M, N, D)
        if self.resampler is not None:
            h = self.resampler(h)  # (B*M, L, D)
        return h.view(B, M, *h.shape[1:])

    def image_attention_mask(self, input_ids: torch.Tensor, n_images: int,
                             attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, T) ids -> (B, T, n_images) bool: the image each token sees."""
        c = self.config
        return media_mask(media_index(input_ids, c.image_token_id, c.end_of_chunk_id, attention_mask), n_images)

    def _hooks(self, media: Optional[torch.Tensor], mask: Optional[torch.Tensor], caches=None) -> dict:
        """The LM's before_block layers for media (B, M, L, D) seen through mask (B, T, M)."""
        allowed = sees = flat = None
        if media is not None:
            B, M, L, D = media.shape
            flat = media.reshape(B, M * L, D)
            keys = mask[..., None].expand(*mask.shape, L).reshape(B, mask.shape[1], M * L)  # (B, T, M*L)
            sees = keys.any(-1)  # (B, T)
            allowed = (keys | ~sees[..., None])[:, None]  # (B, 1, T, M*L)
        return {layer: partial(self.xattn[j], media=flat, allowed=allowed, sees=sees,
                               cache=caches[j] if caches is not None else None)
                for j, layer in enumerate(self.config.xattn_layers)}

    def forward(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None, *,
                media: Optional[torch.Tensor] = None, image_attention_mask: Optional[torch.Tensor] = None
                ) -> FlamingoOutput:
        """input_ids (B, T) with one placeholder per image; pixel_values (B, M, 3, H, W), row r's images first
        (rows with fewer images are padded with any pixels), or media (B, M, L, D) from encode_images;
        image_attention_mask (B, T, M) overrides the media mask computed from the placeholders; labels (B, T)
        aligned with input_ids (-100 unscored; next-token shift inside)."""
        input_ids = input_ids.to(self.device)
        if pixel_values is not None:
            media = self.encode_images(pixel_values)
        if image_attention_mask is None:
            self._check_images_given(input_ids, media)
        mask = None
        if media is not None:
            mask = (image_attention_mask.to(self.device).bool() if image_attention_mask is not None else
                    self.image_attention_mask(input_ids, media.shape[1], attention_mask))
        logits = self.lm(input_ids, attention_mask=attention_mask, before_block=self._hooks(media, mask))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        return FlamingoOutput(logits, loss, media)

    def _check_images_given(self, input_ids: torch.Tensor, media: Optional[torch.Tensor]) -> None:
        if media is None and bool((input_ids == self.config.image_token_id).any()):
            raise ImageTokenError("the text holds image placeholders but no pixel_values (or media) were given")

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, *, media: Optional[torch.Tensor] = None,
                 max_new_tokens: int = 30, **kwargs) -> torch.Tensor:
        """Prompt ids (B, T) (padded either side) with their images -> the new tokens (B, n), decoded with the LM's
        KV cache; the images' keys and values are projected once per cross-attention layer. New tokens see the
        image the prompt's last token sees (as transformers' Idefics): stop at the end of the chunk (eos_id)."""
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device) if attention_mask is not None else None
        if pixel_values is not None:
            media = self.encode_images(pixel_values)
        self._check_images_given(input_ids, media)
        attention_mask, input_ids = left_padded(attention_mask, input_ids)
        mask = self.image_attention_mask(input_ids, media.shape[1], attention_mask) if media is not None else None
        caches = [CrossKV() for _ in self.xattn]
        prefill = self._hooks(media, mask, caches)
        step = self._hooks(media, mask[:, -1:] if mask is not None else None, caches)
        return generate_from_embeds(self.lm, self.lm.wte(input_ids), attention_mask, max_new_tokens=max_new_tokens,
                                    prompt_ids=input_ids, lm_kwargs={"before_block": prefill},
                                    step_kwargs={"before_block": step}, **kwargs)

    # ------------------------------------------------------------------ interleaved prompts
    def few_shot(self, tokenizer, shots: Sequence, query, *, max_new_tokens: int = 8, **kwargs) -> str:
        """In-context learning: shots [(image (3, H, W), text), ...] then query (image, text prefix) -> the
        continuation of the query's text, decoded until the end of the chunk."""
        ids, images = few_shot_prompt(tokenizer, shots, query, self.config.image_token_id, self.config.end_of_chunk_id)
        kwargs.setdefault("eos_id", self.config.end_of_chunk_id if self.config.end_of_chunk_id is not None
                          else tokenizer.eos_id)
        out = self.generate(torch.tensor([ids]), images[None], max_new_tokens=max_new_tokens, **kwargs)
        return tokenizer.decode(out[0].tolist()).strip()

    def save(self, path, format: str = "allformers", tokenizer=None):
        """An allformers folder, or format="hf": IdeficsForVisionText2Text."""
        if format == "hf":
            from ..checkpoints.hf_idefics import save_hf_idefics

            return save_hf_idefics(self, path, tokenizer=tokenizer)
        from ..checkpoints import save

        return save(self, path, format=format, tokenizer=tokenizer)


def interleave(parts: Sequence, tokenizer, image_token_id: int) -> tuple:
    """An interleaved document: parts are text (str) and images ((3, H, W) tensors) in reading order ->
    (ids with one placeholder per image, images (M, 3, H, W) in order, or None)."""
    ids, images = [], []
    if tokenizer.add_bos and tokenizer.bos_id is not None:
        ids.append(tokenizer.bos_id)
    for part in parts:
        if isinstance(part, str):
            ids += tokenizer.encode(part, add_bos=False)
        elif isinstance(part, int):  # a token id (an end of chunk)
            ids.append(part)
        else:
            ids.append(image_token_id)
            images.append(part)
    return ids, torch.stack(images) if images else None


def few_shot_prompt(tokenizer, shots: Sequence, query, image_token_id: int, end_of_chunk_id: Optional[int] = None):
    """Flamingo's few-shot prompt: <image> text <EOC> per shot, then <image> query text (its answer to come)."""
    parts = []
    for image, text in shots:
        parts += [image, text] + ([end_of_chunk_id] if end_of_chunk_id is not None else [])
    parts += [query[0], query[1]]
    return interleave(parts, tokenizer, image_token_id)
