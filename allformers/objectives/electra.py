"""ELECTRA's replaced token detection (Clark et al. 2020, section 2).

A small generator G (an MLM) fills the masked positions by *sampling* from its softmax; a
discriminator D labels every token of the corrupted sequence as original (0) or replaced (1):

    m      = MLM selection of x (the BERT rule, or all [MASK]: any MLMMasker)
    x_hat  ~ p_G(x_t | x_masked) at t in m                  (no gradient through the sampling)
    x_corr = x with x_hat at the positions in m
    label  = 1 where x_corr != x  (a sample equal to the original counts as original)
    L      = L_MLM(G) + lambda * L_Disc(D),   lambda = 50

L_Disc is the binary cross-entropy over every non-padding token (the official code weights by
input_mask). G and D share their token, position and type embeddings (and, as the official
implementation's shared "embeddings" scope does, the embedding LayerNorm): `tie_embeddings`.

`ElectraPretraining` holds both networks so one optimizer and one Trainer see them; its forward
does the whole corruption step (so DDP sees a single forward). The batch is an ordinary masked
MLM batch (MaskedLMData / MLMMasker.apply): the original ids are labels where labels != -100
and input_ids elsewhere.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .causal_lm import IGNORE_INDEX
from .mlm import ObjectiveError, check_generator, masked_cross_entropy, model_inputs

DISC_WEIGHT = 50.0  # lambda in the paper


def _body(model: nn.Module) -> nn.Module:
    """The TransformerLM inside a TaskModel (or the model itself)."""
    return getattr(model, "body", model)


def tie_embeddings(generator: nn.Module, discriminator: nn.Module, include_norm: bool = True) -> list[str]:
    """Make the generator use the discriminator's embedding modules (the same Parameter objects):
    token (wte), position (wpe) and type (wtt) embeddings, and the embedding LayerNorm when
    include_norm. The generator's tied MLM decoder follows wte. Returns the names tied.
    The embedding width (embedding_size) must match; the hidden sizes may differ (each model
    keeps its own embed_proj), which is how ELECTRA's smaller generators are built."""
    g, d = _body(generator), _body(discriminator)
    names = ["wte", "wpe", "wtt"] + (["embed_norm"] if include_norm else [])
    tied = []
    for name in names:
        gm, dm = getattr(g, name, None), getattr(d, name, None)
        if gm is None and dm is None:
            continue
        if (gm is None) != (dm is None):
            raise ObjectiveError(f"only one of generator and discriminator has {name}; give both the same "
                                 f"embedding switches (type_vocab_size, position, embedding_norm)")
        gs = {k: tuple(v.shape) for k, v in gm.state_dict().items()}
        ds = {k: tuple(v.shape) for k, v in dm.state_dict().items()}
        if gs != ds:
            raise ObjectiveError(f"cannot share {name}: generator {gs} vs discriminator {ds}; use the same "
                                 f"vocab_size, block_size, type_vocab_size and embedding_size in both configs")
        setattr(g, name, dm)
        tied.append(name)
    return tied


