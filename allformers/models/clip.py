"""CLIP (Radford et al. 2021) and SigLIP (Zhai et al. 2023): a text tower and an image tower whose pooled,
projected, unit-length outputs are compared by a scaled dot product; trained so that each picture scores
highest with its own caption.

  text tower   a TransformerLM stack (token + learned positions, pre-LN blocks, final LN) pooled at one token:
               CLIP: causal, pooled at the end-of-text token (the first eos id; checkpoints whose config says
               eos_token_id=2 use the legacy rule "the highest id", which is where the eos sits);
               SigLIP: bidirectional, pooled at the last position (padding or not, as HF does), then a biased head
  image tower  the one ViT (models/vit.py): CLIP pools its class token, SigLIP its MAP attention probe
  projections  CLIP: bias-free linear maps of both pooled vectors to projection_dim; SigLIP: none
  logits       logits_per_text = exp(logit_scale) * t @ i.T (+ logit_bias: SigLIP); logits_per_image = its transpose
  loss         softmax: symmetric cross-entropy over the batch (CLIP); sigmoid: every pair an independent
               binary label, +1 on the diagonal (SigLIP)

    model = CLIP(CLIPConfig.from_name("clip-tiny-shapes"))
    out = model(input_ids, pixel_values, attention_mask, return_loss=True)
    out.logits_per_image  # (images, texts)
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import Config, ConfigError, SavedConfig
from .lm import TransformerLM
from .vit import ViT, ViTConfig, VisionOutput

TEXT_POOLINGS = ("eos", "argmax", "last")
LOSSES = ("softmax", "sigmoid")


# ---------------------------------------------------------------------- configs
@dataclass
class TextTowerConfig(SavedConfig):
    lm: Config  # the stack: causal (CLIP) or not (SigLIP), learned positions, final norm, no LM head
    pooling: str = "eos"  # eos: first eos_token_id | argmax: the highest token id (CLIP's legacy rule) | last position
    eos_token_id: int = 49407
    head_size: Optional[int] = None  # a biased Linear on the pooled vector (SigLIP's text head); None: none

    def __post_init__(self):
        if self.pooling not in TEXT_POOLINGS:
            raise ConfigError(f"pooling={self.pooling!r} is not one of {list(TEXT_POOLINGS)}")
        if self.lm.lm_head:
            raise ConfigError("a text tower has no LM head: build its Config with lm_head=False")
        if self.pooling == "eos" and not 0 <= self.eos_token_id < self.lm.vocab_size:
            raise ConfigError(f"eos_token_id={self.eos_token_id} is outside the vocabulary of {self.lm.vocab_size}")

    @property
    def width(self) -> int:
        return self.head_size or self.lm.n_embd


@dataclass
class CLIPConfig(SavedConfig):
    text: TextTowerConfig
    vision: ViTConfig
    name: str = ""
    description: str = ""
    projection_dim: Optional[int] = 512  # bias-free projections of both towers (CLIP); None: none (SigLIP)
    loss: str = "softmax"  # softmax (CLIP) | sigmoid (SigLIP)
    logit_scale_init: float = math.log(1 / 0.07)  # CLIP starts at temperature 0.07; SigLIP at log(10)
    logit_bias_init: Optional[float] = None  # SigLIP: -10 (the pairs are mostly negatives); None: no bias

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ConfigError(f"loss={self.loss!r} is not one of {list(LOSSES)}")
        if self.projection_dim is None and self.text.width != self.vision.width:
            raise ConfigError(f"without projections the towers must meet in one width: text {self.text.width}, "
                              f"image {self.vision.width}; set projection_dim or the text tower's head_size")
        if self.vision.pooling == "none":
            raise ConfigError("the image tower must pool (vision.pooling 'cls', 'map' or 'mean') to be compared")

    @classmethod
    def from_name(cls, name: str, **overrides) -> "CLIPConfig":
        from ..errors import UnknownModelError

        if name not in CLIP_CONFIGS:
            raise UnknownModelError(name, CLIP_CONFIGS)
        return dataclasses.replace(CLIP_CONFIGS[name](), name=name, **overrides)


def _clip_text(vocab_size=49408, block_size=77, n_layer=12, n_head=8, n_embd=512, **kw) -> TextTowerConfig:
    lm = Config(name="clip-text", vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                n_embd=n_embd, causal=True, position="learned", activation="quick_gelu", lm_head=False)
    return TextTowerConfig(lm, **kw)


CLIP_CONFIGS = {  # name -> a function making the config (the sizes of the released checkpoints)
    "clip-vit-base-patch32": lambda: CLIPConfig(
        _clip_text(), ViTConfig.from_name("clip-vit-base-patch32"), projection_dim=512,
        description="CLIP ViT-B/32: 12x512 causal text tower, ViT-B/32 image tower, softmax contrastive loss"),
    "siglip-base-patch16-224": lambda: CLIPConfig(
        TextTowerConfig(Config(name="siglip-text", vocab_size=32000, block_size=64, n_layer=12, n_head=12, n_embd=768,
                               causal=False, position="learned", activation="gelu_tanh", norm_eps=1e-6, lm_head=False),
                        pooling="last", eos_token_id=1, head_size=768),
        ViTConfig.from_name("siglip-base-patch16-224"), projection_dim=None, loss="sigmoid",
        logit_scale_init=math.log(10), logit_bias_init=-10.0,
        description="SigLIP B/16: bidirectional text tower pooled at its last position, MAP image pooling, sigmoid loss"),
    "clip-tiny-shapes": lambda: CLIPConfig(  # the CLIP trained here on the synthetic shapes (CLIP's BPE vocabulary)
        _clip_text(block_size=24, n_layer=2, n_head=4, n_embd=64),
        ViTConfig.from_name("clip-vit-base-patch32", image_size=32, patch_size=4, width=64, depth=2, heads=4),
        projection_dim=64, description="a 2-layer CLIP for the 32x32 synthetic shapes (trains on a CPU)"),
}


# ---------------------------------------------------------------------- outputs and losses
@dataclass
class TextOutput:
    last_hidden_state: torch.Tensor  # (B, T, width) after the final norm
    pooler_output: torch.Tensor  # (B, width or head_size)


@dataclass
class CLIPOutput:
    logits_per_image: torch.Tensor  # (images, texts)
    logits_per_text: torch.Tensor  # (texts, images)
    text_embeds: torch.Tensor  # (texts, P) unit length
    image_embeds: torch.Tensor  # (images, P) unit length
    loss: Optional[torch.Tensor] = None
    text_model_output: Optional[TextOutput] = None
    vision_model_output: Optional[VisionOutput] = None


def contrastive_loss(logits_per_text: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE: text i should pick image i among the batch, and image i text i."""
    target = torch.arange(logits_per_text.shape[0], device=logits_per_text.device)
    return (F.cross_entropy(logits_per_text.float(), target) + F.cross_entropy(logits_per_text.t().float(), target)) / 2


