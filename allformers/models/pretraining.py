"""BERT / ALBERT pretraining in one forward: the body's MLM head plus a pooled sentence-pair head.

BERT (Devlin et al. 2019) trains masked language modelling and next sentence prediction at
once; ALBERT (Lan et al. 2020) swaps NSP for sentence order prediction. Both are one encoder
body with two heads, as Hugging Face's BertForPreTraining / AlbertForPreTraining:

  mlm_logits  (B, T, V): the body's own LM head (head_transform + tied decoder, `TransformerLM.head`)
  pair_logits (B, 2):    the [CLS] state through a pooler (dense + tanh) and a 2-way classifier

Which one is built is a Config switch (task="pretraining"), so it saves and loads like any model.
`pretraining_loss(model, batch)` = MLM cross-entropy + sentence-pair cross-entropy, the Trainer's
loss_fn; batches come from build_nsp_examples / build_sop_examples masked by MLMMasker.apply."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import Config
from ..errors import ConfigError
from ..objectives.mlm import ObjectiveError, masked_cross_entropy, model_inputs
from .heads import ClassificationHead, pool
from .lm import TransformerLM

PAIR_LABEL_KEYS = ("next_sentence_label", "sentence_order_label")  # NSP (BERT) / SOP (ALBERT)


class PretrainingModel(nn.Module):
    """body: a TransformerLM with its MLM head; head: pooler (dense + classifier_activation) -> 2 logits."""

    def __init__(self, config: Config):
        super().__init__()
        if config.task != "pretraining":
            raise ConfigError(f"PretrainingModel needs task='pretraining', got task={config.task!r}")
        self.config = c = config
        self.body = TransformerLM(c)
        self.head = ClassificationHead(c.n_embd, 2, dense=c.classifier_dense, activation=c.classifier_activation,
                                       dropout=c.dropout)

    def forward(self, idx: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None):
        """idx (B, T) -> (mlm_logits (B, T, vocab), pair_logits (B, 2))."""
        h = self.body(idx, attention_mask=attention_mask, token_type_ids=token_type_ids, position_ids=position_ids,
                      return_hidden=True)  # (B, T, C)
        return self.body.head(h), self.head(pool(h, attention_mask, self.config.pooling))

    @property
    def device(self):
        return self.body.device

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save(self, path, format: str = "allformers", **kwargs):
        from ..checkpoints import save

        return save(self, path, format=format, **kwargs)


def _pair_key(batch: dict, label_key: Optional[str]) -> str:
    key = label_key or next((k for k in PAIR_LABEL_KEYS if k in batch), None)
    if key is None or key not in batch:
        raise ObjectiveError(f"a pretraining batch needs a sentence-pair label under one of {PAIR_LABEL_KEYS} "
                             f"(keys: {sorted(batch)}); build it with build_nsp_examples / build_sop_examples")
    return key


def pretraining_losses(model, batch: dict, label_key: Optional[str] = None) -> dict:
    """{"mlm": ..., "pair": ..., "loss": mlm + pair} for a batch with input_ids (masked), labels (-100 where not
    predicted), a pair label (next_sentence_label or sentence_order_label) and optionally attention_mask,
    token_type_ids, position_ids. The sum is Hugging Face's BertForPreTraining loss."""
    if not isinstance(batch, dict) or "input_ids" not in batch or "labels" not in batch:
        raise ObjectiveError("a pretraining batch is a dict with 'input_ids' (masked) and 'labels'; mask it with "
                             "MLMMasker.apply")
    key = _pair_key(batch, label_key)
    mlm_logits, pair_logits = model(batch["input_ids"], **model_inputs(batch))
    mlm = masked_cross_entropy(mlm_logits, batch["labels"])
    pair = F.cross_entropy(pair_logits.float(), batch[key])
    return {"mlm": mlm, "pair": pair, "loss": mlm + pair}


def pretraining_loss(model, batch: dict) -> torch.Tensor:
    """MLM + NSP/SOP cross-entropy: the Trainer's loss_fn for a PretrainingModel."""
    return pretraining_losses(model, batch)["loss"]


def _num_tokens(batch) -> int:
    if batch.get("attention_mask") is not None:
        return int(batch["attention_mask"].sum())
    return batch["input_ids"].numel()


pretraining_loss.num_tokens = _num_tokens  # tokens/s and MFU count real tokens, as MaskedLM does


class Pretraining:
    """The MLM + sentence-pair objective object for the Trainer (label_key: pin NSP or SOP labels)."""

    name = "pretraining"

    def __init__(self, label_key: Optional[str] = None):
        self.label_key = label_key

    def __call__(self, model, batch) -> torch.Tensor:
        return pretraining_losses(model, batch, self.label_key)["loss"]

    num_tokens = staticmethod(_num_tokens)


__all__ = ["PretrainingModel", "pretraining_loss", "pretraining_losses", "Pretraining", "PAIR_LABEL_KEYS"]
