"""Next-token prediction. The shift lives in the data: a batch is (x, y) with y[t] the token
after x[t], so the loss is plain cross-entropy; positions labelled -100 are skipped
(padding, or prompt tokens in instruction tuning)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # same value as torch's and Hugging Face's default


def causal_lm_loss(model, batch) -> torch.Tensor:
    """batch = (x, y), both (B, T) token ids -> mean cross-entropy over non-ignored targets."""
    x, y = batch
    logits = model(x)  # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=IGNORE_INDEX)


class CausalLM:
    """The objective object: the loss plus how many tokens a batch holds."""

    name = "causal_lm"

    def __call__(self, model, batch) -> torch.Tensor:
        return causal_lm_loss(model, batch)

    @staticmethod
    def num_tokens(batch) -> int:
        return batch[0].numel()