def sigmoid_loss(logits_per_text: torch.Tensor) -> torch.Tensor:
    """SigLIP's loss: every (text, image) pair a binary label, +1 on the diagonal, -1 elsewhere; summed over
    images, averaged over texts (big_vision's, as transformers computes it)."""
    n = logits_per_text.shape[0]
    labels = 2 * torch.eye(n, device=logits_per_text.device) - 1
    return -F.logsigmoid(labels * logits_per_text.float()).sum(dim=-1).mean()


# ---------------------------------------------------------------------- models
class TextTower(nn.Module):
    def __init__(self, config: TextTowerConfig):
        super().__init__()
        self.config = config
        self.body = TransformerLM(config.lm)
        self.head = nn.Linear(config.lm.n_embd, config.head_size) if config.head_size else None

    @property
    def device(self):
        return self.body.device

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None) -> TextOutput:
        """input_ids (B, T), attention_mask (B, T) 1 = real -> TextOutput(last_hidden_state, pooler_output).
        Positions are 0..T-1 whatever the padding (as HF's CLIP and SigLIP text models)."""
        c = self.config
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        h = self.body(input_ids, attention_mask=attention_mask, position_ids=position_ids, return_hidden=True)
        if c.pooling == "last":
            at = torch.full((B,), T - 1, device=h.device)
        elif c.pooling == "argmax":
            at = input_ids.argmax(dim=-1)
        else:  # the first end-of-text token (padding may repeat it)
            at = (input_ids == c.eos_token_id).int().argmax(dim=-1)
        pooled = h[torch.arange(B, device=h.device), at]
        return TextOutput(h, self.head(pooled) if self.head is not None else pooled)

    def save(self, path, format: str = "allformers", tokenizer=None):
        return _save(self, path, format, tokenizer)


