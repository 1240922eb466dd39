"""The vocabulary of checkpoint key tables: row kinds and the Family record.

A row says: our key (with "{}" for the layer index) <- the HF key(s) and how the tensors
change on the way. Each row converts in both directions."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..config import Config
from ..errors import CheckpointError


# ---------------------------------------------------------------------- activations
# The names HF configs use (transformers' ACT2FN keys: hidden_act, activation_function, ...) -> ours.
# One table for every family: several HF names compute the same function (GPT-2's "gelu_new" and
# LLaMA's "gelu_pytorch_tanh" are both the tanh approximation).
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                  "relu": "relu", "silu": "silu", "swish": "silu", "quick_gelu": "quick_gelu", "tanh": "tanh"}
# ours -> HF's, for export. gelu_tanh has two spellings: `tanh_name` picks the family's ("gelu_new" for
# GPT-2, BERT, BART and their kin; "gelu_pytorch_tanh" for LLaMA and the vision towers).
EXPORTABLE_ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu", "quick_gelu", "tanh")


def activation_from_hf(name: str, field: str = "hidden_act") -> str:
    """Our activation for an HF config's `field` value; a clear error for one we do not implement."""
    if name not in HF_ACTIVATIONS:
        raise CheckpointError(f"{field}={name!r} is not supported; supported: {sorted(HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[name]


def activation_to_hf(ours: str, tanh_name: str = "gelu_new") -> str:
    """HF's name for our activation (the inverse of activation_from_hf)."""
    if ours not in EXPORTABLE_ACTIVATIONS:
        raise CheckpointError(f"activation={ours!r} has no Hugging Face name; exportable: {list(EXPORTABLE_ACTIVATIONS)}")
    return tanh_name if ours == "gelu_tanh" else ours


@dataclass
class Row:
    ours: str
    hf: tuple  # one or more HF templates
    to_ours: Callable  # (list of HF tensors, config) -> our tensor
    to_hf: Callable  # (our tensor, config) -> list of HF tensors


def same(ours, hf):
    return Row(ours, (hf,), lambda ts, c: ts[0], lambda t, c: [t])


def pair(ours, hf):
    """weight and bias of one Linear / LayerNorm."""
    return [same(f"{ours}.weight", f"{hf}.weight"), same(f"{ours}.bias", f"{hf}.bias")]


def transposed(ours, hf):  # GPT-2 stores Linear weights as Conv1D (in, out)
    return Row(ours, (hf,), lambda ts, c: ts[0].t(), lambda t, c: [t.t()])


def concat(ours, *hf, sizes: Callable):
    """Several HF matrices stacked on dim 0 into one of ours (q/k/v -> qkv, gate/up -> fc)."""
    return Row(ours, hf, lambda ts, c: torch.cat(ts, 0), lambda t, c: list(t.split(sizes(c), 0)))


def qkv_sizes(c: Config):
    return [c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.n_kv_head * c.head_dim]


def separate_qkv(ours_prefix, q, k, v, bias=True):
    """Separate q/k/v projections (BERT, LLaMA, DistilBERT...) -> our fused qkv."""
    rows = [concat(f"{ours_prefix}.weight", f"{q}.weight", f"{k}.weight", f"{v}.weight", sizes=qkv_sizes)]
    if bias:
        rows.append(concat(f"{ours_prefix}.bias", f"{q}.bias", f"{k}.bias", f"{v}.bias", sizes=qkv_sizes))
    return rows


def per_head_qkv(ours, hf):
    """GPT-NeoX and BLOOM fuse qkv per head: rows ordered (head, [q|k|v], dim); ours are ([q|k|v], head, dim)."""
    def to_ours(ts, c):
        t = ts[0]
        return t.view(c.n_head, 3, c.head_dim, *t.shape[1:]).transpose(0, 1).reshape(t.shape)

    def to_hf(t, c):
        return [t.view(3, c.n_head, c.head_dim, *t.shape[1:]).transpose(0, 1).reshape(t.shape)]

    return Row(ours, (hf,), to_ours, to_hf)


@dataclass
class Family:
    model_type: str
    architectures: dict  # task -> HF class name ("lm" -> GPT2LMHeadModel, "base" -> BertModel, ...)
    body_rows: Callable  # config -> rows, our keys relative to TransformerLM
    config_from_hf: Callable  # HF config dict -> Config kwargs
    config_to_hf: Callable  # Config -> HF config dict
    fits: Callable  # Config -> bool: can this HF architecture hold the config exactly?
    head_rows: dict = field(default_factory=dict)  # task -> (config -> rows); "lm" rows are TransformerLM keys;
    # "base": the bare backbone's pooler, for families whose base class has one (BertModel's pooler)
    ignore: tuple = ()  # HF keys that are buffers or unused parts, not weights we need
    tied_hf_key: Optional[str] = None  # HF head key that is absent/duplicated when tied
    aliases: tuple = ()  # (other name, canonical name): names newer transformers use in memory
    base_prefix: str = ""  # prefix that bare-backbone checkpoints (BertModel, GPT2Model) leave out
    # task -> (HF config dict -> Config kwargs) for heads whose HF class fixes more than the generic switches
    # (ELECTRA: a GELU sequence classifier; a discriminator with dense + hidden_act)
    head_config: dict = field(default_factory=dict)
    patterns: tuple = ("global",)  # attention patterns (Config.attention_pattern) the architecture can hold
    experts: bool = False  # its feed-forwards are mixtures of experts (Config.n_expert > 0), not dense
    normalize: Optional[Callable] = None  # (HF state, config) -> the same state under the on-disk names

    def holds(self, c: Config) -> bool:
        """Can this architecture hold the config's attention patterns and kind of feed-forward?"""
        return set(c.attention_pattern or ["global"]) <= set(self.patterns) and bool(c.n_expert) == self.experts


FAMILIES: dict = {}


def register_family(family: Family) -> Family:
    FAMILIES[family.model_type] = family
    return family


@dataclass
class Packed:
    """Several of our tensors stored as one HF tensor, stacked on dim 0: nn.MultiheadAttention's in_proj
    ([q; k; v]) -> our cross-attention's q and kv. Each converts in both directions."""
    ours: tuple
    hf: tuple  # one HF template
    sizes: Callable  # config -> the dim-0 size of each of ours

    def to_ours(self, ts, c):
        return list(ts[0].split(self.sizes(c), 0))

    def to_hf(self, ts, c):
        return [torch.cat(ts, 0)]


def packed(ours: tuple, hf: str, sizes: Callable) -> Packed:
    return Packed(tuple(ours), (hf,), sizes)


def unsqueezed(ours, hf, hf_dims: int):
    """HF's tensor of `hf_dims` dims is ours with leading 1s up to 3 dims: CLIP's position table (N, D) and
    class embedding (D,) -> our (1, N, D) and (1, 1, D)."""
    return Row(ours, (hf,), lambda ts, c: ts[0].reshape((1,) * (3 - hf_dims) + tuple(ts[0].shape)),
               lambda t, c: [t.reshape(t.shape[3 - hf_dims:])])
