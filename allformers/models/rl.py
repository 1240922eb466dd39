"""The two extra networks of the ChatGPT recipe, built from a causal LM.

- Reward model: the LM's body with a scalar head on the last real token (InstructGPT), a
  TaskModel with task="sequence-classification", num_labels=1, pooling="last". It saves and loads
  like any other allformers model.
- PolicyWithValue: PPO's policy and critic sharing one trunk: the LM's logits, plus a value head
  on the same hidden states. Sharing halves the forward passes a PPO step costs on a CPU; the
  value loss is weighted (vf_coef) so it does not swamp the policy's gradient.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import AllformersError
from .heads import TaskModel
from .lm import TransformerLM


def reward_model_from(lm: TransformerLM) -> TaskModel:
    """A reward model initialised from `lm`'s weights (its head starts at 0: every reply scores 0)."""
    if not isinstance(lm, TransformerLM) or lm.config.is_encoder_decoder:
        raise AllformersError(f"a reward model starts from a decoder-only TransformerLM, not {type(lm).__name__}")
    cfg = lm.config.replace(task="sequence-classification", num_labels=1, labels=None, pooling="last",
                            classifier_dense=False, lm_head=False)
    rm = TaskModel(cfg).to(lm.device)
    missing, unexpected = rm.body.load_state_dict(lm.state_dict(), strict=False)
    unexpected = [k for k in unexpected if not k.startswith("lm_head")]
    if missing or unexpected:
        raise AllformersError(f"could not copy the LM into the reward model body: missing {missing}, "
                              f"unexpected {unexpected}")
    nn.init.zeros_(rm.head.out.weight)
    nn.init.zeros_(rm.head.out.bias)
    if hasattr(lm, "tokenizer"):
        rm.tokenizer = lm.tokenizer
    return rm


def reward_scores(rm: TaskModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) sequences (prompt + reply, any padding) -> (B,) scalar rewards."""
    return rm(input_ids, attention_mask=attention_mask)[:, 0].float()


class PolicyWithValue(nn.Module):
    """forward(input_ids (B, T), index (B, R)) -> (logits (B, R, V), values (B, R)).

    `index` picks, per row, the positions whose next token is a reply token: the logits there
    predict reply token r, and the value there is the critic's estimate of the state before it.
    Only those positions go through the vocabulary projection (the LM head is ~20% of a small
    model's FLOPs per position, and prompts are mostly not reply)."""

    def __init__(self, lm: TransformerLM):
        super().__init__()
        self.lm = lm
        self.config = lm.config
        self.value_head = nn.Linear(lm.config.n_embd, 1).to(lm.device)
        nn.init.zeros_(self.value_head.weight)  # values start at 0: the first advantages are the rewards
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.lm(input_ids, return_hidden=True)  # (B, T, C)
        h = h.gather(1, index[..., None].expand(-1, -1, h.shape[-1]))  # (B, R, C)
        return self.lm.head(h), self.value_head(h)[..., 0].float()
