"""Language models that read an image too (Multimodal-CoT's fused T5 and a PaLM-E-style decoder).

  * `MultimodalSeq2Seq`: an unchanged `Seq2SeqLM` (T5) plus a vision encoder and a `GatedFusion`
    that sits between the encoder output and the decoder: encode text, fuse image features into
    it, hand the fused states to the decoder as its `encoder_out`. With the gate forced to 0 it
    is the text-only T5, exactly.
  * `MultimodalDecoderLM` (PaLM-E, Driess et al. 2023): image features projected to the word
    embedding size and spliced into the input sequence of a decoder-only LM (e.g. SmolLM2) after
    its first `image_pos` prompt tokens; trained with LoRA on the LM or with the projection alone.
    ScienceQA's variant of the general image + text decoder (models/vlm.py: VisionLanguageLM, image
    placeholders anywhere in the text, LLaVA's projector, chat with pictures), whose decoding it shares.

Images reach both as `images` (B, C, H, W) in [0, 1] with `has_image` (B,) when the model owns a
vision encoder (ViT / DETR), or as precomputed `image_features` (B, N, P) with `image_mask` (B, N)
(feature files, kind "features"). A question without an image simply has has_image False."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..blocks.fusion import GatedFusion
from ..blocks.vision import ConvBackbone, DETREncoder, VisionError
from ..config import Config, SavedConfig
from ..objectives.ddp import unwrap
from .lm import TransformerLM
from .seq2seq import Seq2SeqLM
from .vit import ViTEncoder

IGNORE_INDEX = -100


@dataclass
class MultimodalConfig(SavedConfig):  # saved with its text Config nested
    text: Config  # the T5 (is_encoder_decoder=True) or decoder-only LM
    # {"kind": "vit", ViTEncoder kwargs} | {"kind": "detr", "backbone": {"kind": "cnn"|"vit", ...}, DETREncoder
    # kwargs} | {"kind": "features", "patch_dim": P} (precomputed, no encoder) | None: text only (no fusion)
    vision: Optional[dict] = field(default_factory=lambda: {"kind": "vit"})
    image_pos: int = 0  # decoder-only: prompt tokens before the image tokens (e.g. the chat header)
    base: Optional[str] = None  # decoder-only: pretrained LM whose weights are not stored (SmolLM2)
    lora: Optional[dict] = None  # LoRAConfig fields when the LM carries LoRA adapters

    def __getattr__(self, name):
        # Generic code (MFU, context limits) reads sizes such as n_layer or block_size: the text model's.
        if name == "text" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.text, name)


def build_vision(spec: Optional[dict]) -> tuple[Optional[nn.Module], int]:
    """A vision spec -> (encoder or None for precomputed features, feature dim P); None -> (None, 0): text only."""
    if spec is None:
        return None, 0
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind == "vit":
        enc = ViTEncoder(**spec)
        return enc, enc.out_dim
    if kind == "detr":
        bb = dict(spec.pop("backbone", {"kind": "cnn"}))
        bb_kind = bb.pop("kind", "cnn")
        if bb_kind == "cnn":
            backbone = ConvBackbone(**bb)
        elif bb_kind == "vit":
            backbone = ViTEncoder(**bb)
        else:
            raise VisionError(f"DETR backbone kind {bb_kind!r}: 'cnn' or 'vit'")
        enc = DETREncoder(backbone, backbone.out_dim, **spec)
        return enc, enc.out_dim
    if kind == "features":
        return None, int(spec["patch_dim"])
    raise VisionError(f"vision kind {kind!r} is not one of 'vit', 'detr', 'features'")


class _Vision(nn.Module):
    """Shared by both models: turn whatever image input a batch carries into (features, mask)."""

    def _init_vision(self, spec: dict):
        self.vision, self.patch_dim = build_vision(spec)

    def visual(self, images=None, has_image=None, image_features=None, image_mask=None):
        """-> (features (B, N, P), mask (B, N) bool) or (None, None) when the batch carries no image
        (or the model is text-only: then any image is ignored)."""
        if not self.patch_dim:
            return None, None
        if image_features is not None:
            if image_features.shape[-1] != self.patch_dim:
                raise VisionError(f"image features of dim {image_features.shape[-1]}; this model was built for "
                                  f"{self.patch_dim} (vision spec {self.config.vision})")
            if image_mask is None:
                image_mask = torch.ones(image_features.shape[:2], dtype=torch.bool, device=image_features.device)
            return image_features, image_mask.bool()
        if images is None:
            return None, None
        if self.vision is None:
            raise VisionError("this model reads precomputed image_features (vision kind 'features'), not images")
        B = images.shape[0]
        if has_image is None:
            has_image = torch.ones(B, dtype=torch.bool, device=images.device)
        has_image = has_image.bool()
        rows = has_image.nonzero().flatten()
        # encode only the rows that have a picture; the others get zeros and an all-False mask
        n, d = self.vision.num_tokens, self.vision.out_dim
        feats = torch.zeros(B, n, d, device=images.device, dtype=images.dtype)
        if len(rows):
            feats = feats.index_copy(0, rows, self.vision(images[rows]))
        return feats, has_image[:, None].expand(B, n)


def image_kwargs(batch: dict) -> dict:
    """The image entries of a batch dict, by the names the models take."""
    return {k: batch[k] for k in ("images", "has_image", "image_features", "image_mask") if k in batch}


class MultimodalSeq2Seq(_Vision):
    def __init__(self, config: MultimodalConfig, t5: Optional[Seq2SeqLM] = None):
        super().__init__()
        self.config = config
        self.t5 = t5 if t5 is not None else Seq2SeqLM(config.text)
        self._init_vision(config.vision)
        self.fusion = GatedFusion(config.text.n_embd, self.patch_dim) if config.vision else None

    @property
    def device(self):
        return self.t5.device

    def encode(self, input_ids, attention_mask=None, *, return_gate: bool = False, **image):
        """Text (B, S) + image -> fused encoder states (B, S, D) [and the gate (B, S, D)]."""
        h = self.t5.encode(input_ids, attention_mask)  # (B, S, D)
        gate = None
        if self.fusion is not None:  # text-only: the T5 encoder output goes to the decoder as it is
            feats, mask = self.visual(**image)
            h, gate = self.fusion(h, feats, mask)
        return (h, gate) if return_gate else h

    def forward(self, input_ids, decoder_input_ids, attention_mask=None, encoder_out=None, cache=None,
                last_only: bool = False, **image) -> torch.Tensor:
        if encoder_out is None:
            encoder_out = self.encode(input_ids, attention_mask, **image)
        return self.t5(None, decoder_input_ids, attention_mask=attention_mask, encoder_out=encoder_out, cache=cache,
                       last_only=last_only)

    def shift_right(self, labels):
        return self.t5.shift_right(labels)

    @torch.inference_mode()
    def generate(self, input_ids, attention_mask=None, *, images=None, has_image=None, image_features=None,
                 image_mask=None, **kwargs) -> torch.Tensor:
        from ..generation.seq2seq import generate_seq2seq

        enc = self.encode(input_ids.to(self.device), attention_mask.to(self.device) if attention_mask is not None else None,
                          **_to(dict(images=images, has_image=has_image, image_features=image_features,
                                     image_mask=image_mask), self.device))
        return generate_seq2seq(self.t5, input_ids, attention_mask, encoder_out=enc, **kwargs)

    def save(self, path, tokenizer=None):
        from ..checkpoints.composite import save_multimodal

        return save_multimodal(self, path, tokenizer)


class MultimodalDecoderLM(_Vision):
    def __init__(self, config: MultimodalConfig, lm: Optional[TransformerLM] = None):
        super().__init__()
        self.config = config
        self.lm = lm if lm is not None else TransformerLM(config.text)
        self._init_vision(config.vision)
        # PaLM-E's projector: image features -> the word embedding space
        self.proj = nn.Linear(self.patch_dim, config.text.embedding_size) if config.vision else None

    @property
    def device(self):
        return self.lm.device

    def splice(self, input_ids, attention_mask=None, labels=None, *, side: str = "right", **image) -> dict:
        """Insert the projected image tokens after the first `image_pos` real tokens of each row.
        input_ids (B, T) padded either side, attention_mask (B, T), labels (B, T) aligned with the ids ->
        {inputs_embeds (B, T', E), attention_mask (B, T'), labels (B, T') or None}, padded on `side`.
        No-image rows keep their slots, masked out: positions skip them (they count real tokens only)."""
        B, T = input_ids.shape
        mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        emb = self.lm.wte(input_ids)  # (B, T, E)
        feats, fmask = self.visual(**image)
        img = self.proj(feats) if feats is not None else emb.new_zeros(B, 0, emb.shape[-1])  # (B, N, E)
        fmask = fmask if fmask is not None else mask.new_zeros(B, 0)
        p = self.config.image_pos
        rows_e, rows_m, rows_l = [], [], []
        for b in range(B):
            real = mask[b].nonzero().flatten()  # the row's real tokens, in order
            head, tail = real[:p], real[p:]
            rows_e.append(torch.cat([emb[b, head], img[b], emb[b, tail]]))
            rows_m.append(torch.cat([mask[b, head], fmask[b], mask[b, tail]]))
            if labels is not None:
                rows_l.append(torch.cat([labels[b, head], labels.new_full((img.shape[1],), IGNORE_INDEX),
                                         labels[b, tail]]))
        L = max(len(r) for r in rows_e)

        def pad(rows, value):
            out = []
            for r in rows:
                fill = r.new_full((L - len(r), *r.shape[1:]), value)
                out.append(torch.cat([r, fill] if side == "right" else [fill, r]))
            return torch.stack(out)

        return {"inputs_embeds": pad(rows_e, 0.0), "attention_mask": pad(rows_m, False),
                "labels": pad(rows_l, IGNORE_INDEX) if labels is not None else None}

    def forward(self, input_ids, attention_mask=None, labels=None, **image) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """-> (logits (B, T', V), labels (B, T') aligned with them, or None)."""
        s = self.splice(input_ids, attention_mask, labels, **image)
        logits = self.lm(None, attention_mask=s["attention_mask"].long(), inputs_embeds=s["inputs_embeds"])
        return logits, s["labels"]

    @torch.inference_mode()
    def generate(self, input_ids, attention_mask=None, *, max_new_tokens: int = 64, eos_id=None, pad_id=None,
                 temperature: float = 0.0, top_k=None, top_p=None, repetition_penalty: float = 1.0,
                 generator=None, on_token=None, **image) -> torch.Tensor:
        """Prompt ids (B, T) (padded either side) + image -> the new tokens (B, n)."""
        from .vlm import generate_from_embeds

        dev = self.device
        s = self.splice(input_ids.to(dev), attention_mask.to(dev) if attention_mask is not None else None,
                        side="left", **_to(image, dev))
        return generate_from_embeds(self.lm, s["inputs_embeds"], s["attention_mask"], max_new_tokens=max_new_tokens,
                                    temperature=temperature, top_k=top_k, top_p=top_p,
                                    repetition_penalty=repetition_penalty, eos_id=eos_id, pad_id=pad_id,
                                    generator=generator, on_token=on_token)

    def save(self, path, tokenizer=None):
        from ..checkpoints.composite import save_multimodal

        return save_multimodal(self, path, tokenizer)


def seq2seq_loss(model, batch: dict) -> torch.Tensor:
    """Teacher-forced cross-entropy of a MultimodalSeq2Seq on batch["labels"] (-100 = padding)."""
    labels = batch["labels"]
    dec = unwrap(model).shift_right(labels)
    logits = model(batch["input_ids"], dec, attention_mask=batch.get("attention_mask"), **image_kwargs(batch))
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX)


def decoder_lm_loss(model, batch: dict) -> torch.Tensor:
    """Next-token cross-entropy of a MultimodalDecoderLM on batch["labels"] (-100 = not scored)."""
    logits, labels = model(batch["input_ids"], batch.get("attention_mask"), batch["labels"], **image_kwargs(batch))
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX)


def _to(d: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in d.items() if v is not None}
