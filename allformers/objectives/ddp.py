"""The one DDP unwrap: DistributedDataParallel keeps the model in `.module`, and a loss that reads the
model's own attributes (shift_right, config, body) must look there; a bare model is returned as is."""
from __future__ import annotations


def unwrap(model):
    return getattr(model, "module", model)
