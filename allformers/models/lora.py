"""LoRA (Hu et al. 2021): train a low-rank update B @ A beside each frozen weight instead of the
weight itself. y = W x + (alpha / r) * B A x, with A (r, in) and B (out, r), B starting at zero
so a fresh adapter leaves the model exactly as it was.

    cfg = LoRAConfig(rank=8, alpha=16)
    apply_lora(model, cfg)            # freezes every base weight, wraps the matching Linears
    ... train lora_parameters(model) ...
    with lora_disabled(model): ...    # the frozen starting model (PPO / DPO reference), no second copy
    merge_lora(model)                 # fold B A into W: a plain model with its original keys

Our attention projects q, k and v with one fused Linear (`qkv`) and GLU feed-forwards fuse gate
and up (`fc`). One adapter on a fused Linear is a LoRA whose B rows span q, k and v (or gate and
up) together; it shares A between them, so at the same rank it has fewer parameters than three
separate adapters, and it merges into the fused weight exactly. Target names are the last
component of the module path: "qkv", "q", "kv", "proj" (attention output and MLP down), "fc"."""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import AllformersError
from .packed import release as release_packed

# Never wrapped: the LM head is (often) the embedding table itself, and adapting the vocabulary
# projection is not what LoRA targets mean.
EXCLUDED = ("lm_head",)


class LoRAError(AllformersError, ValueError):
    """A LoRA setting is wrong, or the model's Linears do not match the targets."""


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("qkv", "q", "kv", "proj", "fc")  # last path component of nn.Linear modules
    # Which blocks get adapters: None = all; else block indices, negative counting from the end
    # ((-8, -7, ..., -1) = the top 8). Adapting only the top layers also cuts the backward pass:
    # gradients never flow below the lowest adapted block.
    layers: Optional[tuple[int, ...]] = None
    top_layers: Optional[int] = None  # or: only the last k blocks (every block when k >= the model's depth)

    def __post_init__(self):
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        self.targets = tuple(self.targets)
        if int(self.rank) != self.rank or self.rank < 1:
            raise LoRAError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if self.alpha <= 0:
            raise LoRAError(f"LoRA alpha must be positive, got {self.alpha!r} (the update is scaled by alpha / rank)")
        if not 0.0 <= self.dropout < 1.0:
            raise LoRAError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if self.layers is not None:
            self.layers = tuple(int(i) for i in self.layers)
        if self.top_layers is not None and (self.layers is not None or self.top_layers < 1):
            raise LoRAError(f"top_layers={self.top_layers} must be >= 1 and cannot be combined with layers={self.layers}")
        if not self.targets:
            raise LoRAError("LoRA targets is empty; name at least one Linear, e.g. ('qkv', 'proj', 'fc')")
        bad = [t for t in self.targets if t in EXCLUDED]
        if bad:
            raise LoRAError(f"LoRA does not adapt {bad}: the LM head is the (often tied) vocabulary projection; "
                            f"train it fully or leave it out of the targets")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    """A frozen nn.Linear `base` plus a trainable low-rank update:
    y = base(x) + dropout(x) @ A^T @ B^T * (alpha / rank)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=w.dtype, device=w.device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as in the paper's code
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.enabled = True  # lora_disabled() turns this off

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The weight this layer applies (base + scaled update), for code that reads `.weight`."""
        if not self.enabled:
            return self.base.weight
        return self.base.weight + self.delta()

    @property
    def bias(self):
        return self.base.bias

    def delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        return y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale

    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing the same function (dropout aside)."""
        b = self.base
        out = nn.Linear(b.in_features, b.out_features, bias=b.bias is not None, device=b.weight.device,
                        dtype=b.weight.dtype)
        with torch.no_grad():
            # summed in float64 and rounded once: merging adds no error beyond the dtype's own
            out.weight.copy_(b.weight.double() + (self.lora_B.double() @ self.lora_A.double()) * self.scale)
            if b.bias is not None:
                out.bias.copy_(b.bias)
        return out

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


def _set_child(model: nn.Module, name: str, module: nn.Module):
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Freeze every parameter of `model`, then wrap each nn.Linear whose last name component is in
    cfg.targets with a LoRALinear (in place). Returns the wrapped module names.
    Linears shared by several layers (ALBERT) are wrapped once and stay shared."""
    if lora_modules(model):
        raise LoRAError("this model already has LoRA adapters; merge_lora(model) first, then apply new ones")
    embeddings = {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)}
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = [(n, m) for n, m in linears
              if n.rpartition(".")[2] in cfg.targets and n.rpartition(".")[2] not in EXCLUDED
              and m.weight.data_ptr() not in embeddings]  # a Linear tied to an embedding is the LM head
    if cfg.layers is not None or cfg.top_layers is not None:
        wanted = _wanted_blocks(model, cfg.layers, cfg.top_layers)
        chosen = [(n, m) for n, m in chosen if _block_index(n) in wanted]
    if not chosen:
        names = sorted({n.rpartition(".")[2] for n, _ in linears})
        raise LoRAError(f"no nn.Linear matches LoRA targets {list(cfg.targets)}; this model's Linear names "
                        f"(last component) are {names}; pass some of those as targets")
    # Remember what was trainable so merge_lora can give it back.
    model._lora_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for name, linear in chosen:
        _set_child(model, name, LoRALinear(linear, cfg.rank, cfg.alpha, cfg.dropout))
    release_packed(model)  # modules replaced: the packed copies (models/packed.py) are made again
    return [n for n, _ in chosen]


