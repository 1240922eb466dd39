"""ERNIE's denoising entity auto-encoder (dEA) noising (Zhang et al. 2019, section 3.4).

Tokens aligned to knowledge-graph entities are noised before the entities go into the model:
"in 5% of the time, for a given token-entity alignment, we replace the entity with another
random entity"; "in 15% of the time, we mask token-entity alignments"; "in the rest of the time
(80%), we keep token-entity alignments unchanged". The model then predicts, for every aligned
token, its original entity among the candidate entities (the official code's candidates are
the distinct entities of the batch), so it learns to correct wrong and missing alignments.

Only the noising and the targets live here (plus the candidate cross-entropy); the knowledgeable
encoder that fuses entity embeddings is a model, not an objective.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .causal_lm import IGNORE_INDEX
from .mlm import ObjectiveError, _rand, _randint

NO_ENTITY = -1  # the official code marks tokens without an alignment with -1


def dea_noise(entity_ids: torch.Tensor, *, candidates: Optional[torch.Tensor] = None, replace_prob: float = 0.05,
              mask_prob: float = 0.15, no_entity: int = NO_ENTITY,
              generator: Optional[torch.Generator] = None) -> dict:
    """entity_ids (B, T): the entity aligned to each token, `no_entity` where none.
    candidates (K,): the entities to predict among and to draw wrong ones from; default the
    distinct aligned entities of the batch, as the official code does.

    Returns a dict:
      entity_ids (B, T): noised alignments (a wrong entity, no_entity where masked, else unchanged)
      targets    (B, T): index into candidates of the ORIGINAL entity at every aligned token, -100 elsewhere
      candidates (K,), replaced (B, T) bool, masked (B, T) bool, kept (B, T) bool
      entity_mask (B, T) long: 1 where the noised input still has an entity (the fusion layer's mask).
    A replacement is uniform over the candidates other than the original (never the right one)."""
    if entity_ids.dim() != 2:
        raise ObjectiveError(f"entity_ids must be (batch, time), got shape {tuple(entity_ids.shape)}")
    if replace_prob < 0 or mask_prob < 0 or replace_prob + mask_prob > 1:
        raise ObjectiveError(f"replace_prob={replace_prob} and mask_prob={mask_prob} must be >= 0 and sum to <= 1")
    entity_ids = entity_ids.long()
    device = entity_ids.device
    aligned = entity_ids != no_entity  # (B, T)
    if candidates is None:
        candidates = torch.unique(entity_ids[aligned])  # (K,) sorted
    candidates = candidates.to(device=device, dtype=torch.long)
    K = candidates.numel()
    if bool((candidates == no_entity).any()):
        raise ObjectiveError(f"candidates contain the no-entity marker {no_entity}")
    if bool(aligned.any()):
        if K == 0:
            raise ObjectiveError("candidates is empty but some tokens are aligned to entities")
        sorted_c, order = candidates.sort()
        pos = torch.searchsorted(sorted_c, entity_ids).clamp(max=K - 1)  # (B, T)
        found = sorted_c[pos] == entity_ids
        if bool((aligned & ~found).any()):
            missing = entity_ids[aligned & ~found].unique()[:5].tolist()
            raise ObjectiveError(f"aligned entities {missing} are not among the candidates")
        orig_idx = order[pos]  # (B, T) index into candidates (garbage where not aligned)
    else:
        orig_idx = torch.zeros_like(entity_ids)
    u = _rand(entity_ids.shape, generator, device)  # (B, T)
    replaced = aligned & (u < replace_prob)
    masked = aligned & (u >= replace_prob) & (u < replace_prob + mask_prob)
    if bool(replaced.any()) and K < 2:
        raise ObjectiveError("a wrong entity needs at least two candidates; pass candidates= (e.g. every entity id)")
    r = _randint(max(K - 1, 1), entity_ids.shape, generator, device)  # (B, T) in [0, K-2]
    wrong = candidates[(r + (r >= orig_idx).long()).clamp(max=K - 1)] if K else entity_ids  # skips the original
    noised = torch.where(replaced, wrong, entity_ids).masked_fill(masked, no_entity)
    return {"entity_ids": noised, "targets": orig_idx.masked_fill(~aligned, IGNORE_INDEX), "candidates": candidates,
            "replaced": replaced, "masked": masked, "kept": aligned & ~replaced & ~masked,
            "entity_mask": (noised != no_entity).long()}


def dea_loss(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """scores (B, T, K): each token's logits over the K candidates; targets (B, T) from dea_noise ->
    mean cross-entropy over aligned tokens."""
    sel = targets != IGNORE_INDEX
    if not bool(sel.any()):
        return scores.sum() * 0.0
    return F.cross_entropy(scores[sel].float(), targets[sel])
