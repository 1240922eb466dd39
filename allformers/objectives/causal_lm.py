"""Next-token prediction. The shift lives in the data: a batch is (x, y) with y[t] the token
after x[t], so the loss is plain cross-entropy; positions labelled -100 are skipped
(padding, or prompt tokens in instruction tuning)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..blocks.moe import routing_losses

IGNORE_INDEX = -100  # same value as torch's and Hugging Face's default


def causal_lm_loss(model, batch) -> torch.Tensor:
    """batch = (x, y), both (B, T) token ids -> mean cross-entropy over non-ignored targets."""
    x, y = batch
    logits = model(x)  # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=IGNORE_INDEX)


class CausalLM:
    """The objective object: the loss plus how many tokens a batch holds. A model with experts
    (blocks/moe.py) also gets its routers' load-balancing and z losses added while training, and
    returns its routing statistics (tokens per expert, dropped fraction) for the log."""

    name = "causal_lm"

    def __call__(self, model, batch):
        loss = causal_lm_loss(model, batch)
        routing = routing_losses(model)
        if routing is None:
            return loss
        if model.training:
            loss = loss + routing.loss
        return loss, routing.metrics

    @staticmethod
    def num_tokens(batch) -> int:
        return batch[0].numel()