def _block_index(name: str) -> Optional[int]:
    """'blocks.3.attn.qkv' -> 3 (the layer a module sits in), else None."""
    parts = name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a == "blocks" and b.isdigit():
            return int(b)
    return None


def _wanted_blocks(model: nn.Module, layers: Optional[tuple[int, ...]], top: Optional[int]) -> set[int]:
    n = len(getattr(model, "blocks", None) or getattr(getattr(model, "body", None), "blocks", []))
    if n == 0:
        raise LoRAError("LoRAConfig.layers / top_layers need a model with a `blocks` list "
                        "(a TransformerLM or a task model on one)")
    if top is not None:
        return set(range(max(0, n - top), n))
    bad = [i for i in layers if not -n <= i < n]
    if bad:
        raise LoRAError(f"LoRA layers {bad} are out of range for a model with {n} blocks (use 0..{n - 1} or -{n}..-1)")
    return {i % n for i in layers}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, m in lora_modules(model) for p in (m.lora_A, m.lora_B)]


@contextmanager
def lora_disabled(model: nn.Module):
    """Inside the block every LoRALinear computes base(x) only: the model is the frozen starting
    point again (the reference model of PPO and DPO) without a copy of its weights."""
    mods = [m for _, m in lora_modules(model)]
    before = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m, e in zip(mods, before):
            m.enabled = e


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold each adapter into its base weight (W + B A * alpha/r) and put a plain nn.Linear back:
    same outputs, the original state-dict keys, so `model.save(path)` writes a normal checkpoint.
    Parameters get back the requires_grad they had before apply_lora."""
    mods = lora_modules(model)
    if not mods:
        raise LoRAError("this model has no LoRA adapters to merge (apply_lora first)")
    for name, m in mods:
        _set_child(model, name, m.merged())
    for n, p in model.named_parameters():
        p.requires_grad_(getattr(model, "_lora_requires_grad", {}).get(n, True))
    model.__dict__.pop("_lora_requires_grad", None)
    release_packed(model)
    return model


def lora_state_dict(model: nn.Module) -> dict:
    """The adapter weights only ({name.lora_A, name.lora_B}): a few MB instead of the whole model."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


def load_lora_state_dict(model: nn.Module, state: dict) -> None:
    """Put saved adapters into a model that apply_lora wrapped with the same config."""
    own = lora_state_dict(model)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise LoRAError(f"adapters do not fit this model: missing {missing[:4]}, unexpected {unexpected[:4]}; "
                        f"apply_lora with the config the adapters were trained with")
    with torch.no_grad():
        for k, v in state.items():
            if own[k].shape != v.shape:
                raise LoRAError(f"{k}: saved {tuple(v.shape)} vs model {tuple(own[k].shape)} (different rank?)")
            own[k].copy_(v)
