"""Sentence-pair pretraining examples: BERT's next sentence prediction and ALBERT's sentence
order prediction, built from documents (lists of sentences).

NSP (Devlin et al. 2019, section 3.1): for each example, A is a span of sentences; 50% of the
time B is the span that actually follows A (label 0, IsNext, Hugging Face's convention) and 50%
of the time a span from another document (label 1, NotNext).
SOP (Lan et al. 2020, section 4.2): A and B are two consecutive spans of one document; 50% of
the time in order (label 0) and 50% swapped (label 1). SOP negatives are exactly the positives
with the two segments exchanged, so topic cues cannot solve the task.

Segments follow BERT's create_pretraining_data.py: a chunk of consecutive sentences is split at
a random sentence boundary into A and B, the pair is cut to max_length - 3 tokens by removing
tokens from the longer segment (at its front or back, at random), and laid out as
`[CLS] A [SEP] B [SEP]` with token_type_ids 0 over `[CLS] A [SEP]` and 1 over `B [SEP]`.
Labels are exactly balanced (a shuffled half/half schedule), not merely balanced on average.
"""
from __future__ import annotations

import random
from typing import Optional

import torch
import torch.nn.functional as F

from .mlm import ObjectiveError, model_inputs

LABEL_KEYS = ("next_sentence_label", "sentence_order_label", "labels")


def _encode_documents(documents, tokenizer) -> list[list[list[int]]]:
    """Every sentence as a list of token ids; empty sentences are dropped."""
    out = []
    for d, doc in enumerate(documents):
        if isinstance(doc, str):
            raise ObjectiveError(f"document {d} is a string; a document is a list of sentences")
        sents = list(doc)
        if any(isinstance(s, str) for s in sents):
            if tokenizer is None:
                raise ObjectiveError("sentences are strings: pass tokenizer= (or token id lists)")
            backend = getattr(tokenizer, "backend", None)
            if backend is not None:
                sents = [e.ids for e in backend.encode_batch(list(sents), add_special_tokens=False)]
            else:
                sents = [list(tokenizer.encode(s)) for s in sents]
        out.append([[int(t) for t in s] for s in sents if len(s)])
    return out


def _special(tokenizer, cls_id, sep_id, pad_id):
    def look(value, *names):
        if value is not None:
            return int(value)
        for name in names:
            got = tokenizer.token_id(name) if tokenizer is not None else None
            if got is not None:
                return got
        return None

    cls_id, sep_id = look(cls_id, "[CLS]", "<s>"), look(sep_id, "[SEP]", "</s>")
    pad_id = look(pad_id, "[PAD]", "<pad>")
    if pad_id is None and tokenizer is not None:
        pad_id = tokenizer.pad_id
    missing = [n for n, v in (("cls_id", cls_id), ("sep_id", sep_id), ("pad_id", pad_id)) if v is None]
    if missing:
        raise ObjectiveError(f"no {', '.join(missing)}: pass them, or a tokenizer with [CLS]/[SEP]/[PAD] tokens")
    return cls_id, sep_id, pad_id


def truncate_pair(a: list, b: list, max_tokens: int, rng: random.Random) -> None:
    """BERT's truncate_seq_pair: while too long, drop one token from the longer segment, from its
    front or back with equal probability (in place)."""
    while len(a) + len(b) > max_tokens:
        longer = a if len(a) > len(b) else b
        if rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()


def _chunk(doc, rng, target):
    """Consecutive sentences of `doc` (>= 2 of them) from a random start, until `target` tokens."""
    start = rng.randint(0, len(doc) - 2)
    chunk, n, j = [doc[start]], len(doc[start]), start + 1
    while j < len(doc) and (len(chunk) < 2 or n < target):
        chunk.append(doc[j])
        n += len(doc[j])
        j += 1
    return chunk


def _random_span(doc, rng, target):
    """Sentences of `doc` from a random start until `target` tokens (at least one sentence)."""
    j = rng.randint(0, len(doc) - 1)
    span = []
    while j < len(doc) and (not span or len(span) < target):
        span.extend(doc[j])
        j += 1
    return span


