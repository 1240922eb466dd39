"""ERNIE (Zhang et al. 2019, "ERNIE: Enhanced Language Representation with Informative Entities"):
a BERT whose upper layers also read knowledge-graph entity embeddings.

  T-Encoder: N ordinary text layers (a TransformerLM body; its MLM head is ERNIE's MLM head)
  K-Encoder: M aggregators (`Aggregator`, the new block type here). Each one runs
      token self-attention      w~ = LN(w + MH-ATT(w))                      (a BERT layer's first half)
      entity self-attention     e~ = LN(e + MH-ATT_e(e)) over the entities of the sequence
      information fusion        h  = act(W_t w~ + W_e e~ + b)  at tokens aligned to an entity
                                h  = act(W_t w~ + b)           elsewhere
                                w' = out(h),  e' = out_e(h)
  Entities are token-aligned, as in the released code: entity_ids (B, T) holds the entity of the
  first token of each mention and NO_ENTITY (-1) elsewhere (the format of objectives.ernie.dea_noise).
  The entity attention sees only aligned positions, so it is attention over the entity sequence.

Two choices for the fusion outputs (ErnieConfig.fusion_output):
  "residual" (default): w' = LN(w~ + W'_t h + b'_t), e' = LN_e(e~ + W'_e h + b'_e): the released code
      (thunlp/ERNIE knowledge_bert BertOutput). The token side is then exactly a BERT layer, so without
      entities an aggregator is a BERT layer and ERNIE starts from a BERT with N + M layers
      (`init_from_encoder`), as the paper's ERNIE starts from BERT-base.
  "activation": w' = act(W'_t h + b'_t), e' = act(W'_e h + b'_e): the paper's equation 4 as written.
W_e has no bias of its own (the paper's single b), so an unaligned token's h does not depend on any entity.

Heads: MLM on the tokens (the text body's head: transform + decoder tied to the word embeddings),
NSP (pooler dense + tanh + 2-way classifier), and the dEA entity head: each token's state goes through
a transform to the entity dimension and is scored against the candidate entities' embeddings
(the distinct entities of the batch, from dea_noise), trained with dea_loss.

The entity embeddings (TransE vectors in the paper, kept fixed there) are an nn.Embedding with their
own dimension; `load_entity_embeddings(tensor)` puts pretrained vectors in.

ErnieConfig nests the text encoder's Config and serialises to one JSON object ("config_class":
"ErnieConfig"); `model.save(path)` writes our checkpoint format, `allformers.load(path)` reads it
(checkpoints/composite.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..blocks import ATTENTION_CLASSES, Attention, build_feedforward, build_norm
from ..config import Config, SavedConfig
from ..errors import ConfigError
from ..objectives.ernie import NO_ENTITY, dea_loss, dea_noise
from ..objectives.mlm import ObjectiveError, masked_cross_entropy
from .heads import ClassificationHead, pool
from .init import init_weights
from .lm import TransformerLM, _Activation

FUSION_OUTPUTS = ("residual", "activation")


# ---------------------------------------------------------------------- config
@dataclass
class ErnieConfig(SavedConfig):  # saved as JSON with its text Config nested (config.SavedConfig)
    text: Config = field(default_factory=lambda: Config(  # BERT-like T-Encoder, N = 6 layers
        causal=False, norm_placement="post", embedding_norm=True, head_transform=True, lm_head_bias=True,
        type_vocab_size=2, n_layer=6, norm_eps=1e-12, vocab_size=30522, block_size=512))
    n_aggregator_layer: int = 6  # M: K-Encoder layers (the paper: N = 6 text layers, M = 6)
    n_entities: int = 1  # rows of the entity embedding table
    entity_dim: int = 100  # TransE dimension (the paper: 100)
    entity_n_head: int = 4  # heads of the entity self-attention (the paper: 4)
    fusion_output: str = "residual"  # "residual" (released code) or "activation" (the paper's eq. 4)
    nsp: bool = True  # a next-sentence-prediction head on the pooled [CLS]
    freeze_entities: bool = True  # TransE vectors stay fixed during pretraining
    name: str = ""
    description: str = ""

    def __post_init__(self):
        if isinstance(self.text, dict):
            self.text = Config.from_dict(self.text)
        self.validate()

    def validate(self):
        t = self.text
        if not isinstance(t, Config):
            raise ConfigError(f"ErnieConfig.text must be a Config (the T-Encoder), got {type(t).__name__}")
        if t.task != "lm" or t.is_encoder_decoder or t.cross_attention:
            raise ConfigError(f"ErnieConfig.text describes the T-Encoder body (task='lm', no encoder-decoder); ERNIE owns "
                              f"its heads (got task={t.task!r}, is_encoder_decoder={t.is_encoder_decoder})")
        if t.causal:
            raise ConfigError("ERNIE is a bidirectional encoder: set causal=False on ErnieConfig.text")
        if t.norm_placement != "post" or t.final_norm or t.parallel_residual:
            raise ConfigError(
                f"ERNIE's aggregators are post-norm layers on top of a post-norm text body (BERT); got "
                f"norm_placement={t.norm_placement!r}, final_norm={t.final_norm}, parallel_residual={t.parallel_residual}"
                f" — set norm_placement='post' (final_norm then defaults to False)")
        if t.position not in ("learned", "sinusoidal", "none") or t.attention_class != "Attention":
            raise ConfigError(f"ERNIE's aggregators take positions from the embeddings only: position must be "
                              f"'learned', 'sinusoidal' or 'none' and attention_class 'Attention' (got "
                              f"{t.position!r}, {t.attention_class!r})")
        if t.mlp_class != "MLP":
            raise ConfigError(f"the information-fusion layer splits a two-layer MLP around the entity input; "
                              f"ErnieConfig.text needs mlp_class='MLP' (got {t.mlp_class!r})")
        if t.share_layers != "none":
            raise ConfigError("share_layers is not supported in ERNIE's text encoder")
        if self.fusion_output not in FUSION_OUTPUTS:
            raise ConfigError(f"fusion_output={self.fusion_output!r} is not one of {list(FUSION_OUTPUTS)}")
        for fname in ("n_aggregator_layer", "n_entities", "entity_dim", "entity_n_head"):
            value = getattr(self, fname)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{fname} must be a positive integer, got {value!r}")
        if self.entity_dim % self.entity_n_head:
            raise ConfigError(f"entity_dim={self.entity_dim} is not divisible by entity_n_head={self.entity_n_head}; "
                              f"pick entity_n_head among {[d for d in range(1, self.entity_dim + 1) if self.entity_dim % d == 0]}")

    # ------------------------------------------------------------------ what generic code reads
    @property
    def n_layer(self) -> int:  # every layer a token passes through (FLOP counts)
        return self.text.n_layer + self.n_aggregator_layer

    @property
    def n_head(self) -> int:
        return self.text.n_head

    @property
    def head_dim(self) -> int:
        return self.text.head_dim

    @property
    def n_embd(self) -> int:
        return self.text.n_embd

    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    @property
    def block_size(self) -> int:
        return self.text.block_size

    def replace(self, **changes) -> "ErnieConfig":
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------- the aggregator block
class Aggregator(nn.Module):
    """One K-Encoder layer. Token side: attn, norm1, mlp (fc, proj), norm2 (the names and wiring of a
    post-norm Block, so a BERT layer's weights fit). Entity side: ent_attn, ent_norm1, ent_fc (W_e, no
    bias), ent_proj, ent_norm2. The fusion layer is mlp.fc + ent_fc -> act -> (mlp.proj, ent_proj)."""

    def __init__(self, attn: nn.Module, mlp: nn.Module, norm1: nn.Module, norm2: Optional[nn.Module],
                 ent_attn: nn.Module, ent_fc: nn.Linear, ent_proj: nn.Linear, ent_norm1: nn.Module,
                 ent_norm2: Optional[nn.Module], fusion_output: str = "residual", dropout: float = 0.0):
        super().__init__()
        self.attn, self.mlp, self.norm1, self.norm2 = attn, mlp, norm1, norm2
        self.ent_attn, self.ent_fc, self.ent_proj = ent_attn, ent_fc, ent_proj
        self.ent_norm1, self.ent_norm2 = ent_norm1, ent_norm2
        self.fusion_output = fusion_output
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()

    @classmethod
    def from_config(cls, c: ErnieConfig) -> "Aggregator":
        t = c.text
        De, He = c.entity_dim, c.entity_n_head
        residual = c.fusion_output == "residual"
        return cls(
            attn=ATTENTION_CLASSES[t.attention_class].from_config(t),
            mlp=build_feedforward(t.mlp_class, t.n_embd, t.intermediate_size, t.activation, t.mlp_bias, t.dropout),
            norm1=build_norm(t.norm_class, t.n_embd, t.norm_eps, t.norm_bias),
            norm2=build_norm(t.norm_class, t.n_embd, t.norm_eps, t.norm_bias) if residual else None,
            ent_attn=Attention(De, He, He, De // He, bias=t.attn_bias, out_bias=t.attn_out_bias, dropout=t.dropout,
                               causal=False),
            ent_fc=nn.Linear(De, t.intermediate_size, bias=False),
            ent_proj=nn.Linear(t.intermediate_size, De, bias=t.mlp_bias),
            ent_norm1=build_norm(t.norm_class, De, t.norm_eps, t.norm_bias),
            ent_norm2=build_norm(t.norm_class, De, t.norm_eps, t.norm_bias) if residual else None,
            fusion_output=c.fusion_output, dropout=t.dropout)

    def attend(self, w: torch.Tensor, e: torch.Tensor, aligned: torch.Tensor, mask=None, ent_mask=None):
        """The two self-attentions: (w~ (B, T, C), e~ (B, T, De), zero at unaligned positions)."""
        w = self.norm1(w + self.drop(self.attn(w, mask=mask)))
        e = self.ent_norm1(e + self.drop(self.ent_attn(e, mask=ent_mask))) * aligned
        return w, e

    def fuse(self, w: torch.Tensor, e: torch.Tensor, aligned: torch.Tensor):
        """The information-fusion layer on attended states -> (w', e')."""
        h = self.mlp.act(self.mlp.fc(w) + self.ent_fc(e) * aligned)  # (B, T, I); no entity term where unaligned
        h = self.mlp.dropout(h)
        if self.fusion_output == "residual":
            w = self.norm2(w + self.drop(self.mlp.proj(h)))
            e = self.ent_norm2(e + self.drop(self.ent_proj(h)))
        else:
            w, e = self.mlp.act(self.mlp.proj(h)), self.mlp.act(self.ent_proj(h))
        return w, e * aligned

    def forward(self, w: torch.Tensor, e: torch.Tensor, aligned: torch.Tensor, mask: Optional[torch.Tensor] = None,
                ent_mask: Optional[torch.Tensor] = None):
        """w (B, T, C) token states, e (B, T, De) token-aligned entity states, aligned (B, T, 1) float (1 where a
        token carries an entity); mask / ent_mask: bool attention masks over tokens / aligned positions."""
        w, e = self.attend(w, e, aligned, mask, ent_mask)
        return self.fuse(w, e, aligned)


# ---------------------------------------------------------------------- the model
class ErnieOutput(NamedTuple):
    hidden: torch.Tensor  # (B, T, C) token states after the K-Encoder
    entity_hidden: torch.Tensor  # (B, T, De) entity states (zero at unaligned positions)
    mlm_logits: Optional[torch.Tensor]  # (B, T, V), when the text config has an LM head
    pair_logits: Optional[torch.Tensor]  # (B, 2), when nsp
    entity_scores: Optional[torch.Tensor]  # (B, T, K) against the candidates, when candidates are given


class ErnieModel(nn.Module):
    def __init__(self, config: ErnieConfig):
        super().__init__()
        self.config = c = config
        t = c.text
        self.text = TransformerLM(t)  # T-Encoder; its MLM head (if lm_head) scores the final token states
        self.entities = nn.Embedding(c.n_entities, c.entity_dim)
        self.aggregators = nn.ModuleList([Aggregator.from_config(c) for _ in range(c.n_aggregator_layer)])
        self.pair_head = (ClassificationHead(t.n_embd, 2, dense=True, activation=t.classifier_activation,
                                             dropout=t.dropout) if c.nsp else None)
        self.entity_head = nn.Sequential(nn.Linear(t.n_embd, c.entity_dim), _Activation(t.head_activation),
                                         build_norm(t.norm_class, c.entity_dim, t.norm_eps, t.norm_bias))
        self.reset_parameters()

    def reset_parameters(self):
        """The new parts by the text body's init scheme (the body initialised itself); entity vectors ~ unit length."""
        depth = self.config.text.replace(n_layer=self.config.n_layer)  # residual scaling counts the aggregators too
        init_weights(self, depth, skip=lambda n: n.startswith("text.") or n == "entities.weight")
        nn.init.normal_(self.entities.weight, 0.0, self.config.entity_dim ** -0.5)
        self.entities.weight.requires_grad_(not self.config.freeze_entities)

    # ------------------------------------------------------------------ entities and text weights
    def load_entity_embeddings(self, vectors: torch.Tensor, freeze: Optional[bool] = None):
        """Put pretrained entity vectors (n_entities, entity_dim), e.g. TransE, into the table."""
        if tuple(vectors.shape) != tuple(self.entities.weight.shape):
            raise ConfigError(f"entity vectors {tuple(vectors.shape)} do not fit the table "
                              f"{tuple(self.entities.weight.shape)} (n_entities, entity_dim)")
        with torch.no_grad():
            self.entities.weight.copy_(vectors)
        freeze = self.config.freeze_entities if freeze is None else freeze
        self.entities.weight.requires_grad_(not freeze)
        return self

    def init_from_encoder(self, encoder: TransformerLM):
        """Start from a BERT-like encoder with N + M layers (the paper starts from BERT-base): its embeddings,
        first N layers and MLM head become the T-Encoder, its last M layers the aggregators' token side.
        The entity side keeps its fresh init. Without entities the result computes what `encoder` does
        (fusion_output='residual')."""
        t, N, M = self.config.text, self.config.text.n_layer, self.config.n_aggregator_layer
        if encoder.config.n_layer != N + M or encoder.config.n_embd != t.n_embd:
            raise ConfigError(f"init_from_encoder needs an encoder with n_layer = {N} + {M} and n_embd = {t.n_embd}, "
                              f"got n_layer={encoder.config.n_layer}, n_embd={encoder.config.n_embd}")
        src = encoder.state_dict()
        text_state = {k: v for k, v in src.items()
                      if not k.startswith("blocks.") or int(k.split(".")[1]) < N}
        own_text = self.text.state_dict()
        missing = sorted(set(own_text) - set(text_state))
        if missing:
            raise ConfigError(f"the encoder lacks {missing[:5]} that ERNIE's text body has (a different head layout?)")
        with torch.no_grad():
            for k, v in own_text.items():
                v.copy_(text_state[k])
            for j, agg in enumerate(self.aggregators):
                prefix = f"blocks.{N + j}."
                for k, v in agg.state_dict().items():
                    if prefix + k in src:
                        v.copy_(src[prefix + k])
                    elif not k.startswith("ent_"):
                        raise ConfigError(f"the encoder has no {prefix + k} for aggregator {j}'s {k}")
        return self

    # ------------------------------------------------------------------ forward
    @property
    def device(self):
        return self.text.device

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _entity_inputs(self, entity_ids, key_mask, B, T, device):
        if entity_ids is None:
            entity_ids = torch.full((B, T), NO_ENTITY, dtype=torch.long, device=device)
        if entity_ids.shape != (B, T):
            raise ObjectiveError(f"entity_ids {tuple(entity_ids.shape)} must line up with the tokens {(B, T)} "
                                 f"(the entity of each mention's first token, {NO_ENTITY} elsewhere)")
        aligned = entity_ids != NO_ENTITY
        if key_mask is not None:
            aligned = aligned & key_mask
        bad = entity_ids[aligned]
        if bad.numel() and (int(bad.min()) < 0 or int(bad.max()) >= self.config.n_entities):
            raise ObjectiveError(f"entity ids must be in [0, {self.config.n_entities}) or {NO_ENTITY} (no entity); "
                                 f"got {sorted(set(bad.tolist()))[:5]}")
        return entity_ids.long().masked_fill(~aligned, 0), aligned  # any id at unaligned/padded positions is unused

    def encode(self, idx: torch.Tensor, entity_ids: Optional[torch.Tensor] = None,
               attention_mask: Optional[torch.Tensor] = None, token_type_ids: Optional[torch.Tensor] = None,
               position_ids: Optional[torch.Tensor] = None):
        """-> (token states (B, T, C), entity states (B, T, De)) after the K-Encoder."""
        B, T = idx.shape
        key_mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()
        w = self.text(idx, attention_mask=attention_mask, token_type_ids=token_type_ids, position_ids=position_ids,
                      return_hidden=True)  # T-Encoder (B, T, C)
        ids, aligned = self._entity_inputs(entity_ids, key_mask, B, T, idx.device)
        a = aligned[..., None].to(w.dtype)  # (B, T, 1)
        e = self.entities(ids).to(w.dtype) * a  # (B, T, De), zero where no entity
        mask = None
        if key_mask is not None:  # padding keys hidden; a padding query sees everything (finite softmax)
            mask = key_mask[:, None, None, :] | ~key_mask.any(-1)[:, None, None, None]
        # entity attention: only aligned positions are keys; a sequence without entities attends to all (zeros)
        ent_mask = aligned[:, None, None, :] | ~aligned.any(-1)[:, None, None, None]
        for agg in self.aggregators:
            w, e = agg(w, e, a, mask=mask, ent_mask=ent_mask)
        return w, e

    def score_entities(self, hidden: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """dEA scores: hidden (B, T, C), candidates (K,) shared or (B, K) per row -> (B, T, K)."""
        q = self.entity_head(hidden)  # (B, T, De)
        cand = self.entities(candidates.long()).to(q.dtype)  # (K, De) or (B, K, De)
        if cand.dim() == 2:
            return q @ cand.t()
        return torch.einsum("btd,bkd->btk", q, cand)

    def forward(self, idx: torch.Tensor, entity_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, token_type_ids: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, candidates: Optional[torch.Tensor] = None) -> ErnieOutput:
        """idx (B, T) tokens; entity_ids (B, T): entity of each mention's first token, NO_ENTITY (-1) elsewhere;
        candidates (K,) or (B, K): entities the dEA head scores each token against."""
        w, e = self.encode(idx, entity_ids, attention_mask, token_type_ids, position_ids)
        mlm = self.text.head(w) if self.config.text.lm_head else None
        pair = self.pair_head(pool(w, attention_mask, "first")) if self.pair_head is not None else None
        scores = self.score_entities(w, candidates) if candidates is not None else None
        return ErnieOutput(w, e, mlm, pair, scores)

    def save(self, path, format: str = "allformers", **kwargs):
        if format != "allformers":
            from ..errors import CheckpointError

            raise CheckpointError(f"ERNIE has no {format!r} export; save it with format='allformers'")
        from ..checkpoints import save

        return save(self, path, format=format, **kwargs)


# ---------------------------------------------------------------------- pretraining objective
def add_dea(batch: dict, entity_ids: torch.Tensor, *, candidates: Optional[torch.Tensor] = None,
            generator: Optional[torch.Generator] = None, **rates) -> dict:
    """Noise the token-entity alignments with dea_noise (5% wrong entity, 15% masked, 80% kept) and put what
    the model and ernie_loss read into the batch: entity_ids (noised), entity_targets (index into the
    candidates of the original entity, -100 at unaligned tokens) and candidates as (B, K) rows (the same K
    for every row, so the Trainer's row slicing keeps them)."""
    out = dea_noise(entity_ids, candidates=candidates, generator=generator, **rates)
    B = entity_ids.shape[0]
    return {**batch, "entity_ids": out["entity_ids"], "entity_targets": out["targets"],
            "candidates": out["candidates"][None].expand(B, -1).contiguous()}


def ernie_losses(model: ErnieModel, batch: dict) -> dict:
    """The pretraining losses present in the batch: "mlm" (labels), "nsp" (next_sentence_label), "dea"
    (entity_targets + candidates), and "loss", their sum (the paper's objective)."""
    if "input_ids" not in batch:
        raise ObjectiveError(f"an ERNIE batch needs 'input_ids' (keys: {sorted(batch)})")
    has_dea = batch.get("entity_targets") is not None
    if has_dea and batch.get("candidates") is None:
        raise ObjectiveError("entity_targets index into candidates: the batch needs 'candidates' too (see add_dea)")
    kw = {k: batch[k] for k in ("entity_ids", "attention_mask", "token_type_ids", "position_ids")
          if batch.get(k) is not None}
    out = model(batch["input_ids"], candidates=batch["candidates"] if has_dea else None, **kw)
    losses = {}
    if batch.get("labels") is not None:
        if out.mlm_logits is None:
            raise ObjectiveError("the batch has MLM labels but the model has no MLM head (text.lm_head=False)")
        losses["mlm"] = masked_cross_entropy(out.mlm_logits, batch["labels"])
    if batch.get("next_sentence_label") is not None:
        if out.pair_logits is None:
            raise ObjectiveError("the batch has next_sentence_label but the model has no NSP head (nsp=False)")
        losses["nsp"] = F.cross_entropy(out.pair_logits.float(), batch["next_sentence_label"])
    if has_dea:
        losses["dea"] = dea_loss(out.entity_scores, batch["entity_targets"])
    if not losses:
        raise ObjectiveError("the batch has no targets: give labels (MLM), next_sentence_label (NSP) and/or "
                             "entity_targets + candidates (dEA, from add_dea)")
    losses["loss"] = sum(losses.values())
    return losses


def ernie_loss(model: ErnieModel, batch: dict) -> torch.Tensor:
    """MLM + NSP + dEA: the Trainer's loss_fn for an ErnieModel."""
    return ernie_losses(model, batch)["loss"]


def _num_tokens(batch) -> int:
    if batch.get("attention_mask") is not None:
        return int(batch["attention_mask"].sum())
    return batch["input_ids"].numel()


ernie_loss.num_tokens = _num_tokens


__all__ = ["ErnieConfig", "ErnieModel", "ErnieOutput", "Aggregator", "add_dea", "ernie_loss",
           "ernie_losses", "FUSION_OUTPUTS"]
