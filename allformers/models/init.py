"""Weight initialisation schemes, one per family that has its own, chosen by `Config.init`.

It matters for training from scratch: T5 has no 1/sqrt(d) in attention (its query init carries it)
and scales a tied output by d**-0.5, so its embedding starts at N(0, 1); with GPT-2's N(0, 0.02)
T5's logits start ~50x too small and learning crawls. Loaded checkpoints overwrite all of this.

Each scheme is `scheme(name, param, config)` for one parameter (dim >= 2 weights and 1-D biases /
norm gains); `init_weights` walks a module with one, then resets every norm to ones and zeros."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn

from ..errors import ConfigError


def gpt2_scheme(name: str, p: torch.Tensor, c) -> None:
    """GPT-2: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * n_layer); zero biases."""
    if p.dim() >= 2:
        std = 0.02 / math.sqrt(2 * c.n_layer) if name.endswith("proj.weight") else 0.02
        nn.init.normal_(p, 0.0, std)
    elif name.endswith("bias"):
        nn.init.zeros_(p)


def bert_scheme(name: str, p: torch.Tensor, c) -> None:
    """BERT (and HF's encoders' _init_weights): N(0, 0.02) for every matrix and embedding; zero biases."""
    if p.dim() >= 2:
        nn.init.normal_(p, 0.0, 0.02)
    elif name.endswith("bias"):
        nn.init.zeros_(p)


def t5_scheme(name: str, p: torch.Tensor, c) -> None:
    """Mesh TensorFlow / HF T5: embeddings N(0, 1), query N(0, (d * d_kv)^-0.5), key / value / first FFN
    layer / relative bias N(0, d^-0.5), attention output N(0, (heads * d_kv)^-0.5), FFN output N(0, d_ff^-0.5)."""
    d, inner = c.n_embd, c.n_head * c.head_dim
    if p.dim() < 2:
        if name.endswith("bias"):
            nn.init.zeros_(p)
        return  # norm gains: init_weights resets the norms
    if name.endswith("wte.weight") or name.endswith("lm_head.weight"):
        p.normal_(0.0, 1.0)
    elif name.endswith("attn.qkv.weight"):
        p[:inner].normal_(0.0, (d * c.head_dim) ** -0.5)  # q
        p[inner:].normal_(0.0, d ** -0.5)  # k, v
    elif name.endswith("cross_attn.q.weight"):
        p.normal_(0.0, (d * c.head_dim) ** -0.5)
    elif name.endswith("cross_attn.kv.weight") or name.endswith("mlp.fc.weight") or "relative" in name:
        p.normal_(0.0, d ** -0.5)
    elif name.endswith("attn.proj.weight"):
        p.normal_(0.0, inner ** -0.5)
    elif name.endswith("mlp.proj.weight"):
        p.normal_(0.0, c.intermediate_size ** -0.5)
    else:
        raise ConfigError(f"init='t5' does not know the parameter {name!r} (shape {tuple(p.shape)}); T5's scheme "
                          f"covers T5's layout only: use init='gpt2' or 'bert' for this model")


INIT_SCHEMES = {"gpt2": gpt2_scheme, "bert": bert_scheme, "t5": t5_scheme}


@torch.no_grad()
def init_weights(module: nn.Module, config, scheme: Optional[str] = None,
                 skip: Callable[[str], bool] = lambda name: False) -> nn.Module:
    """Initialise `module`'s parameters with `scheme` (default: config.init), read against `config`'s
    sizes; names for which `skip(name)` holds keep their values. Norms are reset to ones / zeros."""
    fn = INIT_SCHEMES[scheme or config.init]
    for name, p in module.named_parameters():
        if p.is_meta or skip(name):  # meta: shapes only (parameter counts); torch's meta normal_ is slow
            continue
        fn(name, p, config)
    for name, m in module.named_modules():
        if isinstance(m, (nn.LayerNorm, nn.RMSNorm)) and not skip(name + ".weight"):
            m.reset_parameters()
    return module
