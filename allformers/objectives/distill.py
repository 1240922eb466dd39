"""DistilBERT's triple loss (Sanh et al. 2019, section 2) and its student initialisation.

    L = alpha_ce  * T^2 * KL( softmax(t / T) || softmax(s / T) )   (the distillation loss L_ce)
      + alpha_mlm * MLM cross-entropy of the student                 (L_mlm)
      + alpha_cos * mean(1 - cos(h_s, h_t))                         (L_cos, last hidden states)

as in the DistilBERT repo's distiller.py: KLDivLoss(reduction="batchmean") over the selected
positions (the masked ones with restrict_ce_to_mask, else every real token), the T^2 factor of
Hinton et al. keeps gradient magnitudes independent of T, and CosineEmbeddingLoss with target 1
over the non-padding tokens. The repo's training command uses alpha_ce=5.0, alpha_mlm=2.0,
alpha_cos=1.0 and T=2.0: the defaults here. KL differs from the soft cross-entropy
-sum p_t log p_s only by the teacher's entropy (no gradient), so `kind="soft_ce"` trains the same.

Initialisation (section 3, "taking one layer out of two"): `init_student_from_teacher` copies the
embeddings, the MLM head and every other teacher layer (0, 2, 4, ...). The repo's
scripts/extract_distilbert.py actually picks layers (0, 2, 4, 7, 9, 11) of BERT-base: pass
layers=DISTILBERT_EXTRACT_LAYERS for that exact choice.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .causal_lm import IGNORE_INDEX
from .ddp import unwrap
from .mlm import ObjectiveError, masked_cross_entropy, model_inputs

DISTILBERT_EXTRACT_LAYERS = (0, 2, 4, 7, 9, 11)


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0,
                     kind: str = "kl") -> torch.Tensor:
    """(N, V) student and teacher logits of the same N positions ->
    T^2 * sum_n KL(p_t || p_s) / N with p = softmax(logits / T) ("batchmean", as the repo).
    kind="soft_ce": T^2 * sum_n -sum_v p_t log p_s / N instead (same gradient)."""
    if student_logits.shape != teacher_logits.shape:
        raise ObjectiveError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                             f"{tuple(teacher_logits.shape)} differ; both models need the same vocabulary")
    if temperature <= 0:
        raise ObjectiveError(f"temperature={temperature} must be positive")
    n = student_logits.shape[0]
    if n == 0:
        return student_logits.sum() * 0.0
    log_ps = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (N, V)
    pt = F.softmax(teacher_logits.float() / temperature, dim=-1)  # (N, V)
    if kind == "kl":
        per = F.kl_div(log_ps, pt, reduction="sum")  # sum p_t (log p_t - log p_s)
    elif kind == "soft_ce":
        per = -(pt * log_ps).sum()
    else:
        raise ObjectiveError(f"kind={kind!r} must be 'kl' or 'soft_ce'")
    return per / n * temperature ** 2


def cosine_hidden_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                       mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, T, C) hidden states -> mean over non-padding tokens of 1 - cos(h_s, h_t)
    (CosineEmbeddingLoss with target 1). mask (B, T): 1 for real tokens."""
    if student_hidden.shape != teacher_hidden.shape:
        raise ObjectiveError(f"student hidden {tuple(student_hidden.shape)} vs teacher {tuple(teacher_hidden.shape)}: "
                             f"the cosine loss needs the same n_embd (DistilBERT keeps the teacher's width)")
    s, t = student_hidden.float(), teacher_hidden.float()
    if mask is not None:
        keep = mask.bool()
        s, t = s[keep], t[keep]  # (N, C)
    else:
        s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
    if s.shape[0] == 0:
        return student_hidden.sum() * 0.0
    return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()


def _hidden_and_logits(model: nn.Module, ids: torch.Tensor, kwargs: dict):
    raw = unwrap(model)
    if not hasattr(raw, "head"):
        raise ObjectiveError("distillation needs MLM models (TransformerLM with an LM head) as teacher and student")
    h = model(ids, return_hidden=True, **kwargs)  # (B, T, C)
    return h, raw.head(h)  # (B, T, V)


