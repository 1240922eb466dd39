"""The one epoch sampler: rows drawn in epochs, each epoch a fresh permutation from the sampler's own
generator, `next_rows(n)` continuing where the last batch stopped (across epoch boundaries). Its
state (generator, permutation, position, epoch) goes into checkpoints, so a resumed run sees the same
batches. The data classes of fine-tuning, seq2seq and SFT mix it in."""
from __future__ import annotations

import torch


class EpochSampler:
    """Mixin: call `start_epochs(n_rows, seed)` in __init__; the rows are indices 0 .. n_rows - 1."""

    def start_epochs(self, n_rows: int, seed: int = 0) -> None:
        if n_rows < 1:  # next_rows would loop for ever over empty epochs
            raise ValueError(f"no rows to sample from (n_rows={n_rows}); give the data set at least one example")
        self.n_rows = n_rows
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(n_rows, generator=self.generator)
        self.pos, self.epoch = 0, 0

    def _turn(self) -> None:
        if self.pos == len(self.order):  # the epoch is used up: a fresh permutation
            self.order = torch.randperm(self.n_rows, generator=self.generator)
            self.pos, self.epoch = 0, self.epoch + 1

    def next_rows(self, n: int) -> list:
        rows = []
        while len(rows) < n:
            self._turn()
            take = min(n - len(rows), len(self.order) - self.pos)
            rows += self.order[self.pos:self.pos + take].tolist()
            self.pos += take
        return rows

    def peek_row(self) -> int:
        """The next row without taking it (SFT's packing decides whether it still fits); `pos += 1` takes it."""
        self._turn()
        return int(self.order[self.pos])

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self.order, "pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order, self.pos, self.epoch = state["order"], state["pos"], state["epoch"]
