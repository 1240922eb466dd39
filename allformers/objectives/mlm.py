"""Masked language modelling (BERT), dynamic masking (RoBERTa) and TLM (XLM).

The BERT rule (Devlin et al. 2019, section 3.1 and appendix A.1): choose 15% of the token
positions at random; of the chosen, 80% become [MASK], 10% a random token and 10% stay as
they are; predict the original token at the chosen positions only. Special tokens ([CLS],
[SEP], [MASK], ...) and padding are never chosen. Rates are configurable (XLM and LaBSE use
other values).

RoBERTa (Liu et al. 2019, section 4.1) compares *static* masking (the mask is computed once in
preprocessing, BERT duplicated the data 10 times with 10 masks) with *dynamic* masking (a new
mask every time a sequence is fed to the model): `MaskedLMData(dynamic=True/False)`.

XLM's TLM (Lample & Conneau 2019, section 3.3): MLM over a parallel sentence pair concatenated
into one stream, with language embeddings as the token types and the position ids of the second
sentence restarting at 0: `build_tlm_batch`, then any masker.

A batch is a dict of (B, T) tensors: input_ids (already masked), labels (original id at the
chosen positions, -100 elsewhere), and optionally attention_mask, token_type_ids, position_ids.
`mlm_loss(model, batch)` plugs into the Trainer like `causal_lm_loss`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import AllformersError
from .causal_lm import IGNORE_INDEX


class ObjectiveError(AllformersError, ValueError):
    """An objective got inputs it cannot use (wrong shapes, missing keys, bad rates)."""


# ---------------------------------------------------------------------- random helpers
def check_generator(generator: Optional[torch.Generator], device: torch.device):
    if generator is not None and torch.device(generator.device).type != torch.device(device).type:
        raise ObjectiveError(
            f"the torch.Generator lives on {generator.device} but the tensors are on {device}; "
            f"create it with torch.Generator(device={str(device)!r}) or pass generator=None (torch's global RNG)")


def _rand(shape, generator, device) -> torch.Tensor:
    check_generator(generator, device)
    return torch.rand(shape, generator=generator, device=device)


def _randint(high: int, shape, generator, device) -> torch.Tensor:
    check_generator(generator, device)
    return torch.randint(high, shape, generator=generator, device=device)


def special_token_ids(tokenizer) -> list[int]:
    """Every special token id of an allformers Tokenizer: the backend's added tokens marked
    special, plus bos / eos / pad."""
    ids = set()
    backend = getattr(tokenizer, "backend", None)
    if backend is not None and hasattr(backend, "get_added_tokens_decoder"):
        ids |= {i for i, tok in backend.get_added_tokens_decoder().items() if tok.special}
    for name in ("bos_id", "eos_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            ids.add(int(value))
    pad = tokenizer.token_id(tokenizer.pad_token) if getattr(tokenizer, "pad_token", None) else None
    if pad is not None:
        ids.add(int(pad))
    return sorted(ids)


# ---------------------------------------------------------------------- the masking rule
@dataclass
class MLMMasker:
    """BERT's masking rule with configurable rates.

    mask_id: the [MASK] id. vocab_size: random replacements are drawn uniformly from
    range(vocab_size) minus the special ids. special_ids: never selected (the mask and pad ids
    are added to them). pad_id: optional, padding is also recognised by attention_mask == 0.
    mlm_probability: share of eligible tokens selected (BERT/RoBERTa 0.15).
    mask_prob / random_prob: of the selected, share replaced by [MASK] / by a random token; the
    rest (1 - mask_prob - random_prob) stay unchanged (BERT: 0.8 / 0.1, so 0.1 unchanged).
    exact: select exactly max(1, round(n * mlm_probability)) of the n eligible tokens of each row
    (capped by max_predictions), as BERT's create_pretraining_data.py does; otherwise each
    eligible token is selected independently with probability mlm_probability (Hugging Face's
    DataCollatorForLanguageModeling, the usual dynamic-masking rule)."""

    mask_id: int
    vocab_size: int
    special_ids: Sequence[int] = ()
    pad_id: Optional[int] = None
    mlm_probability: float = 0.15
    mask_prob: float = 0.8
    random_prob: float = 0.1
    exact: bool = False
    max_predictions: Optional[int] = None

    def __post_init__(self):
        if not 0.0 < self.mlm_probability <= 1.0:
            raise ObjectiveError(f"mlm_probability={self.mlm_probability} must be in (0, 1]")
        if self.mask_prob < 0 or self.random_prob < 0 or self.mask_prob + self.random_prob > 1.0 + 1e-9:
            raise ObjectiveError(f"mask_prob={self.mask_prob} and random_prob={self.random_prob} must be >= 0 "
                                 f"and sum to at most 1 (the rest of the selected tokens stay unchanged)")
        if not 0 <= self.mask_id < self.vocab_size:
            raise ObjectiveError(f"mask_id={self.mask_id} is outside the vocabulary (vocab_size={self.vocab_size})")
        if self.max_predictions is not None and not self.exact:
            raise ObjectiveError("max_predictions caps the per-row count of exact=True selection; "
                                 "set exact=True or drop max_predictions")
        specials = {int(i) for i in self.special_ids} | {int(self.mask_id)}
        if self.pad_id is not None:
            specials.add(int(self.pad_id))
        self.special_ids = tuple(sorted(specials))
        keep = torch.ones(self.vocab_size, dtype=torch.bool)
        keep[[i for i in self.special_ids if 0 <= i < self.vocab_size]] = False
        self._random_pool = keep.nonzero().squeeze(1)  # (V - n_special,) ids a random replacement may take
        if self.random_prob > 0 and len(self._random_pool) == 0:
            raise ObjectiveError("every vocabulary id is special: no token can serve as a random replacement")

    @classmethod
    def from_tokenizer(cls, tokenizer, mask_token: str = "[MASK]", vocab_size: Optional[int] = None,
                       **rates) -> "MLMMasker":
        """Mask id, special ids and pad id read from an allformers Tokenizer (e.g. BERT's)."""
        mask_id = tokenizer.token_id(mask_token)
        if mask_id is None:
            raise ObjectiveError(f"the tokenizer has no {mask_token!r} token; pass mask_token= with the "
                                 f"tokenizer's mask token (RoBERTa: '<mask>') or build MLMMasker(mask_id=...)")
        pad = tokenizer.token_id(tokenizer.pad_token) if tokenizer.pad_token else tokenizer.token_id("[PAD]")
        return cls(mask_id=mask_id, vocab_size=vocab_size or tokenizer.vocab_size,
                   special_ids=special_token_ids(tokenizer), pad_id=pad, **rates)

    # ------------------------------------------------------------------ the three steps
    def eligible(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, T) bool: real, non-special tokens (the only ones that may be selected)."""
        specials = torch.tensor(self.special_ids, dtype=input_ids.dtype, device=input_ids.device)
        ok = ~torch.isin(input_ids, specials)
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ObjectiveError(f"attention_mask {tuple(attention_mask.shape)} does not match "
                                     f"input_ids {tuple(input_ids.shape)}")
            ok &= attention_mask.bool()
        return ok

    def select(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(B, T) bool: the positions to predict."""
        ok = self.eligible(input_ids, attention_mask)
        scores = _rand(input_ids.shape, generator, input_ids.device)  # (B, T) uniform [0, 1)
        if not self.exact:
            return ok & (scores < self.mlm_probability)
        n = ok.sum(-1)  # (B,) eligible per row
        k = torch.round(n.double() * self.mlm_probability).long().clamp(min=1)
        if self.max_predictions is not None:
            k = k.clamp(max=self.max_predictions)
        k = torch.minimum(k, n)
        rank = scores.masked_fill(~ok, 2.0).argsort(-1).argsort(-1)  # (B, T) rank among the row's tokens
        return ok & (rank < k[:, None])

    def __call__(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids (B, T) -> (masked input_ids (B, T), labels (B, T): original id where selected, -100 elsewhere).
        The input is not modified. With a generator the result depends only on its state."""
        if input_ids.dim() != 2:
            raise ObjectiveError(f"input_ids must be (batch, time), got shape {tuple(input_ids.shape)}")
        input_ids = input_ids.long()
        selected = self.select(input_ids, attention_mask, generator)  # (B, T)
        kind = _rand(input_ids.shape, generator, input_ids.device)  # (B, T): which of the 80/10/10
        pool = self._random_pool.to(input_ids.device)
        random_ids = pool[_randint(len(pool), input_ids.shape, generator, input_ids.device)]  # (B, T)
        to_mask = selected & (kind < self.mask_prob)
        to_random = selected & (kind >= self.mask_prob) & (kind < self.mask_prob + self.random_prob)
        masked = input_ids.masked_fill(to_mask, self.mask_id)
        masked = torch.where(to_random, random_ids, masked)
        labels = input_ids.masked_fill(~selected, IGNORE_INDEX)
        return masked, labels

    def apply(self, batch: dict, generator: Optional[torch.Generator] = None) -> dict:
        """A batch dict with unmasked input_ids -> a new dict with masked input_ids and labels
        (every other entry is kept: attention_mask, token_type_ids, position_ids, NSP labels, ...)."""
        if "input_ids" not in batch:
            raise ObjectiveError(f"the batch has no 'input_ids' (keys: {sorted(batch)})")
        masked, labels = self(batch["input_ids"], batch.get("attention_mask"), generator)
        return {**batch, "input_ids": masked, "labels": labels}


def mask_tokens(input_ids: torch.Tensor, *, mask_id: int, vocab_size: int, special_ids: Sequence[int] = (),
                attention_mask: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                **rates) -> tuple[torch.Tensor, torch.Tensor]:
    """Functional form of MLMMasker: (masked input_ids, labels), each (B, T)."""
    return MLMMasker(mask_id=mask_id, vocab_size=vocab_size, special_ids=special_ids, **rates)(
        input_ids, attention_mask, generator)


# ---------------------------------------------------------------------- the loss
def model_inputs(batch: dict) -> dict:
    """The keyword arguments a TransformerLM / TaskModel forward takes, from a batch dict."""
    return {k: batch[k] for k in ("attention_mask", "token_type_ids", "position_ids") if batch.get(k) is not None}


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (B, T, V), labels (B, T) with -100 at positions not to predict -> mean cross-entropy
    over the predicted positions. A batch with none gives 0 (still attached to the graph), not NaN."""
    if logits.shape[:-1] != labels.shape:
        raise ObjectiveError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not line up")
    sel = labels != IGNORE_INDEX  # (B, T)
    if not bool(sel.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[sel].float(), labels[sel])  # (N, V) vs (N,)


def _unpack(batch) -> tuple[torch.Tensor, torch.Tensor, dict]:
    if isinstance(batch, dict):
        if "input_ids" not in batch or "labels" not in batch:
            raise ObjectiveError(f"an MLM batch needs 'input_ids' and 'labels' (keys: {sorted(batch)}); "
                                 f"mask it with MLMMasker.apply or MaskedLMData")
        return batch["input_ids"], batch["labels"], model_inputs(batch)
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1], {}
    raise ObjectiveError("an MLM batch is a dict (input_ids, labels, ...) or a pair (input_ids, labels)")


def mlm_loss(model, batch) -> torch.Tensor:
    """Cross-entropy on the selected positions only (labels != -100). model(input_ids, ...) must
    return logits (B, T, V): an encoder TransformerLM with its MLM head."""
    ids, labels, kwargs = _unpack(batch)
    logits = model(ids, **kwargs)  # (B, T, V)
    return masked_cross_entropy(logits, labels)


class MaskedLM:
    """The MLM objective object for the Trainer. num_tokens counts real (non-padding) tokens."""

    name = "mlm"

    def __call__(self, model, batch) -> torch.Tensor:
        return mlm_loss(model, batch)

    @staticmethod
    def num_tokens(batch) -> int:
        if isinstance(batch, dict) and batch.get("attention_mask") is not None:
            return int(batch["attention_mask"].sum())
        return (batch["input_ids"] if isinstance(batch, dict) else batch[0]).numel()


# ---------------------------------------------------------------------- dynamic vs static masking
class MLMCollator:
    """Dynamic masking as a collator: every call draws a new mask from its own generator.
    collator(batch dict or list of example dicts with equal-length tensors) -> masked batch dict."""

    def __init__(self, masker: MLMMasker, seed: int = 0):
        self.masker = masker
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, batch) -> dict:
        if isinstance(batch, (list, tuple)):
            batch = {k: torch.stack([torch.as_tensor(ex[k]) for ex in batch]) for k in batch[0]}
        return self.masker.apply(batch, self.generator)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class MaskedLMData:
    """Rows of a tokenized corpus, masked on the way out; a Trainer data source (`sample(n)`).

    data: a dict of (N, ...) tensors with "input_ids" (N, T) (plus attention_mask, token_type_ids,
    position_ids, sentence labels: all kept), or an (N, T) tensor of ids.
    dynamic=True (RoBERTa): a fresh mask every time a row is drawn.
    dynamic=False (BERT's static masking): `dupe_factor` masks per row are computed once here,
    and the j-th time a row is seen it gets mask j % dupe_factor (dupe_factor=1: always the same).
    The generator is the sampler's own, and goes into checkpoints via state_dict."""

    def __init__(self, data, masker: MLMMasker, *, dynamic: bool = True, dupe_factor: int = 1, seed: int = 0):
        data = {"input_ids": data} if isinstance(data, torch.Tensor) else dict(data)
        if "input_ids" not in data or data["input_ids"].dim() != 2:
            raise ObjectiveError("MaskedLMData needs an (N, T) 'input_ids' tensor")
        n = data["input_ids"].shape[0]
        for k, v in data.items():
            if not isinstance(v, torch.Tensor) or v.shape[0] != n:
                raise ObjectiveError(f"data[{k!r}] must be a tensor with {n} rows like input_ids")
        if dupe_factor < 1:
            raise ObjectiveError(f"dupe_factor={dupe_factor} must be >= 1")
        self.data, self.masker, self.dynamic = data, masker, dynamic
        self.generator = torch.Generator().manual_seed(seed)
        self.seen = torch.zeros(n, dtype=torch.long)  # times each row was handed out
        self._static = None
        if not dynamic:  # computed once, as in preprocessing
            g = torch.Generator().manual_seed(seed + 1)
            copies = [masker(data["input_ids"], data.get("attention_mask"), g) for _ in range(dupe_factor)]
            self._static = (torch.stack([c[0] for c in copies]), torch.stack([c[1] for c in copies]))  # (k, N, T) x2

    def __len__(self):
        return self.data["input_ids"].shape[0]

    def take(self, rows: torch.Tensor) -> dict:
        """The masked batch for these row indices (B,); counts them as seen."""
        rows = rows.long()
        batch = {k: v[rows] for k, v in self.data.items()}
        if self.dynamic:
            out = self.masker.apply(batch, self.generator)
        else:
            ids, labels = self._static
            copy = self.seen[rows] % ids.shape[0]  # (B,)
            out = {**batch, "input_ids": ids[copy, rows], "labels": labels[copy, rows]}
        self.seen.index_add_(0, rows, torch.ones_like(rows))
        return out

    def sample(self, n: int) -> dict:
        """n random rows (with replacement), masked."""
        return self.take(torch.randint(len(self), (n,), generator=self.generator))

    def epoch(self, batch_size: int, shuffle: bool = True) -> Iterator[dict]:
        """One pass over every row, in batches."""
        order = torch.randperm(len(self), generator=self.generator) if shuffle else torch.arange(len(self))
        for i in range(0, len(self), batch_size):
            yield self.take(order[i:i + batch_size])

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "seen": self.seen.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.seen.copy_(state["seen"])


