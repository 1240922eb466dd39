"""BART's five noising functions (Lewis et al. 2019, section 2.2 and figure 2), each with a rate
and a record of what it did, so the change can be checked (and undone) exactly:

  * token_masking       random tokens become <mask>                  -> the masked positions
  * token_deletion      random tokens are removed                    -> the deleted positions
  * text_infilling      spans with Poisson(lambda) lengths become ONE <mask> each; a 0-length span
                        INSERTS a <mask>                             -> (position, span) per mask
  * sentence_permutation  sentences (split after full stops) are shuffled -> the new order
  * document_rotation   the document is rotated to start at a uniformly chosen token -> the offset

Counts follow fairseq's `DenoisingDataset` (the BART reference code): ceil(n * ratio) tokens are
masked or deleted, chosen without replacement; infilling spends a budget of ceil(n * ratio)
tokens on spans whose lengths are drawn from Poisson(lambda) until the budget is reached (the
last length trimmed to fit), and permutation shuffles ceil(k * ratio) of the k sentences among
themselves. Two departures, both to keep the record exact: infilling places its spans so they
never overlap (fairseq picks span starts independently, and overlapping spans merge), and
everything works on tokens, not whole words (fairseq can mask whole GPT-2 words).

Inputs are the document's content tokens (no <s> / </s>); outputs are int64 numpy arrays.
`BartNoiser` chains them in fairseq's order (permute, mask / infill, delete, rotate); the
paper's best combination for pretraining is text infilling + sentence permutation."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from .mlm import ObjectiveError
from .span_corruption import RNG, StreamExamples, as_rng


def _check_ratio(name: str, ratio: float):
    if not 0.0 <= ratio <= 1.0:
        raise ObjectiveError(f"{name}={ratio} must be in [0, 1]")


def _count(n: int, ratio: float) -> int:
    return min(n, math.ceil(n * ratio))


def _random_tokens(k: int, vocab_size: Optional[int], rng: np.random.Generator, avoid: Sequence[int]) -> np.ndarray:
    if vocab_size is None:
        raise ObjectiveError("random_ratio > 0 replaces masks by random tokens: pass vocab_size")
    pool = np.setdiff1d(np.arange(vocab_size), np.asarray(avoid, dtype=np.int64))
    return rng.choice(pool, size=k)


# ---------------------------------------------------------------------- 1. token masking
def token_masking(tokens, mask_id: int, ratio: float = 0.15, rng: RNG = None, *, random_ratio: float = 0.0,
                  vocab_size: Optional[int] = None, special_ids: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """ceil(n * ratio) random positions become mask_id (a random_ratio share of them a random
    token instead). -> (noised tokens (same length), sorted masked positions)."""
    _check_ratio("ratio", ratio)
    rng, tokens = as_rng(rng), np.asarray(tokens, dtype=np.int64)
    pos = np.sort(rng.choice(len(tokens), _count(len(tokens), ratio), replace=False))
    out = tokens.copy()
    out[pos] = mask_id
    if random_ratio and len(pos):
        rand = rng.random(len(pos)) < random_ratio
        out[pos[rand]] = _random_tokens(int(rand.sum()), vocab_size, rng, [mask_id, *special_ids])
    return out, pos


# ---------------------------------------------------------------------- 2. token deletion
def token_deletion(tokens, ratio: float = 0.15, rng: RNG = None) -> tuple[np.ndarray, np.ndarray]:
    """ceil(n * ratio) random tokens are removed. -> (kept tokens, sorted deleted positions in the input)."""
    _check_ratio("ratio", ratio)
    rng, tokens = as_rng(rng), np.asarray(tokens, dtype=np.int64)
    pos = np.sort(rng.choice(len(tokens), _count(len(tokens), ratio), replace=False))
    keep = np.ones(len(tokens), dtype=bool)
    keep[pos] = False
    return tokens[keep], pos


def undo_deletion(kept, deleted_positions, deleted_tokens) -> list[int]:
    """Put deleted tokens back at their original positions."""
    kept, pos = np.asarray(kept, dtype=np.int64), np.asarray(deleted_positions, dtype=np.int64)
    out = np.empty(len(kept) + len(pos), dtype=np.int64)
    hole = np.zeros(len(out), dtype=bool)
    hole[pos] = True
    out[hole], out[~hole] = np.asarray(deleted_tokens, dtype=np.int64), kept
    return out.tolist()


# ---------------------------------------------------------------------- 3. text infilling
def poisson_span_lengths(budget: int, poisson_lambda: float = 3.0, rng: RNG = None) -> np.ndarray:
    """Span lengths drawn from Poisson(lambda) until they add up to `budget`, the last trimmed to
    fit (fairseq's rule). Zero-length spans stay: they become inserted masks."""
    rng = as_rng(rng)
    if budget <= 0:
        return np.zeros(0, dtype=np.int64)
    lengths = rng.poisson(poisson_lambda, size=budget)
    while lengths.sum() < budget:
        lengths = np.concatenate([lengths, rng.poisson(poisson_lambda, size=budget)])
    cum = np.cumsum(lengths)
    i = int(np.searchsorted(cum, budget))  # first index with cum >= budget
    lengths = lengths[:i + 1].copy()
    lengths[i] = budget - (cum[i - 1] if i else 0)
    return lengths.astype(np.int64)


@dataclass
class Infilled:
    tokens: np.ndarray  # the noised sequence
    mask_positions: np.ndarray  # (k,) where each span's single mask sits in `tokens`
    spans: list  # k arrays: the original tokens each mask replaced (empty for an insertion)
    lengths: np.ndarray  # (k,) span lengths as drawn (after trimming)

    def restore(self) -> list[int]:
        return undo_infilling(self.tokens, self.mask_positions, self.spans)


def text_infilling(tokens, mask_id: int, ratio: float = 0.3, poisson_lambda: float = 3.0, rng: RNG = None, *,
                   random_ratio: float = 0.0, vocab_size: Optional[int] = None,
                   special_ids: Sequence[int] = ()) -> Infilled:
    """Replace spans covering ceil(n * ratio) tokens, lengths ~ Poisson(poisson_lambda), each by ONE
    mask (a random_ratio share by a random token); 0-length spans insert a mask. The spans are
    placed uniformly at random without overlapping (every arrangement of the kept tokens into
    the k + 1 gaps between spans equally likely)."""
    _check_ratio("ratio", ratio)
    if poisson_lambda <= 0:
        raise ObjectiveError(f"poisson_lambda={poisson_lambda} must be positive")
    rng, tokens = as_rng(rng), np.asarray(tokens, dtype=np.int64)
    n = len(tokens)
    lengths = poisson_span_lengths(_count(n, ratio), poisson_lambda, rng)
    k, kept = len(lengths), n - int(lengths.sum())
    # stars and bars: k spans among `kept` tokens -> k + 1 gap sizes (weak composition), uniformly
    bars = np.sort(rng.choice(kept + k, k, replace=False))
    gaps = np.diff(np.concatenate([[-1], bars, [kept + k]])) - 1  # (k + 1,)
    pieces, positions, spans, src, cursor = [], [], [], 0, 0
    for j in range(k):
        pieces += [tokens[src:src + gaps[j]], np.asarray([mask_id], dtype=np.int64)]
        cursor += gaps[j]
        positions.append(cursor)
        cursor += 1
        src += gaps[j]
        spans.append(tokens[src:src + lengths[j]])
        src += lengths[j]
    pieces.append(tokens[src:])
    noised = np.concatenate(pieces)
    positions = np.asarray(positions, dtype=np.int64)
    if random_ratio and k:
        rand = rng.random(k) < random_ratio
        noised[positions[rand]] = _random_tokens(int(rand.sum()), vocab_size, rng, [mask_id, *special_ids])
    return Infilled(noised, positions, spans, lengths)


def undo_infilling(noised, mask_positions, spans) -> list[int]:
    """Remove each mask and put back the span it replaced (nothing, for an insertion)."""
    tokens, out, prev = np.asarray(noised).tolist(), [], 0
    for pos, span in sorted(zip(map(int, mask_positions), spans), key=lambda x: x[0]):
        out += tokens[prev:pos] + np.asarray(span).tolist()
        prev = pos + 1
    return out + tokens[prev:]


# ---------------------------------------------------------------------- 4. sentence permutation
def split_sentences(tokens, full_stop_ids: Iterable[int]) -> list[np.ndarray]:
    """Sentences end after a run of full-stop tokens; trailing text without one is a sentence too."""
    tokens = np.asarray(tokens, dtype=np.int64)
    stop = np.isin(tokens, np.asarray(list(full_stop_ids), dtype=np.int64))
    ends = np.nonzero(stop & ~np.append(stop[1:], False))[0] + 1  # one past each run of full stops
    bounds = [0, *ends.tolist()] + ([len(tokens)] if not len(ends) or ends[-1] != len(tokens) else [])
    return [tokens[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def sentence_permutation(tokens, full_stop_ids: Iterable[int], ratio: float = 1.0,
                         rng: RNG = None) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle ceil(k * ratio) of the k sentences among themselves (ratio 1: a uniform random
    order of all). -> (permuted tokens, order: output sentence j is input sentence order[j])."""
    _check_ratio("ratio", ratio)
    rng = as_rng(rng)
    sents = split_sentences(tokens, full_stop_ids)
    k = len(sents)
    order = np.arange(k)
    chosen = rng.permutation(k)[:_count(k, ratio)]
    order[chosen] = chosen[rng.permutation(len(chosen))]
    out = np.concatenate([sents[i] for i in order]) if k else np.zeros(0, dtype=np.int64)
    return out, order


# ---------------------------------------------------------------------- 5. document rotation
def document_rotation(tokens, ratio: float = 1.0, rng: RNG = None) -> tuple[np.ndarray, int]:
    """With probability `ratio`, rotate so the document starts at a uniformly chosen token.
    -> (rotated tokens, offset: output = roll(input, -offset); 0 when not rotated)."""
    _check_ratio("ratio", ratio)
    rng, tokens = as_rng(rng), np.asarray(tokens, dtype=np.int64)
    if not len(tokens) or rng.random() >= ratio:
        return tokens.copy(), 0
    offset = int(rng.integers(len(tokens)))
    return np.concatenate([tokens[offset:], tokens[:offset]]), offset


# ---------------------------------------------------------------------- all together
@dataclass
class BartNoiser:
    """fairseq's order: sentence permutation, then token masking or text infilling, then deletion,
    then rotation. BART's pretraining (the paper's best): infill_ratio=0.3, permute_ratio=1.0."""

    mask_id: int
    full_stop_ids: Sequence[int] = ()
    permute_ratio: float = 0.0
    mask_ratio: float = 0.0  # token masking
    infill_ratio: float = 0.0  # text infilling (span masking)
    poisson_lambda: float = 3.0
    delete_ratio: float = 0.0
    rotate_ratio: float = 0.0
    random_ratio: float = 0.0  # share of masks replaced by random tokens instead
    vocab_size: Optional[int] = None

    def __post_init__(self):
        for name in ("permute_ratio", "mask_ratio", "infill_ratio", "delete_ratio", "rotate_ratio", "random_ratio"):
            _check_ratio(name, getattr(self, name))
        if self.mask_ratio and self.infill_ratio:
            raise ObjectiveError("choose token masking (mask_ratio) or text infilling (infill_ratio), not both")
        if self.permute_ratio and not len(self.full_stop_ids):
            raise ObjectiveError("sentence permutation needs full_stop_ids (the tokens that end sentences)")

    def __call__(self, tokens, rng: RNG = None) -> np.ndarray:
        rng, x = as_rng(rng), np.asarray(tokens, dtype=np.int64)
        kw = dict(random_ratio=self.random_ratio, vocab_size=self.vocab_size)
        if self.permute_ratio:
            x, _ = sentence_permutation(x, self.full_stop_ids, self.permute_ratio, rng)
        if self.mask_ratio:
            x, _ = token_masking(x, self.mask_id, self.mask_ratio, rng, **kw)
        if self.infill_ratio:
            x = text_infilling(x, self.mask_id, self.infill_ratio, self.poisson_lambda, rng, **kw).tokens
        if self.delete_ratio:
            x, _ = token_deletion(x, self.delete_ratio, rng)
        if self.rotate_ratio:
            x, _ = document_rotation(x, self.rotate_ratio, rng)
        return x


class DenoisingData(StreamExamples):
    """Random windows of `window` tokens from a stream (a "document" each), noised afresh every
    draw; source = <s> noised </s>, target = original </s> (the decoder starts from the config's
    decoder_start_token_id). sample(n) -> {input_ids, attention_mask, labels}."""

    def __init__(self, stream, noiser: BartNoiser, eos_id: int, pad_id: int, bos_id: Optional[int] = None,
                 window: int = 128, seed: int = 0):
        self.stream = np.asarray(stream, dtype=np.int64)
        if len(self.stream) <= window:
            raise ObjectiveError(f"{len(self.stream)} tokens cannot fill one window of {window}")
        self.noiser, self.eos_id, self.pad_id, self.bos_id, self.window = noiser, eos_id, pad_id, bos_id, window
        self.rng = np.random.default_rng(seed)

    @property
    def span(self) -> int:
        return self.window

    def example(self, start: int) -> tuple[np.ndarray, np.ndarray]:
        doc = self.stream[start:start + self.window]
        src = self.noiser(doc, self.rng)
        head = [self.bos_id] if self.bos_id is not None else []
        return np.concatenate([head, src, [self.eos_id]]).astype(np.int64), np.append(doc, self.eos_id)


def full_stop_ids(tokenizer, marks: str = ".!?") -> list[int]:
    """Ids of the tokens that end a sentence: pure punctuation (after stripping spaces) holding
    one of `marks` ('.', '?"', '!)' ...)."""
    ids = []
    for token, i in tokenizer.backend.get_vocab().items():
        text = tokenizer.backend.decode([i], skip_special_tokens=True).strip()
        if text and any(m in text for m in marks) and all(not ch.isalnum() for ch in text):
            ids.append(i)
    return sorted(ids)
