"""The one guard for generation settings and token ids: every entry point (generate,
generate_seq2seq, generate_text, chat, the CLI) goes through it before any model work, so a bad
value is named with its allowed range instead of failing deep inside sampling (or silently
producing nothing)."""
from __future__ import annotations

import math
from numbers import Integral, Real

import torch

from ..errors import InputError


# TransformerLM.forward (which the task heads and both stacks of an encoder-decoder run) calls this
# too: the ids guard sits below the models so that models and generation share it (one aminmax per call).
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


def _whole(name: str, value, least: int, meaning: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < least:
        raise InputError(f"{name}={value!r} must be a whole number >= {least}{meaning}")


def _real(name: str, value, meaning: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise InputError(f"{name}={value!r} must be a finite number {meaning}")
    return float(value)


def check_generation(*, max_new_tokens=64, temperature=0.0, top_k=None, top_p=None, repetition_penalty=1.0,
                     stop=None, num_beams=1, length_penalty=1.0, no_repeat_ngram_size=0):
    """Refuse out-of-range generation settings; returns `stop` as a list (a bare string is one stop string)."""
    _whole("max_new_tokens", max_new_tokens, 0)
    if _real("temperature", temperature, ">= 0 (0 = greedy)") < 0:
        raise InputError(f"temperature={temperature} must be >= 0 (0 = greedy; 1 samples the model's distribution)")
    if top_k is not None:
        _whole("top_k", top_k, 0, " (0 or None = off: every token stays a candidate)")
    if top_p is not None and not 0 < _real("top_p", top_p, "in (0, 1]") <= 1:
        raise InputError(f"top_p={top_p} must be in (0, 1] (the kept share of probability mass; 1 = off)")
    if _real("repetition_penalty", repetition_penalty, "> 0 (1 = off)") <= 0:
        raise InputError(f"repetition_penalty={repetition_penalty} must be > 0 (1 = off; above 1 discourages "
                         f"repeats, e.g. 1.2)")
    _whole("num_beams", num_beams, 1, " (1 = no beam search)")
    _real("length_penalty", length_penalty, "(1 = none)")
    _whole("no_repeat_ngram_size", no_repeat_ngram_size, 0, " (0 = off)")
    if stop is None:
        return None
    stop = [stop] if isinstance(stop, str) else list(stop)
    for s in stop:
        if not isinstance(s, str):
            raise InputError(f"stop strings must be strings, got {s!r}")
        if not s:
            raise InputError("an empty stop string matches everywhere (generation would stop at once); "
                             "drop it or give the text to stop at")
    return stop
