"""Transformer-XL's training and evaluation order (Dai et al. 2019, section 3.2): the text is cut into
`batch_size` contiguous rows and read `seg_len` tokens at a time, so each batch continues every row
where the previous one stopped. The objective keeps the model's memory (models/xlnet.py: each layer's
hidden states of the last mem_len tokens, detached) from one batch to the next; the loss is plain
next-token cross-entropy on the segment. With mem_len=0 the same code trains the memory-less baseline."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .causal_lm import IGNORE_INDEX
from .ddp import unwrap
from .mlm import ObjectiveError


class SegmentStream:
    """data: 1-D token ids -> batches {"x", "y": (B, seg_len), "reset": bool}, in reading order.
    A Trainer data source (`sample(n)` with n == batch_size; state_dict for exact resumption).
    reset=True marks a batch that starts the rows again (the first one, and after wrapping around)."""

    def __init__(self, data: torch.Tensor, batch_size: int, seg_len: int):
        cols = (len(data) - 1) // batch_size
        if data.dim() != 1 or cols < seg_len:
            raise ObjectiveError(f"{len(data)} tokens cannot fill {batch_size} rows of one {seg_len}-token segment; "
                                 f"use more text, fewer rows or shorter segments")
        self.x = data[: cols * batch_size].view(batch_size, cols).long()  # row b is one contiguous stretch
        self.y = data[1: cols * batch_size + 1].view(batch_size, cols).long()
        self.batch_size, self.seg_len, self.pos = batch_size, seg_len, 0

    def __len__(self) -> int:
        return self.x.shape[1] // self.seg_len

    def _at(self, pos: int) -> dict:
        s = slice(pos, pos + self.seg_len)
        return {"x": self.x[:, s], "y": self.y[:, s], "reset": pos == 0}

    def sample(self, n: int) -> dict:
        if n != self.batch_size:
            raise ObjectiveError(f"a SegmentStream of {self.batch_size} rows was asked for {n}: each row continues "
                                 f"one stretch of text, so the batch size is fixed (batch_size={self.batch_size})")
        if self.pos + self.seg_len > self.x.shape[1]:
            self.pos = 0
        batch = self._at(self.pos)
        self.pos += self.seg_len
        return batch

    def batches(self) -> list:
        """Every segment once, in order: an evaluation split read as Transformer-XL reads it."""
        return [self._at(k * self.seg_len) for k in range(len(self))]

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]


class SegmentLM:
    """The objective: next-token loss on a segment, attending to the memory the previous segment of the
    same mode (training or evaluation) left. A batch with reset=True starts from an empty memory."""

    name = "segment_lm"

    def __init__(self, mem_len: Optional[int] = None):
        self.mem_len = mem_len  # None: the model's config.mem_len (0 reads every segment alone)
        self.memory = {}  # model.training -> XLMemory

    def __call__(self, model, batch: dict) -> torch.Tensor:
        x, y = batch["x"], batch["y"]
        body = unwrap(model)
        memory = self.memory.get(body.training)
        if batch.get("reset") or memory is None or memory.batch not in (None, x.shape[0]):
            memory = self.memory[body.training] = body.new_memory(mem_len=self.mem_len)
        logits = model(x, cache=memory)  # (B, T, V); the memory now holds this segment for the next one
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)

    @staticmethod
    def num_tokens(batch) -> int:
        return batch["x"].numel()
