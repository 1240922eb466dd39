"""PPO for language models (Ziegler et al. 2019; InstructGPT, Ouyang et al. 2022), as pure tensor math.

One reply is one episode. Each reply token is an action; the reward is the reward model's score
at the last reply token, minus a per-token KL penalty to the frozen reference policy:

    r_t = -kl_coef * (log pi(a_t) - log ref(a_t))      (+ score at the last token)

Advantages come from GAE(gamma, lambda) over the value head's estimates and are whitened per
batch; the policy loss is PPO's clipped surrogate and the value loss is clipped around the
values seen at rollout time. Every tensor here is (B, T) over reply tokens with a 0/1 `mask`
(replies are right-padded: a reply's real tokens come first)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the real tokens of the whole batch (std unbiased, as in TRL)."""
    mean = masked_mean(x, mask)
    n = mask.sum().clamp(min=2)
    var = (((x - mean) ** 2) * mask).sum() / (n - 1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under logits: (B, T, V), (B, T) -> (B, T)."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), -1, tokens[..., None])[..., 0]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each next-token distribution: (B, T, V) -> (B, T)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def shaped_rewards(score: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                   kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards (B, T): the KL penalty at every reply token, the score added at the last
    real one. Also returns the per-token KL estimate log pi - log ref (B, T), masked."""
    kl = (logp - ref_logp) * mask
    rewards = -kl_coef * kl
    last = (mask.cumsum(1) == mask.sum(1, keepdim=True)) & mask.bool()  # one True per row: the last real token
    rewards = rewards + last * score[:, None]
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) -> (advantages, returns), (B, T).

    Past a reply's end, rewards and values are zeroed, so the last real token bootstraps from 0:
    the episode ends there."""
    rewards, values = rewards * mask, values * mask
    T = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):  # delta_t = r_t + gamma V_{t+1} - V_t ; A_t = delta_t + gamma lambda A_{t+1}
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        adv[:, t] = running
    adv = adv * mask
    return adv, (adv + values) * mask


@dataclass
class PPOStats:
    policy_loss: float
    value_loss: float
    clip_frac: float
    value_clip_frac: float
    approx_kl: float  # E[(ratio - 1) - log ratio] between the rollout policy and now (Schulman's k3)
    entropy: float


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate -> (loss, clip fraction, approx KL). Outside [1 - clip, 1 + clip],
    in the direction the advantage pushes, the ratio is clipped and the gradient is exactly 0."""
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_frac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean((ratio - 1) - log_ratio, mask)
    return loss, clip_frac.detach(), approx_kl.detach()


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss 0.5 * max((V - R)^2, (V_clipped - R)^2) -> (loss, clip fraction)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    a, b = (values - returns) ** 2, (clipped - returns) ** 2
    return 0.5 * masked_mean(torch.maximum(a, b), mask), masked_mean((b > a).float(), mask).detach()
