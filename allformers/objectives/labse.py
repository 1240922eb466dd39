"""LaBSE's translation ranking loss: a bidirectional dual encoder with additive margin softmax
and in-batch negatives (Feng et al. 2022, section 3.1, after Yang et al. 2019).

For a batch of N translation pairs (x_i, y_i) with embedding similarity phi = cosine:

    L  = -1/N sum_i log( e^{s(phi(x_i, y_i) - m)} / ( e^{s(phi(x_i, y_i) - m)} + sum_{n != i} e^{s phi(x_i, y_n)} ) )
    L' = the same with the roles of x and y exchanged (rank the sources for each target)
    loss = L + L'                                     (the paper's bidirectional loss, summed)

m is the additive margin (0.3 in LaBSE), subtracted from the true pair's score only; s is a
scale on the scores. The paper's equation has no scale (s = 1, the default here); AM-softmax
implementations usually scale cosines up (tens) so that the softmax can become peaked.
Every other target in the batch serves as a negative (in-batch negatives); LaBSE also gathers
negatives across accelerators, which is not done here.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .mlm import ObjectiveError, model_inputs

MARGIN = 0.3


def additive_margin_loss(x: torch.Tensor, y: torch.Tensor, margin: float = MARGIN, scale: float = 1.0,
                         bidirectional: bool = True) -> torch.Tensor:
    """x, y (N, D): embeddings of the sources and of their translations (row i with row i).
    Returns L + L' (or L alone with bidirectional=False)."""
    if x.dim() != 2 or x.shape != y.shape:
        raise ObjectiveError(f"x and y must both be (N, D) with the same shape, "
                             f"got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] < 2:
        raise ObjectiveError("in-batch negatives need at least two pairs per batch")
    sim = F.normalize(x.float(), dim=-1) @ F.normalize(y.float(), dim=-1).T  # (N, N): cos(x_i, y_j)
    n = sim.shape[0]
    scores = scale * (sim - margin * torch.eye(n, device=sim.device, dtype=sim.dtype))  # margin on the diagonal
    target = torch.arange(n, device=sim.device)
    loss = F.cross_entropy(scores, target)  # L: for each x_i, rank y_1..y_N
    if bidirectional:
        loss = loss + F.cross_entropy(scores.T, target)  # L': for each y_j, rank x_1..x_N
    return loss


def _encode(model, side: dict) -> torch.Tensor:
    out = model(side["input_ids"], **model_inputs(side))
    if out.dim() != 2:
        raise ObjectiveError(f"the dual encoder must return (batch, dim) sentence embeddings "
                             f"(TaskModel with task='embedding'), got shape {tuple(out.shape)}")
    return out


def _pad_to(side: dict, T: int, pad_id: int) -> dict:
    if side.get("attention_mask") is None:
        side = {**side, "attention_mask": torch.ones_like(side["input_ids"])}
    t = side["input_ids"].shape[1]
    out = {}
    for k, v in side.items():
        if isinstance(v, torch.Tensor) and v.dim() == 2 and t < T:
            fill = pad_id if k == "input_ids" else 0
            v = F.pad(v, (0, T - t), value=fill)
        out[k] = v
    return out


def translation_ranking_loss(model, batch: dict, margin: float = MARGIN, scale: float = 1.0,
                             pad_id: int = 0) -> torch.Tensor:
    """batch = {"source": {input_ids, attention_mask, ...}, "target": {...}}, N rows each, row i a
    translation of row i. Both sides go through the one shared encoder in a single forward
    (padded to one length and stacked), then additive_margin_loss."""
    if "source" not in batch or "target" not in batch:
        raise ObjectiveError(f"a translation-ranking batch is {{'source': ..., 'target': ...}} (keys: {sorted(batch)})")
    src, tgt = batch["source"], batch["target"]
    n = src["input_ids"].shape[0]
    if tgt["input_ids"].shape[0] != n:
        raise ObjectiveError(f"{n} sources but {tgt['input_ids'].shape[0]} targets")
    T = max(src["input_ids"].shape[1], tgt["input_ids"].shape[1])
    src, tgt = _pad_to(src, T, pad_id), _pad_to(tgt, T, pad_id)
    keys = [k for k in src if k in tgt and isinstance(src[k], torch.Tensor)]
    both = {k: torch.cat([src[k], tgt[k]]) for k in keys}  # (2N, T)
    emb = _encode(model, both)  # (2N, D)
    return additive_margin_loss(emb[:n], emb[n:], margin, scale)


class TranslationRanking:
    """The LaBSE objective object for the Trainer."""

    name = "translation_ranking"

    def __init__(self, margin: float = MARGIN, scale: float = 1.0, pad_id: int = 0):
        self.margin, self.scale, self.pad_id = margin, scale, pad_id

    def __call__(self, model, batch) -> torch.Tensor:
        return translation_ranking_loss(model, batch, self.margin, self.scale, self.pad_id)

    @staticmethod
    def num_tokens(batch) -> int:
        total = 0
        for side in (batch["source"], batch["target"]):
            m: Optional[torch.Tensor] = side.get("attention_mask")
            total += int(m.sum()) if m is not None else side["input_ids"].numel()
        return total
