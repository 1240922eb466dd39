"""T5's span corruption (Raffel et al. 2020, section 3.1.4 and 3.3.4), ported from the reference
code (`t5.data.preprocessors.random_spans_noise_mask`, `noise_span_to_unique_sentinel`,
`nonnoise_span_to_unique_sentinel`, `random_spans_helper`).

The rule, for a sequence of L tokens:
  * noise tokens: round(L * noise_density) (at least 1, at most L - 1); noise spans:
    round(noise tokens / mean_noise_span_length) (at least 1);
  * the noise tokens are split into that many spans and the non-noise tokens into as many,
    each split uniformly at random among the splits into positive lengths
    (`random_segmentation`); the spans are interleaved non-noise, noise, non-noise, noise ...,
    so the sequence starts with kept text and ends inside a noise span (random_roll=True rotates
    the mask by a random offset, as T5's later variants allow);
  * inputs: each noise span is replaced by ONE sentinel, in order (<extra_id_0>, <extra_id_1>,
    ...), then EOS; targets: each sentinel followed by the span it replaced, then EOS (the kept
    runs of the targets become the sentinels: the same function applied to the inverted mask).
    When the text ends with kept tokens (random_roll), targets end with one more sentinel before
    EOS, the "final sentinel" of the paper's figure 2; when it starts inside a noise span, the
    targets start with that span.

Sentinels: T5 takes them from the END of the vocabulary, <extra_id_0> = vocab_size - 1 and
counting down (`t5_sentinel_ids`); `sentinel_ids_from_tokenizer` reads named <extra_id_i> tokens.

Random numbers come from numpy Generators (this is data-side work, done per sequence on the CPU).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

from .causal_lm import IGNORE_INDEX
from .mlm import ObjectiveError

RNG = Union[np.random.Generator, int, None]


def as_rng(rng: RNG) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def t5_sentinel_ids(vocab_size: int, n: int = 100) -> np.ndarray:
    """T5's convention: <extra_id_i> is vocab_size - 1 - i (the last ids of the vocabulary)."""
    return np.arange(vocab_size - 1, vocab_size - 1 - n, -1, dtype=np.int64)


def sentinel_ids_from_tokenizer(tokenizer, n: Optional[int] = None, fmt: str = "<extra_id_{}>") -> np.ndarray:
    """The ids of <extra_id_0>, <extra_id_1>, ... as named tokens of `tokenizer` (all that exist, or n)."""
    ids = []
    while n is None or len(ids) < n:
        i = tokenizer.token_id(fmt.format(len(ids)))
        if i is None:
            break
        ids.append(i)
    if not ids or (n is not None and len(ids) < n):
        raise ObjectiveError(f"the tokenizer has {len(ids)} sentinel tokens named like {fmt.format(0)!r}"
                             + (f", {n} are needed" if n else "") + "; add them as special tokens")
    return np.asarray(ids, dtype=np.int64)


# ---------------------------------------------------------------------- the mask
def _round(x: float) -> int:
    """tf.math.round on a float32 product: round half to even, as the reference code does."""
    return int(np.round(np.float32(x)))


def random_segmentation(num_items: int, num_segments: int, rng: RNG = None) -> np.ndarray:
    """Split num_items into num_segments positive lengths, uniformly among all such splits (T5's
    `_random_segmentation`: shuffle num_segments - 1 segment starts among the num_items - 1 gaps)."""
    if not 1 <= num_segments <= num_items:
        raise ObjectiveError(f"cannot split {num_items} items into {num_segments} non-empty segments")
    rng = as_rng(rng)
    first = np.zeros(num_items, dtype=np.int64)
    first[rng.choice(num_items - 1, num_segments - 1, replace=False) + 1] = 1
    return np.bincount(np.cumsum(first), minlength=num_segments)


def noise_counts(length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0) -> tuple[int, int]:
    """(noise tokens, noise spans) for a sequence of `length` tokens, as the reference code counts them."""
    length = max(length, 2)
    num_noise = min(max(_round(length * noise_density), 1), length - 1)
    num_spans = max(_round(num_noise / mean_noise_span_length), 1)
    return num_noise, num_spans


