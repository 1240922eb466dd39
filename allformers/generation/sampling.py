"""The pieces every decoder shares (generate.py, seq2seq.py, speculative.py, the VLMs): eos ids as a
tensor, left padding of a prompt batch, Hugging Face's logits processing order, text streaming.
They sit below the decoders so that none of them imports another back."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ..errors import AllformersError


def eos_tensor(eos_id) -> torch.Tensor:
    return torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id or []), dtype=torch.long)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int):
    """Token lists of different lengths -> ids (B, T) and attention mask (B, T), padded on the
    left so that every row's next token is at the same index."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise AllformersError("every prompt needs at least one token")
    T = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), T), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, T - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, T - len(s):] = 1
    return ids, mask


def process_logits(logits: torch.Tensor, seen: torch.Tensor, *, temperature: float, top_k: Optional[int],
                   top_p: Optional[float], repetition_penalty: float) -> torch.Tensor:
    """logits (B, V) -> processed logits (B, V). `seen` (B, S) are the ids so far (prompt included)."""
    if repetition_penalty != 1.0:  # CTRL's penalty: push down every token already present
        prev = logits.gather(1, seen)
        logits = logits.scatter(1, seen, torch.where(prev > 0, prev / repetition_penalty, prev * repetition_penalty))
    if temperature and temperature != 1.0:
        logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1)  # ascending, as HF does
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= 1 - top_p
        drop[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


class TextStream:
    """Turns growing token lists into text deltas without splitting multi-byte characters
    (byte-level BPE can end a token in the middle of a UTF-8 sequence)."""

    def __init__(self, tokenizer, callback: Callable[[str], None]):
        self.tokenizer, self.callback, self.ids, self.printed = tokenizer, callback, [], 0

    def __call__(self, token_id: int):
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return  # wait for the rest of the character
        if len(text) > self.printed:
            self.callback(text[self.printed:])
            self.printed = len(text)
