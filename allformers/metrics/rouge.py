"""ROUGE-L (Lin 2004): F-measure of the longest common subsequence of two word sequences.

Tokens follow Google's `rouge-score` package without stemming: lower-case the text and keep
the runs of [a-z0-9] (everything else separates words). With P = LCS/|a| and R = LCS/|b|,
F1 = 2PR / (P + R), which simplifies to 2 LCS / (|a| + |b|); we compute that form, so a score
that should be exactly 0.7 (LCS 7 of 10 and 10 words) is 0.7 in floating point too.

The LCS length uses the bit-parallel algorithm of Allison & Dix (1986) / Hyyro (2004): one
Python integer holds a whole DP row as bits, so each token of the other sequence costs a
handful of big-integer operations instead of a loop over the row. Self-instruct compares every
candidate with every kept instruction (N^2 calls), which is where this pays off."""
from __future__ import annotations

import re
from typing import Sequence, Union

from ..errors import AllformersError

_WORD = re.compile(r"[a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's default tokeniser: lower case, runs of [a-z0-9] (everything else separates)."""
    return _WORD.findall(text.lower())


def match_masks(tokens: Sequence) -> dict:
    """token -> bit mask of the positions where it occurs in `tokens` (bit i = position i)."""
    masks: dict = {}
    for i, t in enumerate(tokens):
        masks[t] = masks.get(t, 0) | (1 << i)
    return masks


def lcs_from_masks(masks: dict, m: int, other: Sequence) -> int:
    """LCS length of the m-token sequence behind `masks` and `other`.
    V's zero bits mark the DP row's increments; each token of `other` updates the row at once."""
    full = (1 << m) - 1
    v = full
    for t in other:
        u = v & masks.get(t, 0)
        v = ((v + u) | (v - u)) & full
    return m - v.bit_count()


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of two sequences of hashable items."""
    if len(a) < len(b):  # the longer one goes in the bits: fewer loop steps
        a, b = b, a
    return lcs_from_masks(match_masks(a), len(a), b) if b else 0


def _tokens(x: Union[str, Sequence[str]]) -> Sequence[str]:
    return rouge_tokens(x) if isinstance(x, str) else x


def rouge_l(candidate: Union[str, Sequence[str]], reference: Union[str, Sequence[str]]) -> float:
    """ROUGE-L F1 of two texts (or already tokenised lists); 0 when either is empty."""
    c, r = _tokens(candidate), _tokens(reference)
    if not c or not r:
        return 0.0
    return 2 * lcs_length(c, r) / (len(c) + len(r))


def max_rouge_l(candidate: Union[str, Sequence[str]], kept: Sequence[Sequence[str]]) -> float:
    """The highest ROUGE-L F1 of `candidate` against each of `kept` (token lists, tokenised once
    by the caller with `rouge_tokens`). The candidate's bit masks are built once; a kept item is
    skipped when even a full match (LCS = the shorter length) could not beat the best so far."""
    c = _tokens(candidate)
    m = len(c)
    if not m:
        return 0.0
    masks, best = match_masks(c), 0.0
    for r in kept:
        n = len(r)
        if not n or 2 * min(m, n) / (m + n) <= best:
            continue
        best = max(best, 2 * lcs_from_masks(masks, m, r) / (m + n))
        if best == 1.0:
            break
    return best


def rouge_l_corpus(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 over aligned (prediction, reference) pairs, as rouge-score users average it."""
    if len(predictions) != len(references):
        raise AllformersError(f"{len(predictions)} predictions but {len(references)} references: "
                              "pass one reference per prediction")
    if not predictions:
        raise AllformersError("no predictions to score: pass at least one (prediction, reference) pair")
    return sum(rouge_l(p, r) for p, r in zip(predictions, references)) / len(predictions)