def random_spans_noise_mask(length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0,
                            rng: RNG = None, random_roll: bool = False) -> np.ndarray:
    """Bool (length,): True at the noise tokens (T5's random_spans_noise_mask)."""
    if not 0.0 < noise_density < 1.0 or mean_noise_span_length < 1.0:
        raise ObjectiveError(f"noise_density={noise_density} must be in (0, 1) and mean_noise_span_length="
                             f"{mean_noise_span_length} >= 1")
    rng = as_rng(rng)
    orig_length, length = length, max(length, 2)
    num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span_length)
    num_nonnoise = length - num_noise
    if num_nonnoise < num_spans:
        raise ObjectiveError(f"{num_nonnoise} kept tokens cannot separate {num_spans} noise spans "
                             f"(length={length}, noise_density={noise_density}); lower the density")
    noise_lengths = random_segmentation(num_noise, num_spans, rng)
    nonnoise_lengths = random_segmentation(num_nonnoise, num_spans, rng)
    interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)  # kept, noise, kept, noise ...
    span_id = np.repeat(np.arange(2 * num_spans), interleaved)
    mask = (span_id % 2 == 1)[:orig_length]
    if random_roll:
        mask = np.roll(mask, int(rng.integers(orig_length)))
    return mask


# ---------------------------------------------------------------------- inputs and targets
def noise_span_to_unique_sentinel(tokens: np.ndarray, noise_mask: np.ndarray, sentinel_ids: np.ndarray) -> np.ndarray:
    """Replace each run of True in noise_mask by one sentinel (the i-th run by sentinel_ids[i])."""
    prev = np.concatenate([[False], noise_mask[:-1]])
    first = noise_mask & ~prev
    n_spans = int(first.sum())
    if n_spans > len(sentinel_ids):
        raise ObjectiveError(f"{n_spans} spans need {n_spans} sentinels, only {len(sentinel_ids)} are available")
    out = tokens.copy()
    out[first] = sentinel_ids[np.cumsum(first)[first] - 1]
    return out[~(noise_mask & prev)]


def span_corruption(tokens, sentinel_ids, eos_id: Optional[int], noise_density: float = 0.15,
                    mean_noise_span_length: float = 3.0, rng: RNG = None, random_roll: bool = False,
                    return_mask: bool = False):
    """One sequence of token ids (no EOS) -> (inputs, targets) as int64 arrays, each ending with
    eos_id (None: no EOS). With return_mask, also the noise mask."""
    tokens = np.asarray(tokens, dtype=np.int64)
    sentinel_ids = np.asarray(sentinel_ids, dtype=np.int64)
    if is_sentinel(tokens, sentinel_ids).any():
        raise ObjectiveError("the text already contains sentinel ids; sentinels must be reserved tokens")
    mask = random_spans_noise_mask(len(tokens), noise_density, mean_noise_span_length, rng, random_roll)
    inputs = noise_span_to_unique_sentinel(tokens, mask, sentinel_ids)
    targets = noise_span_to_unique_sentinel(tokens, ~mask, sentinel_ids)
    if eos_id is not None:
        inputs, targets = np.append(inputs, eos_id), np.append(targets, eos_id)
    return (inputs, targets, mask) if return_mask else (inputs, targets)


