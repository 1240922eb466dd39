"""Teacher-forced sequence-to-sequence cross-entropy (T5, BART, the 2017 Transformer) for the Trainer.

A batch is a dict: input_ids (B, S) and attention_mask (B, S) for the source, labels (B, T) for
the target (-100 past its end), and optionally decoder_input_ids (B, T); without them the
decoder reads the labels shifted one step right after the config's decoder_start_token_id
(`Seq2SeqLM.shift_right`), so position t predicts labels[t] having seen labels[:t]."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .causal_lm import IGNORE_INDEX
from .ddp import unwrap
from .epochs import EpochSampler
from .span_corruption import seq2seq_batch


def seq2seq_loss(model, batch: dict, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over the target tokens (labels != -100)."""
    labels = batch["labels"]
    decoder_input_ids = batch.get("decoder_input_ids")
    if decoder_input_ids is None:
        decoder_input_ids = unwrap(model).shift_right(labels)
    logits = model(batch["input_ids"], decoder_input_ids, attention_mask=batch.get("attention_mask"))
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)


class Seq2SeqLoss:
    """The objective object. num_tokens counts target tokens, so the Trainer's evaluation weights
    each batch by them and its mean is the exact per-token loss."""

    name = "seq2seq"

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def __call__(self, model, batch) -> torch.Tensor:
        return seq2seq_loss(model, batch, self.label_smoothing)

    @staticmethod
    def num_tokens(batch) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())


class Seq2SeqExamples(EpochSampler):
    """Fixed (source, target) id pairs sampled in epochs, each a fresh permutation from the
    sampler's own generator; sample(n) -> a padded batch, cut to its longest row."""

    def __init__(self, sources: Sequence, targets: Sequence, pad_id: int, seed: int = 0):
        if len(sources) != len(targets) or not len(sources):
            raise ValueError(f"{len(sources)} sources and {len(targets)} targets: need as many, at least one")
        self.sources = [np.asarray(s, dtype=np.int64) for s in sources]
        self.targets = [np.asarray(t, dtype=np.int64) for t in targets]
        self.pad_id = pad_id
        self.start_epochs(len(self.sources), seed)

    def __len__(self):
        return len(self.sources)

    def take(self, rows) -> dict:
        return seq2seq_batch([self.sources[i] for i in rows], [self.targets[i] for i in rows], self.pad_id)

    def sample(self, n: int) -> dict:
        return self.take(self.next_rows(n))

    def batches(self, batch_size: int, sort_by_length: bool = True) -> list:
        """Every example once, in batches (by source length when sort_by_length: less padding)."""
        idx = list(range(len(self.sources)))
        if sort_by_length:
            idx.sort(key=lambda i: len(self.sources[i]))
        return [self.take(idx[i:i + batch_size]) for i in range(0, len(idx), batch_size)]


@torch.no_grad()
def greedy_targets(model, sources: Sequence, *, pad_id: int, eos_id: int, max_new_tokens: int = 24,
                   batch_size: int = 64, num_beams: int = 1) -> list[list[int]]:
    """Generate for each source (id list) -> the generated ids, start token and EOS / padding removed."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    out: list = [None] * len(sources)
    for b in range(0, len(order), batch_size):
        rows = order[b:b + batch_size]
        batch = seq2seq_batch([sources[i] for i in rows], [[eos_id]] * len(rows), pad_id)
        seqs = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=max_new_tokens,
                              num_beams=num_beams, eos_id=eos_id, pad_id=pad_id)
        for i, seq in zip(rows, seqs[:, 1:].tolist()):
            out[i] = seq[:seq.index(eos_id)] if eos_id in seq else seq
    model.train(was_training)
    return out


__all__ = ["seq2seq_loss", "Seq2SeqLoss", "Seq2SeqExamples", "greedy_targets", "seq2seq_batch"]
