"""Mixture-of-experts feed-forward (GShard, Switch, GLaM, Mixtral): E experts of the dense block's
shape, a softmax router in fp32 choosing the top k per token, gates renormalised over the chosen k.

Capacity (GShard): each expert takes at most C = ceil(capacity_factor * k * N / E) of the N tokens'
k * N assignments, first choices before second choices, earlier tokens first. An assignment over
capacity is dropped: its gate's share is lost (not given to the other expert) and a token that loses
all of them leaves the block as zeros, so it passes on the residual unchanged. With no capacity
factor every assignment is kept (Mixtral); eval mode has its own factor, by default none, so that
cached decoding equals recomputation.

Each forward leaves `stats` (RoutingStats) on the module: the load-balancing loss E * sum_i f_i * P_i
(f_i = fraction of tokens that chose expert i among their top k, so sum_i f_i = k; P_i = mean router
probability of expert i: Switch's eq. 4, Mixtral's `load_balancing_loss_func`), the router z-loss
mean(logsumexp(logits)^2) (ST-MoE), tokens per expert and the dropped fraction. `routing_losses(model)`
gathers them for the training objective."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .feedforward import ACTIVATIONS


class ExpertLinear(nn.Module):
    """E independent Linear layers as one (E, out, in) weight: all experts in one batched matmul."""

    def __init__(self, n_expert: int, in_dim: int, out_dim: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_expert, out_dim, in_dim))
        self.bias = nn.Parameter(torch.zeros(n_expert, out_dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (E, C, in) -> (E, C, out)
        y = torch.bmm(x, self.weight.transpose(1, 2))
        return y if self.bias is None else y + self.bias[:, None]


class Experts(nn.Module):
    """E feed-forward blocks side by side: `fc` rows are [gate; up] for a GLU (as in blocks.GLU), `proj` back."""

    def __init__(self, n_expert: int, dim: int, hidden: int, activation: str, glu: bool, bias: bool, dropout: float):
        super().__init__()
        self.glu, self.hidden = glu, hidden
        self.fc = ExpertLinear(n_expert, dim, (2 if glu else 1) * hidden, bias)
        self.proj = ExpertLinear(n_expert, hidden, dim, bias)
        self.act = ACTIVATIONS[activation]
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (E, C, dim) -> (E, C, dim)
        h = self.fc(x)
        if self.glu:
            gate, up = h.split(self.hidden, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.proj(self.dropout(h))


@dataclass
class RoutingStats:
    aux_loss: torch.Tensor  # () load balancing, E * sum_i f_i * P_i (k at perfect balance)
    z_loss: torch.Tensor  # () mean squared log-partition of the router logits
    tokens_per_expert: torch.Tensor  # (E,) assignments each expert was given, before capacity
    dropped: torch.Tensor  # () fraction of the k * N assignments over capacity
    tokens: int  # N


class MoE(nn.Module):
    @classmethod
    def from_config(cls, c) -> "MoE":
        return cls(c.n_embd, c.intermediate_size, c.n_expert, c.n_expert_per_token, c.activation,
                   glu=c.moe_mlp_class == "GLU", bias=c.mlp_bias, dropout=c.dropout,
                   capacity_factor=c.moe_capacity_factor, eval_capacity_factor=c.moe_eval_capacity_factor,
                   aux_loss_coef=c.moe_aux_loss_coef, z_loss_coef=c.moe_z_loss_coef)

    def __init__(self, dim: int, hidden: int, n_expert: int, top_k: int, activation: str, *, glu: bool = True,
                 bias: bool = False, dropout: float = 0.0, capacity_factor: Optional[float] = None,
                 eval_capacity_factor: Optional[float] = None, aux_loss_coef: float = 0.01, z_loss_coef: float = 0.001):
        super().__init__()
        self.n_expert, self.top_k = n_expert, top_k
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.router = nn.Linear(dim, n_expert, bias=False)
        self.experts = Experts(n_expert, dim, hidden, activation, glu, bias, dropout)
        self.stats: Optional[RoutingStats] = None

    def capacity(self, n_tokens: int, counts: torch.Tensor) -> int:
        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        if cf is None:  # keep every assignment
            return max(int(counts.max()), 1)
        return max(math.ceil(cf * self.top_k * n_tokens / self.n_expert), 1)

    def route(self, x: torch.Tensor):
        """x (N, C) -> router logits (N, E) fp32, chosen experts (N, k), renormalised gates (N, k) fp32."""
        with torch.autocast(x.device.type, enabled=False):  # the router decides in fp32 (Switch)
            logits = F.linear(x.float(), self.router.weight.float())
        probs = logits.softmax(-1)
        gates, experts = probs.topk(self.top_k, dim=-1)
        return logits, probs, experts, gates / gates.sum(-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, C)
        N, E, k = x.shape[0], self.n_expert, self.top_k
        logits, probs, experts, gates = self.route(x)
        # assignments in priority order: every token's first choice, then every second choice
        flat_e = experts.t().reshape(-1)  # (k*N,)
        flat_tok = torch.arange(N, device=x.device).repeat(k)
        flat_gate = gates.t().reshape(-1)
        onehot = F.one_hot(flat_e, E)  # (k*N, E)
        slot = (onehot.cumsum(0) * onehot).sum(-1) - 1  # place in its expert's queue
        counts = onehot.sum(0)  # (E,)
        C = self.capacity(N, counts)
        keep = slot < C
        e, s, tok = flat_e[keep], slot[keep], flat_tok[keep]
        buf = x.new_zeros(E, C, shape[-1])
        buf[e, s] = x[tok]  # dispatch: (E, C, dim)
        y = self.experts(buf)[e, s] * flat_gate[keep, None].to(x.dtype)  # (kept, dim)
        out = torch.zeros_like(x).index_add_(0, tok, y)  # combine; dropped tokens stay 0
        P = probs.mean(0)
        f = counts.to(P.dtype) / N
        self.stats = RoutingStats(aux_loss=E * (f * P).sum(), z_loss=torch.logsumexp(logits, -1).pow(2).mean(),
                                  tokens_per_expert=counts, dropped=1 - keep.float().mean(), tokens=N)
        return out.view(shape)


@dataclass
class RoutingLosses:
    loss: torch.Tensor  # () coefficient-weighted aux + z losses, mean over MoE layers
    metrics: dict  # floats for the Trainer's log


def moe_layers(model) -> list:
    return [m for m in model.modules() if isinstance(m, MoE) and m.stats is not None]


def routing_losses(model) -> Optional[RoutingLosses]:
    """What the MoE layers of `model` left from its last forward: the loss to add (the aux and z
    losses, weighted by their coefficients, averaged over layers) and routing statistics to log:
    moe_aux, moe_z, moe_dropped, the largest / smallest expert share of assignments (1/E is
    balanced) and, with at most 16 experts, each expert's share (moe_load_e0 ...). None without MoE."""
    layers = moe_layers(model)
    if not layers:
        return None
    n = len(layers)
    aux = sum(m.stats.aux_loss for m in layers) / n
    z = sum(m.stats.z_loss for m in layers) / n
    loss = sum(m.aux_loss_coef * m.stats.aux_loss + m.z_loss_coef * m.stats.z_loss for m in layers) / n
    share = sum(m.stats.tokens_per_expert.float() / m.stats.tokens_per_expert.sum() for m in layers) / n  # (E,)
    dropped = sum(m.stats.dropped for m in layers) / n
    values = torch.stack([aux.detach(), z.detach(), dropped, share.max(), share.min()]).tolist()  # one sync
    metrics = dict(zip(["moe_aux", "moe_z", "moe_dropped", "moe_load_max", "moe_load_min"], values))
    if share.numel() <= 16:
        metrics.update({f"moe_load_e{i}": v for i, v in enumerate(share.tolist())})
    return RoutingLosses(loss=loss, metrics=metrics)
