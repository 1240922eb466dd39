"""XLNet's permutation language modelling (Yang et al. 2019, section 2.3).

Sample a factorisation order z of the T positions; predict the tokens at the last 1/K of the order,
each from the tokens before it in z. Nothing in the input is replaced (no [MASK]): the order lives in
`perm_mask` and the predicted positions in `target_mapping`, which the model's query stream reads
(models/xlnet.py). As in XLNet's code, the tokens that are not predicted all come before every target
(they see each other, never a target), and a target sees the non-targets and the targets earlier in z;
the content stream also sees its own token, the query stream never does."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .causal_lm import IGNORE_INDEX
from .mlm import ObjectiveError


def permutation_masks(orders: torch.Tensor, num_predict: int):
    """orders (B, T): row b lists the positions in factorisation order; its last num_predict are targets.

    -> perm_mask (B, T, T) float, 1 where token i may NOT see token j;
       target_mapping (B, P, T) float, row p one-hot on the p-th target (targets in position order);
       targets (B, P) long, the target positions."""
    B, T = orders.shape
    if not 0 < num_predict < T:
        raise ObjectiveError(f"num_predict={num_predict} must be in [1, {T - 1}] for {T} tokens: the first token of "
                             f"the order is never predicted (it has nothing to be predicted from)")
    rank = torch.empty_like(orders).scatter_(1, orders, torch.arange(T, device=orders.device).expand(B, T))
    target = rank >= T - num_predict  # (B, T)
    rank_i = torch.where(target, rank, torch.full_like(rank, -1))  # non-targets come before every target
    perm_mask = target[:, None, :] & (rank_i[:, :, None] <= rank[:, None, :])  # j a target not before i in z
    pos = torch.arange(T, device=orders.device).expand(B, T)
    targets = torch.where(target, pos, torch.full_like(pos, T)).sort(dim=1).values[:, :num_predict]
    return perm_mask.float(), F.one_hot(targets, T).float(), targets


def permutation_lm_batch(ids: torch.Tensor, num_predict: Optional[int] = None, k: int = 6,
                         generator: Optional[torch.Generator] = None) -> dict:
    """ids (B, T) -> a batch: a fresh order per row, the last num_predict (default T // k, XLNet's K=6)
    tokens of it predicted. Keys: input_ids, perm_mask, target_mapping, labels (B, P)."""
    B, T = ids.shape
    P = num_predict if num_predict is not None else max(1, T // k)
    orders = torch.stack([torch.randperm(T, generator=generator) for _ in range(B)]).to(ids.device)
    perm_mask, target_mapping, targets = permutation_masks(orders, P)
    return {"input_ids": ids, "perm_mask": perm_mask, "target_mapping": target_mapping,
            "labels": ids.gather(1, targets)}


def permutation_lm_loss(model, batch: dict) -> torch.Tensor:
    """Cross-entropy of the query stream's predictions at the targets."""
    logits = model(batch["input_ids"], perm_mask=batch["perm_mask"], target_mapping=batch["target_mapping"])  # (B, P, V)
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)


class PermutationLM:
    """The objective object for the Trainer."""

    name = "permutation_lm"

    def __call__(self, model, batch) -> torch.Tensor:
        return permutation_lm_loss(model, batch)

    @staticmethod
    def num_tokens(batch) -> int:
        return batch["input_ids"].numel()


class PermutationLMData:
    """A Trainer data source: windows from `windows` (anything with sample(n) -> ids (n, T) or (x, y), e.g.
    training.data.RandomWindows), each with a fresh factorisation order; state_dict for exact resumption."""

    def __init__(self, windows, num_predict: Optional[int] = None, k: int = 6, seed: int = 0):
        self.windows, self.num_predict, self.k = windows, num_predict, k
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, n: int) -> dict:
        x = self.windows.sample(n)
        x = x[0] if isinstance(x, (tuple, list)) else x
        return permutation_lm_batch(x, self.num_predict, self.k, self.generator)

    def state_dict(self) -> dict:
        inner = self.windows.state_dict() if hasattr(self.windows, "state_dict") else None
        return {"windows": inner, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if state["windows"] is not None:
            self.windows.load_state_dict(state["windows"])
        self.generator.set_state(state["generator"])
