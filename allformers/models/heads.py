"""Task heads that sit on a TransformerLM body: sequence classification, token classification
(NER), ELECTRA's replaced-token detector, extractive QA, sentence embeddings, and none at all
(the bare backbone, HF's BertModel, whose outputs are a BaseModelOutput).

`TaskModel` pairs a body with one head; which head is a Config switch (`task`), so a saved
folder knows how to rebuild itself. Each head's output has the shape of its HF class's."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..blocks.feedforward import ACTIVATIONS
from ..config import Config
from .lm import TransformerLM

ACTS = {**ACTIVATIONS, "tanh": torch.tanh}


def pool(hidden: torch.Tensor, mask: Optional[torch.Tensor], how: str) -> torch.Tensor:
    """(B, T, C) -> (B, C): the first token ([CLS]/<s>), the last real token (a causal LM has read
    the whole sequence only there: reward models) or the mean over real tokens."""
    if how == "first":
        return hidden[:, 0]
    if how == "last":
        if mask is None:
            return hidden[:, -1]
        pos = torch.arange(mask.shape[1], device=mask.device)
        last = (mask.bool() * pos).argmax(1)  # (B,) index of the last real token, left or right padding
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if mask is None:
        return hidden.mean(1)
    m = mask[..., None].to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def sentence_embedding(hidden: torch.Tensor, mask: Optional[torch.Tensor] = None, pooling: str = "mean",
                       normalize: bool = True) -> torch.Tensor:
    """(B, T, C) token states -> (B, C) sentence vectors: pooled (sentence-transformers' default is the mean over
    real tokens) and, with normalize, unit length so that a dot product is the cosine similarity."""
    e = pool(hidden, mask, pooling)
    return F.normalize(e, dim=-1) if normalize else e


class BaseModelOutput(NamedTuple):
    """A bare backbone's outputs, named as Hugging Face's BaseModelOutputWithPooling (and a tuple like its
    return_dict=False output)."""
    last_hidden_state: torch.Tensor  # (B, T, C)
    pooler_output: Optional[torch.Tensor] = None  # (B, C) pooled token -> dense -> activation; None without a pooler


class ClassificationHead(nn.Module):
    """[dense -> activation ->] out. BERT's pooler + classifier, RoBERTa's and ELECTRA's
    classification heads and DistilBERT's pre_classifier are all this with other switches;
    with n_out=None it is BERT's pooler alone (dense -> activation)."""

    def __init__(self, dim: int, n_out: Optional[int], dense: bool, activation: str, dropout: float = 0.0):
        super().__init__()
        self.dense = nn.Linear(dim, dim) if dense else None
        self.act = ACTS[activation]
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.out = nn.Linear(dim, n_out) if n_out is not None else None

    def forward(self, x):
        if self.dense is not None:
            x = self.act(self.dense(self.drop(x)))
        return self.out(self.drop(x)) if self.out is not None else x


def lm_class(config: Config) -> type:
    """The stack a config describes: TransformerLM, or TransformerXL for Transformer-XL / XLNet's
    relative positions with memory (position="relative_xl")."""
    if config.position == "relative_xl":
        from .xlnet import TransformerXL

        return TransformerXL
    return TransformerLM


class TaskModel(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = c = config
        self.body = lm_class(c)(c)
        if c.task == "embedding" or (c.task == "base" and not c.classifier_dense):
            self.head = None
        elif c.task == "base":  # the pooler
            self.head = ClassificationHead(c.n_embd, None, dense=True, activation=c.classifier_activation)
        elif c.task == "question-answering":
            self.head = ClassificationHead(c.n_embd, 2, dense=False, activation="tanh")
        elif c.task == "replaced-token-detection":  # one logit per token: was it replaced?
            self.head = ClassificationHead(c.n_embd, 1, dense=c.classifier_dense, activation=c.classifier_activation,
                                           dropout=c.dropout)
        else:
            self.head = ClassificationHead(c.n_embd, c.num_labels, dense=c.classifier_dense,
                                           activation=c.classifier_activation, dropout=c.dropout)

    def forward(self, idx, attention_mask=None, token_type_ids=None, position_ids=None):
        """sequence-classification: (B, num_labels); token-classification: (B, T, num_labels);
        replaced-token-detection: (B, T); question-answering: (start, end) logits, each (B, T);
        embedding: (B, C), unit length; base: BaseModelOutput(last_hidden_state (B, T, C), pooler_output (B, C))."""
        c = self.config
        h = self.body(idx, attention_mask=attention_mask, token_type_ids=token_type_ids,
                      position_ids=position_ids, return_hidden=True)  # (B, T, C)
        if c.task == "sequence-classification":
            return self.head(pool(h, attention_mask, c.pooling))
        if c.task == "token-classification":
            return self.head(h)
        if c.task == "replaced-token-detection":
            return self.head(h).squeeze(-1)
        if c.task == "base":
            pooled = self.head(pool(h, attention_mask, c.pooling)) if self.head is not None else None
            return BaseModelOutput(h, pooled)
        if c.task == "question-answering":
            start, end = self.head(h).unbind(-1)
            return start, end
        return sentence_embedding(h, attention_mask, c.pooling, c.normalize)

    @property
    def device(self):
        return self.body.device

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def save(self, path, format: str = "allformers", **kwargs):
        from ..checkpoints import save

        return save(self, path, format=format, **kwargs)