class CLIP(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = c = config
        self.text = TextTower(c.text)
        self.vision = ViT(c.vision)
        P = c.projection_dim
        self.text_projection = nn.Linear(c.text.width, P, bias=False) if P else None
        self.visual_projection = nn.Linear(c.vision.width, P, bias=False) if P else None
        self.logit_scale = nn.Parameter(torch.tensor(float(c.logit_scale_init)))
        self.logit_bias = nn.Parameter(torch.tensor(float(c.logit_bias_init))) if c.logit_bias_init is not None else None

    @property
    def device(self):
        return self.logit_scale.device

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def get_text_features(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        """(B, T) ids -> (B, P) text embeddings, not normalised (HF's get_text_features(...).pooler_output)."""
        pooled = self.text(input_ids, attention_mask, position_ids).pooler_output
        return self.text_projection(pooled) if self.text_projection is not None else pooled

    def get_image_features(self, pixel_values, interpolate_pos_encoding: Optional[bool] = None) -> torch.Tensor:
        """(B, C, H, W) normalised pixels -> (B, P) image embeddings, not normalised."""
        pooled = self.vision(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding).pooler_output
        return self.visual_projection(pooled) if self.visual_projection is not None else pooled

    def logits(self, text_embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """Unit-length (texts, P) and (images, P) -> logits_per_text (texts, images)."""
        out = text_embeds @ image_embeds.t() * self.logit_scale.exp()
        return out + self.logit_bias if self.logit_bias is not None else out

    def forward(self, input_ids, pixel_values, attention_mask=None, position_ids=None, return_loss: bool = False,
                interpolate_pos_encoding: Optional[bool] = None) -> CLIPOutput:
        vis = self.vision(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        txt = self.text(input_ids, attention_mask, position_ids)
        image = vis.pooler_output if self.visual_projection is None else self.visual_projection(vis.pooler_output)
        text = txt.pooler_output if self.text_projection is None else self.text_projection(txt.pooler_output)
        image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
        per_text = self.logits(text, image)
        loss = None
        if return_loss:
            loss = (sigmoid_loss if self.config.loss == "sigmoid" else contrastive_loss)(per_text)
        return CLIPOutput(per_text.t(), per_text, text, image, loss, txt, vis)

    def text_inputs(self, tokenizer, texts: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts -> (ids, mask) as the text tower reads them (ending in its end-of-text token when it pools there)."""
        c = self.config.text
        return text_inputs(tokenizer, texts, c.lm.block_size, eos_id=c.eos_token_id if c.pooling == "eos" else None)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "CLIP":
        return cls(CLIPConfig.from_name(name, **overrides))

    def save(self, path, format: str = "allformers", tokenizer=None):
        """An allformers folder, or format="hf": CLIPModel / SiglipModel (whichever has this layout)."""
        return _save(self, path, format, tokenizer)


# ---------------------------------------------------------------------- text in, zero-shot out
def text_inputs(tokenizer, texts: list, length: int, bos_id: Optional[int] = None, eos_id: Optional[int] = None):
    """Texts -> (ids, mask), each (B, <= length), right-padded. A tokenizer that adds its own special tokens
    (CLIP's BPE: <|startoftext|> ... <|endoftext|>) is used as it is; a plain one (the word-level caption
    vocabulary) gets [bos] + words + [eos] here, cut to `length` with the eos kept."""
    from ..errors import InputError

    texts = list(texts)
    if not texts:
        raise InputError("no texts to encode: pass at least one")
    if tokenizer.backend.encode("", add_special_tokens=True).ids:
        batch = tokenizer.batch(texts, max_length=length)
        return batch["input_ids"], batch["attention_mask"]
    head, tail = [bos_id] if bos_id is not None else [], [eos_id] if eos_id is not None else []
    rows = [head + ids[:length - len(head) - len(tail)] + tail for ids in tokenizer.encode_batch(texts)]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r, dtype=torch.long), 1
    return ids, mask


@torch.no_grad()
def zero_shot(model, tokenizer, pixel_values: torch.Tensor, labels: list, template: str = "{}") -> torch.Tensor:
    """Zero-shot classification with any contrastive model (CLIP, SigLIP, CoCa): each label written into
    `template` is a caption; (B, C, H, W) pictures -> (B, labels) probabilities: a softmax over the labels'
    logits (CLIP, CoCa), or each label's own sigmoid (SigLIP, trained with the sigmoid loss)."""
    ids, mask = model.text_inputs(tokenizer, [template.format(label) for label in labels])
    text = F.normalize(model.get_text_features(ids.to(model.device), mask.to(model.device)), dim=-1)
    image = F.normalize(model.get_image_features(pixel_values.to(model.device)), dim=-1)
    per_image = model.logits(text, image).t()  # (images, labels)
    if getattr(model.config, "loss", "softmax") == "sigmoid":
        return torch.sigmoid(per_image)
    return per_image.softmax(dim=-1)


def _save(model, path, format, tokenizer):
    if format == "hf":
        from ..checkpoints.hf_clip import save_hf_clip

        return save_hf_clip(model, path, tokenizer=tokenizer)
    from ..checkpoints import save

    return save(model, path, format=format, tokenizer=tokenizer)
