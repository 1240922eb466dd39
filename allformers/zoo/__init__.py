"""The zoo: every named model is a Config of the same blocks. Importing this package fills
`allformers.config.REGISTRY`; `list_models()` describes each entry."""
from __future__ import annotations

import torch

from ..config import REGISTRY, Config
from . import decoders, encoders  # noqa: F401  (registers)
from . import seq2seq  # noqa: F401  (registers the encoder-decoders)
from . import xl  # noqa: F401  (registers Transformer-XL and XLNet)
from . import moe  # noqa: F401  (registers GLaM and Mixtral)


def count_params(config: Config) -> int:
    """Parameter count without allocating memory (built on the meta device)."""
    from ..models import build_model

    with torch.device("meta"):
        return build_model(config).num_params()


def count_active_params(config: Config) -> int:
    """Parameters one token runs through: with experts, only n_expert_per_token of each MoE layer's
    n_expert count (the router and everything else count whole). Equal to count_params for dense models."""
    from ..blocks.moe import MoE
    from ..models import build_model

    with torch.device("meta"):
        model = build_model(config)
    idle = sum(p.numel() * (m.n_expert - m.top_k) // m.n_expert
               for m in model.modules() if isinstance(m, MoE) for p in m.experts.parameters())
    return model.num_params() - idle


def list_models() -> list[dict]:
    rows = []
    for name in REGISTRY:
        cfg = Config.from_name(name)
        rows.append({"name": name, "family": cfg.family, "params": count_params(cfg),
                     "description": cfg.description})
    return rows


def human(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)