# ---------------------------------------------------------------------- TLM (XLM)
def build_tlm_batch(sources: Iterable[Sequence[int]], targets: Iterable[Sequence[int]],
                    src_lang, tgt_lang, *, eos_id: int, pad_id: int, max_length: int = 256) -> dict:
    """Parallel sentences -> one TLM stream per pair, laid out as XLM's concat_batches does with
    reset_positions=True: `</s> src </s> </s> tgt </s>` (each sentence framed by </s>), language
    ids as token types (src_lang over the first sentence, tgt_lang over the second), and position
    ids that restart at 0 at the second sentence. Each sentence is cut to max_length // 2 - 2 tokens.

    src_lang / tgt_lang: one id, or one per pair. Returns input_ids, token_type_ids (language
    ids), position_ids, attention_mask, each (N, T); mask it with MLMMasker.apply (eos, pad and
    mask ids must be among its special ids)."""
    sources, targets = list(sources), list(targets)
    if len(sources) != len(targets) or not sources:
        raise ObjectiveError(f"need as many source as target sentences (>0), got {len(sources)} and {len(targets)}")
    if max_length < 6:
        raise ObjectiveError(f"max_length={max_length} leaves no room for two framed sentences")
    n = len(sources)
    src_langs = list(src_lang) if isinstance(src_lang, (list, tuple, torch.Tensor)) else [src_lang] * n
    tgt_langs = list(tgt_lang) if isinstance(tgt_lang, (list, tuple, torch.Tensor)) else [tgt_lang] * n
    keep = max_length // 2 - 2
    rows = []
    for s, t, ls, lt in zip(sources, targets, src_langs, tgt_langs):
        a = [eos_id] + [int(x) for x in s][:keep] + [eos_id]
        b = [eos_id] + [int(x) for x in t][:keep] + [eos_id]
        rows.append((a + b, [int(ls)] * len(a) + [int(lt)] * len(b), list(range(len(a))) + list(range(len(b)))))
    T = max(len(r[0]) for r in rows)
    out = {"input_ids": torch.full((n, T), pad_id, dtype=torch.long),
           "token_type_ids": torch.zeros((n, T), dtype=torch.long),
           "position_ids": torch.zeros((n, T), dtype=torch.long),
           "attention_mask": torch.zeros((n, T), dtype=torch.long)}
    for i, (ids, langs, pos) in enumerate(rows):
        m = len(ids)
        out["input_ids"][i, :m] = torch.tensor(ids)
        out["token_type_ids"][i, :m] = torch.tensor(langs)
        out["position_ids"][i, :m] = torch.tensor(pos)
        out["attention_mask"][i, :m] = 1
    return out
