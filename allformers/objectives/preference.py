"""Losses on preference pairs (a prompt, a chosen reply, a rejected reply).

- Reward model (InstructGPT): -log sigmoid(r_chosen - r_rejected).
- DPO (Rafailov et al. 2023): the policy is its own reward model, r = beta * log(pi / ref);
  loss = -log sigmoid(beta * [(log pi_c - log ref_c) - (log pi_r - log ref_r)]).
- IPO (Azar et al. 2023): squared loss pulling that log-ratio gap to 1 / (2 beta) instead of to
  infinity, which keeps the policy from drifting on pairs it already separates.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import AllformersError

PREFERENCE_LOSSES = ("dpo", "ipo")


def reward_pair_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """(B,), (B,) scalar rewards -> (loss, {accuracy, margin})."""
    diff = r_chosen.float() - r_rejected.float()
    loss = -F.logsigmoid(diff).mean()
    return loss, {"accuracy": (diff > 0).float().mean().item(), "margin": diff.mean().item()}


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p(label) over the masked positions: (B, T, V), (B, T), (B, T) -> (B,).
    logits[:, t] predicts labels[:, t] (shift before calling)."""
    logp = torch.gather(F.log_softmax(logits.float(), dim=-1), -1, labels.clamp(min=0)[..., None])[..., 0]
    return (logp * loss_mask).sum(-1)


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, beta: float = 0.1, kind: str = "dpo") -> tuple[torch.Tensor, dict]:
    """DPO or IPO on summed reply log-probs, each (B,) -> (loss, {accuracy, margin, chosen_reward,
    rejected_reward}) where the implicit rewards are beta * (log pi - log ref)."""
    if kind not in PREFERENCE_LOSSES:
        raise AllformersError(f"unknown preference loss {kind!r}; choose one of {PREFERENCE_LOSSES}")
    if beta <= 0:
        raise AllformersError(f"beta={beta} must be > 0 (it scales the implicit reward beta * log(pi / ref))")
    chosen = policy_chosen - ref_chosen  # (B,) log-ratios
    rejected = policy_rejected - ref_rejected
    gap = chosen - rejected
    if kind == "dpo":
        loss = -F.logsigmoid(beta * gap).mean()
    else:
        loss = ((gap - 1.0 / (2.0 * beta)) ** 2).mean()
    stats = {"accuracy": (gap > 0).float().mean().item(), "margin": (beta * gap).mean().item(),
             "chosen_reward": (beta * chosen).mean().item(), "rejected_reward": (beta * rejected).mean().item()}
    return loss, stats