@torch.no_grad()
def corrupt(original_ids: torch.Tensor, selected: torch.Tensor, gen_logits: torch.Tensor,
            generator: Optional[torch.Generator] = None, temperature: float = 1.0
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace the selected positions with samples from the generator's softmax.

    original_ids (B, T), selected (B, T) bool, gen_logits (B, T, V) ->
    (corrupted ids (B, T), replaced (B, T) float: 1.0 exactly where corrupted != original).
    Sampling is torch.multinomial over softmax(logits / temperature) and carries no gradient."""
    if selected.shape != original_ids.shape or gen_logits.shape[:-1] != original_ids.shape:
        raise ObjectiveError(f"shapes do not line up: ids {tuple(original_ids.shape)}, selected "
                             f"{tuple(selected.shape)}, logits {tuple(gen_logits.shape)}")
    corrupted = original_ids.clone()
    if bool(selected.any()):
        check_generator(generator, gen_logits.device)
        probs = torch.softmax(gen_logits[selected].detach().float() / temperature, dim=-1)  # (N, V)
        corrupted[selected] = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (N,)
    return corrupted, (corrupted != original_ids).float()


def original_ids(input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Undo the masking: the label where one is set, the input id elsewhere. (B, T)."""
    return torch.where(labels != IGNORE_INDEX, labels, input_ids)


class ElectraPretraining(nn.Module):
    """generator: an MLM TransformerLM (logits (B, T, V)); discriminator: a replaced-token detector
    (TaskModel(task="replaced-token-detection"), logits (B, T), as HF's ElectraForPreTraining) or a token
    classifier with num_labels=1 (logits (B, T, 1)). tie=True shares the embeddings (tie_embeddings)."""

    def __init__(self, generator: nn.Module, discriminator: nn.Module, tie: bool = True, temperature: float = 1.0):
        super().__init__()
        self.generator, self.discriminator, self.temperature = generator, discriminator, temperature
        c = getattr(discriminator, "config", None)
        task = getattr(c, "task", "replaced-token-detection")
        if task != "replaced-token-detection" and (task != "token-classification" or getattr(c, "num_labels", 1) != 1):
            raise ObjectiveError("the discriminator must give one logit per token: Config(task='replaced-token-detection') "
                                 "or Config(task='token-classification', num_labels=1)")
        self.tied = tie_embeddings(generator, discriminator) if tie else []

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask=None, token_type_ids=None,
                position_ids=None, sample_generator: Optional[torch.Generator] = None) -> dict:
        """input_ids (B, T) masked, labels (B, T) (-100 where not selected) -> dict of
        gen_logits (B, T, V), disc_logits (B, T), corrupted (B, T), replaced (B, T) float."""
        kw = {k: v for k, v in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids),
                                ("position_ids", position_ids)) if v is not None}
        gen_logits = self.generator(input_ids, **kw)  # (B, T, V)
        corrupted, replaced = corrupt(original_ids(input_ids, labels), labels != IGNORE_INDEX, gen_logits,
                                      sample_generator, self.temperature)
        disc_logits = self.discriminator(corrupted, **kw)  # (B, T), or (B, T, 1) from a one-label token classifier
        if disc_logits.dim() == 3 and disc_logits.shape[-1] == 1:
            disc_logits = disc_logits.squeeze(-1)
        if disc_logits.shape != corrupted.shape:
            raise ObjectiveError(f"discriminator logits should be (B, T) = {tuple(corrupted.shape)} (or (B, T, 1)), "
                                 f"got {tuple(disc_logits.shape)}")
        return {"gen_logits": gen_logits, "disc_logits": disc_logits, "corrupted": corrupted,
                "replaced": replaced}


def discriminator_loss(disc_logits: torch.Tensor, replaced: torch.Tensor,
                       attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean binary cross-entropy over non-padding tokens. disc_logits, replaced, attention_mask: (B, T)."""
    per_token = F.binary_cross_entropy_with_logits(disc_logits.float(), replaced.float(), reduction="none")
    if attention_mask is None:
        return per_token.mean()
    w = attention_mask.to(per_token.dtype)
    return (per_token * w).sum() / w.sum().clamp(min=1.0)


def electra_loss(model, batch: dict, disc_weight: float = DISC_WEIGHT,
                 sample_generator: Optional[torch.Generator] = None, return_parts: bool = False):
    """gen MLM loss + disc_weight * disc loss for an ElectraPretraining on a masked MLM batch.
    sample_generator=None samples from torch's global RNG (which Trainer checkpoints restore)."""
    for key in ("input_ids", "labels"):
        if key not in batch:
            raise ObjectiveError(f"an ELECTRA batch is a masked MLM batch; it has no {key!r} (keys: {sorted(batch)})")
    out = model(batch["input_ids"], batch["labels"], sample_generator=sample_generator, **model_inputs(batch))
    gen = masked_cross_entropy(out["gen_logits"], batch["labels"])
    disc = discriminator_loss(out["disc_logits"], out["replaced"], batch.get("attention_mask"))
    loss = gen + disc_weight * disc
    if return_parts:
        return loss, {"gen_loss": gen.detach(), "disc_loss": disc.detach(), **out}
    return loss


class Electra:
    """The objective object; the last step's parts are kept in `last` for logging."""

    name = "electra"

    def __init__(self, disc_weight: float = DISC_WEIGHT, sample_generator: Optional[torch.Generator] = None):
        self.disc_weight, self.sample_generator = disc_weight, sample_generator
        self.last: dict = {}

    def __call__(self, model, batch) -> torch.Tensor:
        loss, parts = electra_loss(model, batch, self.disc_weight, self.sample_generator, return_parts=True)
        self.last = {"gen_loss": parts["gen_loss"], "disc_loss": parts["disc_loss"],
                     "replaced_fraction": parts["replaced"].mean()}  # 0-dim tensors: no device sync here
        return loss

    @staticmethod
    def num_tokens(batch) -> int:
        m = batch.get("attention_mask")
        return int(m.sum()) if m is not None else batch["input_ids"].numel()
