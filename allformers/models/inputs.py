"""The guard on token ids, at the boundary every model shares (TransformerLM.forward, which
the task heads and both stacks of an encoder-decoder run): one aminmax per call."""
from __future__ import annotations

import torch

from ..errors import InputError


def check_token_ids(ids, vocab_size: int, name: str = "token ids") -> None:
    """ids (B, T): an integer tensor, at least one token per row, every id inside the vocabulary."""
    if not isinstance(ids, torch.Tensor):
        raise InputError(f"{name} must be a tensor of integer ids such as torch.tensor([[1, 2, 3]]), "
                         f"got {type(ids).__name__}")
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise InputError(f"{name} must be integers (torch.long), got {ids.dtype}; ids come from tokenizer.encode "
                         f"(use .long() only if the values are whole ids)")
    if ids.dim() != 2 or ids.shape[1] == 0 or ids.shape[0] == 0:
        raise InputError(f"{name} of shape {tuple(ids.shape)}: expected (batch, tokens) with at least one token "
                         f"per row")
    lo, hi = torch.stack(torch.aminmax(ids)).tolist()  # one device sync
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise InputError(f"token id {bad} in {name} is outside the vocabulary (0 ... {vocab_size - 1}); the ids "
                         f"come from another tokenizer, or the config's vocab_size is too small")
