"""Normalisation layers. Both are torch's own; this file only picks one from the config."""
import torch.nn as nn


def build_norm(norm_class: str, dim: int, eps: float, bias: bool = True) -> nn.Module:
    if norm_class == "LayerNorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if norm_class == "RMSNorm":  # LLaMA / T5: no mean subtraction, no bias
        return nn.RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm_class {norm_class!r}; use 'LayerNorm' or 'RMSNorm'")
