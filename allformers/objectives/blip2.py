"""BLIP-2's objectives (Li et al. 2023, section 3.2; LAVIS's blip2_qformer.py), for models/blip2.py.

Stage 1 (image encoder frozen, no LM), three losses on one batch of (image, caption) pairs, summed:
  ITC  the best query's cosine with the text's [CLS], over the batch, / a learned temperature; symmetric
       cross-entropy with label smoothing 0.1
  ITM  per text, a hard-negative image drawn with probability softmax(sim / temperature) (its own excluded), and
       per image a hard-negative text; the 2-way head scores the B positives and 2B negatives (cross-entropy)
  ITG  the Q-Former's causal text half decodes the caption ([DEC] first) from the queries; label smoothing 0.1
Stage 2 (image encoder and LM frozen): the LM's next-token loss on the text after the projected queries.

A batch: {"pixel_values" (B, 3, H, W), "input_ids" (B, T) Q-Former ids ([CLS] first), "attention_mask" (B, T)}
for stage 1; {"pixel_values", "input_ids" (with the query placeholders), "attention_mask", "labels" (-100 where
unscored)} for stage 2."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .ddp import unwrap

IGNORE_INDEX = -100


def itc_loss(sim_i2t: torch.Tensor, temperature: torch.Tensor, label_smoothing: float = 0.1) -> torch.Tensor:
    """sim_i2t (B, B) image-text cosines, pair i on the diagonal -> the symmetric contrastive loss."""
    logits = sim_i2t.float() / temperature
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target, label_smoothing=label_smoothing)
            + F.cross_entropy(logits.t(), target, label_smoothing=label_smoothing)) / 2


def hard_negatives(sim_i2t: torch.Tensor, temperature: torch.Tensor, generator: Optional[torch.Generator] = None):
    """-> (for each text the index of a negative image, for each image the index of a negative text), each drawn
    with probability softmax(sim / temperature) among the others of the batch (BLIP's hard-negative mining)."""
    with torch.no_grad():
        logits = sim_i2t.float() / temperature
        eye = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
        w_t2i = (logits.t().softmax(dim=1) + 1e-4).masked_fill(eye, 0)  # (texts, images)
        w_i2t = (logits.softmax(dim=1) + 1e-4).masked_fill(eye, 0)  # (images, texts)
        neg_image = torch.multinomial(w_t2i.cpu(), 1, generator=generator)[:, 0].to(logits.device)
        neg_text = torch.multinomial(w_i2t.cpu(), 1, generator=generator)[:, 0].to(logits.device)
    return neg_image, neg_text


def itg_loss(logits: torch.Tensor, input_ids: torch.Tensor, text_mask: Optional[torch.Tensor],
             label_smoothing: float = 0.1) -> torch.Tensor:
    """logits (B, T, V) of the Q-Former's decoder -> next-token loss on the caption's real tokens after the first."""
    labels = input_ids if text_mask is None else input_ids.masked_fill(~text_mask.bool(), IGNORE_INDEX)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)


class Stage1:
    """objective(model, batch) -> ITC + ITM + ITG; the three parts are in `last` (metrics). With a generator the
    hard negatives are reproducible."""

    def __init__(self, generator: Optional[torch.Generator] = None, itc: bool = True, itm: bool = True, itg: bool = True):
        self.generator, self.use = generator, {"itc": itc, "itm": itm, "itg": itg}
        self.last: dict = {}

    def __call__(self, model, batch: dict) -> torch.Tensor:
        m = unwrap(model)
        c = m.config
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        temp = m.temperature.clamp(0.001, 0.5)  # LAVIS keeps it in [0.001, 0.5]
        with torch.no_grad():  # the image encoder is frozen
            image = m.image_embeds(batch["pixel_values"])
        losses = {}
        image_feats, text_feat = m.itc(image, ids, mask)
        sim = m.itc_similarity(image_feats, text_feat)  # (B, B)
        if self.use["itc"]:
            losses["itc"] = itc_loss(sim, temp, c.label_smoothing)
        if self.use["itm"]:
            neg_image, neg_text = hard_negatives(sim, temp, self.generator)
            images = torch.cat([image, image[neg_image], image])  # positives, (text, neg image), (image, neg text)
            texts = torch.cat([ids, ids, ids[neg_text]])
            masks = torch.cat([mask, mask, mask[neg_text]])
            logits = m.itm(images, texts, masks)  # (3B, 2)
            B = ids.shape[0]
            labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(logits.device)
            losses["itm"] = F.cross_entropy(logits.float(), labels)
        if self.use["itg"]:
            losses["itg"] = itg_loss(m.itg(image, ids, mask), ids, mask, c.label_smoothing)
        self.last = {k: float(v) for k, v in losses.items()}
        return sum(losses.values())

    @staticmethod
    def num_tokens(batch) -> int:
        return int(batch["input_ids"].numel())


def stage2_loss(model, batch: dict) -> torch.Tensor:
    """The frozen LM's next-token loss on batch["labels"] (aligned with input_ids; -100: the queries, the prompt)."""
    out = model(batch["pixel_values"], batch["input_ids"], attention_mask=batch.get("attention_mask"),
                labels=batch["labels"])
    return out.loss