def build_pair_examples(documents, task: str, *, num_examples: Optional[int] = None, max_length: int = 128,
                        tokenizer=None, cls_id: Optional[int] = None, sep_id: Optional[int] = None,
                        pad_id: Optional[int] = None, short_seq_prob: float = 0.0, seed: int = 0) -> dict:
    """documents: list of documents, each a list of sentences (strings with tokenizer=, or token id lists).
    task: "nsp" or "sop". num_examples: default one per document that has >= 2 sentences.
    short_seq_prob: BERT's chance (0.1 there) of a shorter target length, to match fine-tuning.

    Returns input_ids, attention_mask, token_type_ids, each (N, T) right-padded to the longest
    example, and (N,) labels under "next_sentence_label" (NSP) or "sentence_order_label" (SOP)."""
    if task not in ("nsp", "sop"):
        raise ObjectiveError(f"task={task!r} must be 'nsp' or 'sop'")
    if max_length < 5:
        raise ObjectiveError(f"max_length={max_length} must be >= 5 ([CLS] A [SEP] B [SEP] with A, B non-empty)")
    cls_id, sep_id, pad_id = _special(tokenizer, cls_id, sep_id, pad_id)
    docs = _encode_documents(documents, tokenizer)
    usable = [i for i, d in enumerate(docs) if len(d) >= 2]  # documents that hold a consecutive pair
    if not usable:
        raise ObjectiveError("no document has two non-empty sentences: NSP/SOP need consecutive sentences")
    others = [i for i, d in enumerate(docs) if d]
    if task == "nsp" and len(others) < 2:
        raise ObjectiveError("NSP negatives come from another document: give at least two non-empty documents")
    where = {doc_index: k for k, doc_index in enumerate(others)}
    rng = random.Random(seed)
    n = len(usable) if num_examples is None else int(num_examples)
    if n <= 0:
        raise ObjectiveError(f"num_examples={num_examples} must be positive")
    labels = [0] * (n - n // 2) + [1] * (n // 2)
    rng.shuffle(labels)
    max_tokens = max_length - 3
    order: list[int] = []
    rows = []
    for label in labels:
        if not order:  # walk the documents in a fresh random order, again and again
            order = usable[:]
            rng.shuffle(order)
        d = order.pop()
        target = rng.randint(2, max_tokens) if rng.random() < short_seq_prob else max_tokens
        chunk = _chunk(docs[d], rng, target)
        cut = rng.randint(1, len(chunk) - 1)
        a = [t for s in chunk[:cut] for t in s]
        b = [t for s in chunk[cut:] for t in s]
        if label == 1 and task == "nsp":
            k = rng.randrange(len(others) - 1)  # uniform over the other documents
            other = others[k + (k >= where[d])]
            b = _random_span(docs[other], rng, max(1, target - len(a)))
        elif label == 1:  # SOP: the same two segments, swapped
            a, b = b, a
        truncate_pair(a, b, max_tokens, rng)
        rows.append(([cls_id] + a + [sep_id] + b + [sep_id], len(a) + 2))
    T = max(len(ids) for ids, _ in rows)
    out = {"input_ids": torch.full((n, T), pad_id, dtype=torch.long),
           "attention_mask": torch.zeros((n, T), dtype=torch.long),
           "token_type_ids": torch.zeros((n, T), dtype=torch.long)}
    for i, (ids, len_a) in enumerate(rows):
        out["input_ids"][i, :len(ids)] = torch.tensor(ids)
        out["attention_mask"][i, :len(ids)] = 1
        out["token_type_ids"][i, len_a:len(ids)] = 1
    out["next_sentence_label" if task == "nsp" else "sentence_order_label"] = torch.tensor(labels)
    return out


def build_nsp_examples(documents, **kwargs) -> dict:
    """BERT's NSP pairs: label 0 = B follows A, label 1 = B from another document. See build_pair_examples."""
    return build_pair_examples(documents, "nsp", **kwargs)


def build_sop_examples(documents, **kwargs) -> dict:
    """ALBERT's SOP pairs: label 0 = A, B in order, label 1 = the same pair swapped. See build_pair_examples."""
    return build_pair_examples(documents, "sop", **kwargs)


def sentence_pair_loss(model, batch, label_key: Optional[str] = None) -> torch.Tensor:
    """Cross-entropy of a 2-way sequence classifier (TaskModel, task="sequence-classification",
    num_labels=2, pooling on [CLS]) on NSP or SOP labels."""
    key = label_key or next((k for k in LABEL_KEYS if k in batch), None)
    if key is None or key not in batch:
        raise ObjectiveError(f"the batch has none of the label keys {LABEL_KEYS} (keys: {sorted(batch)})")
    logits = model(batch["input_ids"], **model_inputs(batch))  # (B, 2)
    if logits.dim() != 2:
        raise ObjectiveError(f"expected (batch, 2) logits from a sequence classifier, got {tuple(logits.shape)}")
    return F.cross_entropy(logits.float(), batch[key])


class SentencePairPrediction:
    """NSP / SOP objective object for the Trainer."""

    name = "sentence_pair"

    def __init__(self, label_key: Optional[str] = None):
        self.label_key = label_key

    def __call__(self, model, batch) -> torch.Tensor:
        return sentence_pair_loss(model, batch, self.label_key)

    @staticmethod
    def num_tokens(batch) -> int:
        return int(batch["attention_mask"].sum())


__all__ = ["build_nsp_examples", "build_sop_examples", "build_pair_examples", "truncate_pair",
           "sentence_pair_loss", "SentencePairPrediction"]