def reassemble(inputs, targets, sentinel_ids, eos_id: Optional[int] = None) -> list[int]:
    """The original sequence from span-corrupted inputs and targets: the i-th sentinel of the
    inputs is replaced by the i-th noise span of the targets (the non-empty runs between their
    sentinels: when the text starts inside a noise span, random_roll, the targets start with it).
    Exact inverse of span_corruption (a trailing EOS is dropped from both)."""
    inputs, targets = np.asarray(inputs, dtype=np.int64), np.asarray(targets, dtype=np.int64)
    if eos_id is not None:
        inputs = inputs[:-1] if len(inputs) and inputs[-1] == eos_id else inputs
        targets = targets[:-1] if len(targets) and targets[-1] == eos_id else targets
    in_sent, tg_sent = is_sentinel(inputs, sentinel_ids), is_sentinel(targets, sentinel_ids)
    tl, il = targets.tolist(), inputs.tolist()
    bounds = [-1, *np.flatnonzero(tg_sent).tolist(), len(tl)]
    spans = [tl[a + 1:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a + 1]
    slots = np.flatnonzero(in_sent).tolist()
    if len(slots) > len(spans):
        raise ObjectiveError(f"the inputs have {len(slots)} sentinels, the targets only {len(spans)} spans")
    out, prev = [], 0
    for span, slot in zip(spans, slots):
        out += il[prev:slot] + span
        prev = slot + 1
    return out + il[prev:]


def is_sentinel(tokens: np.ndarray, sentinel_ids) -> np.ndarray:
    """Bool mask of sentinel tokens (a range test when the sentinels are contiguous ids, as in T5)."""
    ids = np.asarray(sentinel_ids, dtype=np.int64)
    lo, hi = int(ids.min()), int(ids.max())
    if hi - lo + 1 == len(ids):
        return (tokens >= lo) & (tokens <= hi)
    return np.isin(tokens, ids)


def compute_input_and_target_lengths(inputs_length: int, noise_density: float = 0.15,
                                     mean_noise_span_length: float = 3.0) -> tuple[int, int]:
    """(raw tokens to take, targets length) so that the corrupted inputs are exactly inputs_length
    long, EOS included (T5's random_spans_helper; 512 inputs <- 568 raw tokens, 114 targets)."""
    def lengths(tokens_length):
        num_noise, num_spans = noise_counts(tokens_length, noise_density, mean_noise_span_length)
        return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1

    tokens_length = inputs_length
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    return tokens_length, lengths(tokens_length)[1]


# ---------------------------------------------------------------------- data for the Trainer
def pad_batch(rows: Sequence[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D id arrays -> (ids (B, T), attention_mask (B, T))."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.as_tensor(np.asarray(r, dtype=np.int64))
        mask[i, :len(r)] = 1
    return ids, mask


def seq2seq_batch(sources: Sequence, targets: Sequence, pad_id: int) -> dict:
    """input_ids, attention_mask (sources, right-padded) and labels (targets, -100 past their end)."""
    input_ids, attention_mask = pad_batch(sources, pad_id)
    labels, label_mask = pad_batch(targets, pad_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "labels": labels.masked_fill(label_mask == 0, IGNORE_INDEX)}


class StreamExamples:
    """Seeded random examples from a token stream, for the Trainer: a subclass sets `stream`,
    `span` (raw tokens an example reads), `pad_id` and `rng`, and defines example(start) ->
    (source ids, target ids). Noise is drawn afresh each time; the RNG state goes into checkpoints."""

    def sample(self, n: int) -> dict:
        starts = self.rng.integers(0, len(self.stream) - self.span, size=n)
        pairs = [self.example(int(s)) for s in starts]
        return seq2seq_batch([p[0] for p in pairs], [p[1] for p in pairs], self.pad_id)

    def fixed_batches(self, batch_size: int, n_batches: int, seed: int) -> list:
        """The same batches every call (noise included), from a generator of their own."""
        saved, self.rng = self.rng, np.random.default_rng(seed)
        try:
            return [self.sample(batch_size) for _ in range(n_batches)]
        finally:
            self.rng = saved

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]


class SpanCorruptionData(StreamExamples):
    """Random windows of a token stream, span-corrupted afresh each time they are drawn (the noise
    is dynamic). `inputs_length` fixes the corrupted input length (EOS included), as T5 does:
    windows are compute_input_and_target_lengths(inputs_length)[0] raw tokens long.
    sample(n) -> {input_ids, attention_mask, labels}; its RNG state goes into checkpoints."""

    def __init__(self, stream, sentinel_ids, eos_id: int, pad_id: int, inputs_length: int = 128,
                 noise_density: float = 0.15, mean_noise_span_length: float = 3.0, seed: int = 0):
        self.stream = np.asarray(stream, dtype=np.int64)
        self.sentinel_ids, self.eos_id, self.pad_id = np.asarray(sentinel_ids, dtype=np.int64), eos_id, pad_id
        self.noise_density, self.mean_noise_span_length = noise_density, mean_noise_span_length
        self.tokens_length, self.targets_length = compute_input_and_target_lengths(
            inputs_length, noise_density, mean_noise_span_length)
        if len(self.stream) <= self.tokens_length:
            raise ObjectiveError(f"{len(self.stream)} tokens cannot fill one window of {self.tokens_length}")
        self.rng = np.random.default_rng(seed)

    @property
    def span(self) -> int:
        return self.tokens_length

    def example(self, start: int) -> tuple[np.ndarray, np.ndarray]:
        window = self.stream[start:start + self.tokens_length]
        return span_corruption(window, self.sentinel_ids, self.eos_id, self.noise_density,
                               self.mean_noise_span_length, self.rng)
