"""Encoder inference in one call: sentence embeddings and classification of texts."""
from __future__ import annotations

import torch

from .errors import AllformersError


def _check(model, task):
    if getattr(model.config, "task", "lm") != task:
        raise AllformersError(f"this model's task is {model.config.task!r}, not {task!r}; load a {task} model "
                              f"(e.g. a sentence-transformers folder for embeddings, a fine-tuned folder for classification)")
    if getattr(model, "tokenizer", None) is None:
        raise AllformersError("the model has no tokenizer; save it with its tokenizer")


@torch.inference_mode()
def embed(model, texts: list, batch_size: int = 32, max_length: int = 256) -> torch.Tensor:
    """Texts -> (N, C) sentence embeddings (unit length for sentence-transformers models)."""
    _check(model, "embedding")
    out = []
    for i in range(0, len(texts), batch_size):
        b = model.tokenizer.batch(texts[i:i + batch_size], max_length=max_length)
        out.append(model(b["input_ids"].to(model.device), attention_mask=b["attention_mask"].to(model.device),
                         token_type_ids=b["token_type_ids"].to(model.device)))
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