def distillation_loss(student: nn.Module, teacher: nn.Module, batch: dict, *, temperature: float = 2.0,
                      alpha_ce: float = 5.0, alpha_mlm: float = 2.0, alpha_cos: float = 1.0,
                      restrict_ce_to_mask: bool = True, kind: str = "kl", return_parts: bool = False):
    """The DistilBERT loss on a masked MLM batch (input_ids, labels, attention_mask, ...).
    The teacher runs without gradient; the student gets all three terms."""
    if "input_ids" not in batch or "labels" not in batch:
        raise ObjectiveError(f"distillation needs a masked MLM batch with input_ids and labels (keys: {sorted(batch)})")
    ids, labels, kw = batch["input_ids"], batch["labels"], model_inputs(batch)
    mask = batch.get("attention_mask")
    s_h, s_logits = _hidden_and_logits(student, ids, kw)
    with torch.no_grad():
        t_h, t_logits = _hidden_and_logits(teacher, ids, kw)
    if restrict_ce_to_mask:
        sel = labels != IGNORE_INDEX  # (B, T)
    else:
        sel = mask.bool() if mask is not None else torch.ones_like(labels, dtype=torch.bool)
    parts = {"ce": soft_target_loss(s_logits[sel], t_logits[sel], temperature, kind)}
    loss = alpha_ce * parts["ce"]
    if alpha_mlm > 0:
        parts["mlm"] = masked_cross_entropy(s_logits, labels)
        loss = loss + alpha_mlm * parts["mlm"]
    if alpha_cos > 0:
        parts["cos"] = cosine_hidden_loss(s_h, t_h, mask)
        loss = loss + alpha_cos * parts["cos"]
    if return_parts:
        return loss, {k: v.detach() for k, v in parts.items()}
    return loss


class Distillation:
    """Objective object: `Trainer(student, Distillation(teacher), masked_data)`. The teacher is
    frozen, kept in eval mode and moved to the batch's device on first use."""

    name = "distillation"

    def __init__(self, teacher: nn.Module, temperature: float = 2.0, alpha_ce: float = 5.0, alpha_mlm: float = 2.0,
                 alpha_cos: float = 1.0, restrict_ce_to_mask: bool = True, kind: str = "kl"):
        self.teacher = teacher.eval().requires_grad_(False)
        self.kwargs = dict(temperature=temperature, alpha_ce=alpha_ce, alpha_mlm=alpha_mlm, alpha_cos=alpha_cos,
                           restrict_ce_to_mask=restrict_ce_to_mask, kind=kind)
        self.last: dict = {}

    def __call__(self, student, batch) -> torch.Tensor:
        device = batch["input_ids"].device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        self.teacher.eval()
        loss, self.last = distillation_loss(student, self.teacher, batch, return_parts=True, **self.kwargs)
        return loss

    @staticmethod
    def num_tokens(batch) -> int:
        m = batch.get("attention_mask")
        return int(m.sum()) if m is not None else batch["input_ids"].numel()


# ---------------------------------------------------------------------- student initialisation
def _copy(dst: Optional[nn.Module], src: Optional[nn.Module], what: str):
    try:
        dst.load_state_dict(src.state_dict())
    except RuntimeError as e:
        raise ObjectiveError(f"cannot copy the teacher's {what} into the student: {e}. The student needs the "
                             f"teacher's widths (n_embd, n_head, intermediate_size, vocab_size, block_size)") from None


@torch.no_grad()
def init_student_from_teacher(teacher: nn.Module, student: nn.Module,
                              layers: Optional[Sequence[int]] = None) -> list[int]:
    """Copy the teacher's embeddings, final norm, MLM head and layers `layers` (default 0, 2, 4, ...:
    one out of two) into the student's layers 0, 1, 2, ... Returns the teacher layers used.

    Both are TransformerLMs (or TaskModels, whose bodies are used). Type embeddings are copied only
    when the student has them (DistilBERT drops them)."""
    t, s = getattr(teacher, "body", teacher), getattr(student, "body", student)
    n_t, n_s = len(t.blocks), len(s.blocks)
    if getattr(s.config, "share_layers", "none") != "none" or getattr(t.config, "share_layers", "none") != "none":
        raise ObjectiveError("layer copying needs unshared layers (share_layers='none') in teacher and student")
    layers = list(range(0, n_t, 2))[:n_s] if layers is None else [int(i) for i in layers]
    if len(layers) != n_s:
        raise ObjectiveError(f"the student has {n_s} layers but {len(layers)} teacher layers were chosen ({layers}); "
                             f"give one teacher layer per student layer")
    bad = [i for i in layers if not 0 <= i < n_t]
    if bad:
        raise ObjectiveError(f"teacher layers {bad} do not exist (the teacher has {n_t})")
    for name in ("wte", "wpe", "wtt", "embed_norm", "embed_proj", "norm", "head_transform", "lm_head"):
        src, dst = getattr(t, name, None), getattr(s, name, None)
        if src is not None and dst is not None:
            _copy(dst, src, name)
    if getattr(t, "lm_head_bias", None) is not None and getattr(s, "lm_head_bias", None) is not None:
        s.lm_head_bias.copy_(t.lm_head_bias)
    for i, j in enumerate(layers):
        _copy(s.blocks[i], t.blocks[j], f"layer {j}")
    return layers
