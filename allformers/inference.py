"""Encoder inference in one call: sentence embeddings and classification of texts."""
from __future__ import annotations

from typing import Optional

import torch

from .errors import AllformersError


def _check(model, *tasks):
    if getattr(model.config, "task", "lm") not in tasks:
        raise AllformersError(f"this model's task is {model.config.task!r}, not {' or '.join(map(repr, tasks))}; load "
                              f"a {tasks[0]} model (e.g. a sentence-transformers folder or a bare encoder for "
                              f"embeddings, a fine-tuned folder for classification)")
    if getattr(model, "tokenizer", None) is None:
        raise AllformersError("the model has no tokenizer; save it with its tokenizer")


@torch.inference_mode()
def embed(model, texts: list, batch_size: int = 32, max_length: int = 256, pooling: Optional[str] = None,
          normalize: Optional[bool] = None) -> torch.Tensor:
    """Texts -> (N, C) sentence embeddings. A sentence encoder (task="embedding", e.g. a sentence-transformers
    folder) pools as its config says; a bare encoder (task="base", e.g. a saved BertModel) is mean-pooled over
    real tokens and normalised, sentence-transformers' default for a plain model. pooling ("mean", "first",
    "last") and normalize override either."""
    from .models.heads import sentence_embedding

    _check(model, "embedding", "base")
    c = model.config
    sentence = c.task == "embedding"
    pooling = pooling or (c.pooling if sentence else "mean")
    normalize = normalize if normalize is not None else (c.normalize if sentence else True)
    out = []
    for i in range(0, len(texts), batch_size):
        b = {k: v.to(model.device) for k, v in model.tokenizer.batch(texts[i:i + batch_size], max_length=max_length).items()}
        h = model.body(b["input_ids"], attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"],
                       return_hidden=True)  # (B, T, C)
        out.append(sentence_embedding(h, b["attention_mask"], pooling, normalize))
    return torch.cat(out)


@torch.inference_mode()
def classify(model, texts: list, batch_size: int = 32, max_length: int = 256):
    """Texts -> (labels, probabilities (N, num_labels))."""
    _check(model, "sequence-classification")
    probs = []
    for i in range(0, len(texts), batch_size):
        b = model.tokenizer.batch(texts[i:i + batch_size], max_length=max_length)
        logits = model(b["input_ids"].to(model.device), attention_mask=b["attention_mask"].to(model.device),
                       token_type_ids=b["token_type_ids"].to(model.device))
        probs.append(logits.float().softmax(-1))
    probs = torch.cat(probs)
    names = model.config.labels or [str(i) for i in range(model.config.num_labels)]
    return [names[i] for i in probs.argmax(-1).tolist()], probs
