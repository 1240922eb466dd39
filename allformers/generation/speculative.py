"""Speculative decoding: a cheap drafter proposes k tokens, the target checks them all in one pass.

Batch-1 decoding reads every weight once per token, so a target pass over k + 1 positions costs
about what a pass over one does; each round emits 1 to k + 1 tokens for one such pass.
Greedy: a draft token is kept while it equals the target's argmax at its place; the first
mismatch is replaced by the target's own choice, and when all k match, the target's next token
comes free. The output is plain greedy decoding's (up to float rounding between a k + 1 position
pass and one-position passes, which can only matter at an exact tie).
Sampling (Leviathan et al. 2023, Chen et al. 2023): a draft token d drawn from q is kept with
probability min(1, p(d) / q(d)); at the first rejection the token is drawn from max(0, p - q),
renormalised. Every emitted token is then distributed as the target's p, whatever the drafter does.
A deterministic drafter (prompt lookup) is the case q = one-hot(d).

The target's cache holds every token but the last emitted one; a round feeds [last, d_1 .. d_k]
and rewinds the cache past the rejected drafts (`Cache.rewind`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from ..errors import AllformersError, ContextLengthError, InputError
from .checks import _whole, check_generation, check_token_ids
from .sampling import eos_tensor, process_logits


@dataclass
class Sampling:
    """The settings that turn logits into a distribution; shared by target and draft."""
    temperature: float
    top_k: Optional[int]
    top_p: Optional[float]
    repetition_penalty: float

    def logits(self, logits: torch.Tensor, seen: Sequence[Sequence[int]]) -> torch.Tensor:
        """logits (N, V), row i having seen tokens seen[i] -> processed logits (N, V)."""
        kw = dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                  repetition_penalty=self.repetition_penalty)
        logits = logits.float()
        if self.repetition_penalty == 1.0:  # `seen` is unused: all rows in one call
            return process_logits(logits, torch.zeros(len(logits), 1, dtype=torch.long), **kw)
        return torch.cat([process_logits(logits[i:i + 1], torch.tensor([list(s)], device=logits.device), **kw)
                          for i, s in enumerate(seen)])


def _draw(probs: torch.Tensor, generator) -> int:
    """One index from probs (V,); on the CPU when the generator is (seeds give one stream anywhere)."""
    if generator is not None and generator.device != probs.device:
        probs = probs.cpu()
    return int(torch.multinomial(probs, 1, generator=generator))


def _uniform(generator, device) -> float:
    dev = generator.device if generator is not None else device
    return float(torch.rand((), generator=generator, device=dev))


class NgramDraft:
    """Prompt lookup (Saxena 2023): find the last `n` tokens earlier in the context, longest n
    first, and propose what followed them there. No model; pays where the output copies the
    input (summaries, edits, quoting, code). Deterministic: q is one-hot."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        _whole("max_ngram", max_ngram, 1)
        _whole("min_ngram", min_ngram, 1)
        if min_ngram > max_ngram:
            raise InputError(f"min_ngram={min_ngram} > max_ngram={max_ngram}; pass min_ngram <= max_ngram")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def start(self, target, max_len: int):
        pass

    def propose(self, tokens: list, k: int, sampling: Sampling, generator):
        t = torch.tensor(tokens)
        L = len(tokens)
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if L <= n:
                continue
            windows = t[:-1].unfold(0, n, 1)  # (L - n, n): every earlier n-gram that has a follower
            hits = (windows == t[-n:]).all(1).nonzero()[:, 0]
            if len(hits) == 0:
                continue
            full = hits[hits + n + k <= L]  # the latest match with k followers, else the longest run
            i = int(full[-1]) if len(full) else int(hits[0])
            return tokens[i + n:i + n + k], None
        return [], None


class ModelDraft:
    """A smaller decoder with the target's vocabulary, decoding k tokens ahead on its own cache."""

    def __init__(self, model):
        self.model, self.cache, self.tokens = model, None, []

    def start(self, target, max_len: int):
        c, t = self.model.config, target.config
        if getattr(c, "is_encoder_decoder", False) or not getattr(c, "lm_head", False):
            raise InputError("the draft must be a decoder-only LM (a TransformerLM with an LM head)")
        if c.vocab_size != t.vocab_size:
            raise InputError(f"the draft's vocabulary ({c.vocab_size} tokens) is not the target's ({t.vocab_size}); "
                             f"draft with a model of the same tokenizer, or draft='ngram'")
        if max_len > c.block_size:
            raise ContextLengthError(f"the draft's context is {c.block_size} tokens, the generation needs {max_len}; "
                                     f"shorten the prompt or max_new_tokens, or use a draft with a longer context")
        check_rewindable(self.model, max_len, "draft")
        self.cache, self.tokens = self.model.new_cache(1, max_len), []

    @torch.inference_mode()
    def propose(self, tokens: list, k: int, sampling: Sampling, generator):
        # keep what the cache shares with the accepted tokens, feed the rest (at least the last token)
        n = 0
        while n < min(len(self.tokens), len(tokens) - 1) and self.tokens[n] == tokens[n]:
            n += 1
        self.cache.rewind(n)
        dev = self.model.device
        logits = self.model(torch.tensor([tokens[n:]], device=dev), cache=self.cache, last_only=True)[:, -1]
        self.tokens = list(tokens)
        drafts, qs = [], []
        for j in range(k):
            logits = sampling.logits(logits, [tokens + drafts])
            if sampling.temperature:
                q = logits.softmax(-1)[0]
                d = _draw(q, generator)
                qs.append(q)
            else:
                d = int(logits.argmax(-1))
            drafts.append(d)
            if j < k - 1:
                logits = self.model(torch.tensor([[d]], device=dev), cache=self.cache, last_only=True)[:, -1]
                self.tokens.append(d)
        return drafts, (torch.stack(qs) if qs else None)


def check_rewindable(model, max_len: int, role: str = "target"):
    """Refuse a model whose cache cannot drop rejected drafts, or whose k + 1 position pass is not k + 1 steps."""
    c = model.config
    if getattr(c, "is_encoder_decoder", False) or not hasattr(model, "new_cache"):
        raise InputError(f"speculative decoding runs decoder-only models with a KV cache; the {role} is not one")
    if not getattr(model.new_cache(1, max_len), "rewindable", False):
        raise InputError(f"the {role} has local attention layers whose window cache cannot be rewound; "
                         f"decode it without speculation (generate() without draft=)")
    if c.n_expert and c.moe_eval_capacity_factor is not None:
        # a capacity limit routes a token differently when k + 1 of them come at once
        raise InputError(f"the {role}'s experts have an eval capacity limit (moe_eval_capacity_factor), so a pass "
                         f"over several tokens is not several one-token passes; set it to None to speculate")


def make_drafter(draft):
    """'ngram' (prompt lookup), a TransformerLM draft model, or any object with start() and propose()."""
    if isinstance(draft, str):
        if draft in ("ngram", "prompt-lookup"):
            return NgramDraft()
        raise InputError(f"draft={draft!r}: pass 'ngram' (prompt lookup), a draft model, or load the model at "
                         f"that path first (allformers.load(path))")
    if hasattr(draft, "propose") and hasattr(draft, "start"):
        return draft
    if isinstance(draft, torch.nn.Module) and hasattr(draft, "config"):
        return ModelDraft(draft)
    raise InputError(f"draft={type(draft).__name__}: pass 'ngram', a TransformerLM, NgramDraft() or ModelDraft(model)")


@torch.inference_mode()
def speculative_generate(model, input_ids: torch.Tensor, draft, *, draft_tokens: int = 4,
                         attention_mask: Optional[torch.Tensor] = None, max_new_tokens: int = 64,
                         temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                         repetition_penalty: float = 1.0, eos_id: Optional[Union[int, Sequence[int]]] = None,
                         pad_id: Optional[int] = None, stop: Optional[Sequence[str]] = None, tokenizer=None,
                         on_token: Optional[Callable[[int], None]] = None, generator: Optional[torch.Generator] = None,
                         stats: Optional[dict] = None) -> torch.Tensor:
    """input_ids (1, T) -> (1, T + n), n <= max_new_tokens: `generate`'s output, drafted `draft_tokens`
    at a time. `stats` (a dict) receives rounds, target passes, proposed and accepted draft tokens."""
    stop = check_generation(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=repetition_penalty, stop=stop)
    _whole("draft_tokens", draft_tokens, 1, " (tokens proposed per target pass)")
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 1:
        input_ids = input_ids[None]
    check_token_ids(input_ids, model.config.vocab_size, "input_ids")
    if input_ids.shape[0] != 1:
        raise InputError(f"speculative decoding runs one sequence at a time (batch 1), got a batch of "
                         f"{input_ids.shape[0]}; call it once per prompt, or batch with generate() without draft=")
    if stop and tokenizer is None:
        raise AllformersError("stop strings need the tokenizer: pass tokenizer=...")
    given = input_ids
    if attention_mask is not None:  # one row: its padding is dropped here and put back in the output
        input_ids = input_ids[:, attention_mask[0].bool().to(input_ids.device)]
    T = input_ids.shape[1]
    check_rewindable(model, T + max_new_tokens)
    limit = model.config.block_size
    if T + max_new_tokens > limit:
        raise ContextLengthError(
            f"the prompt has {T} tokens and max_new_tokens={max_new_tokens}: {T + max_new_tokens} > the model's "
            f"context of {limit}; shorten the prompt or lower max_new_tokens to {max(limit - T, 0)}")
    drafter = make_drafter(draft)
    drafter.start(model, T + max_new_tokens)
    eos = set(eos_tensor(eos_id).tolist())
    sampling = Sampling(temperature, top_k, top_p, repetition_penalty)
    dev = model.device
    out = input_ids[0].tolist()
    st = dict(rounds=0, target_passes=1, proposed=0, accepted=0)

    def emit(tok: int) -> bool:  # True when generation is over
        out.append(tok)
        if on_token is not None:
            on_token(tok)
        if tok in eos or len(out) - T >= max_new_tokens:
            return True
        return bool(stop) and any(s in tokenizer.decode(out[T:]) for s in stop)

    def pick(p_logits: torch.Tensor) -> int:  # (V,) processed logits -> a token, as generate() picks
        return _draw(p_logits.softmax(-1), generator) if temperature else int(p_logits.argmax(-1))

    done = max_new_tokens == 0
    if not done:
        cache = model.new_cache(1, T + max_new_tokens)
        logits = model(input_ids.to(dev), cache=cache, last_only=True)[:, -1]  # (1, V)
        done = emit(pick(sampling.logits(logits, [out])[0]))
    while not done:
        k = min(draft_tokens, max_new_tokens - (len(out) - T) - 1)  # more could never be emitted
        drafts, q = drafter.propose(list(out), k, sampling, generator) if k > 0 else ([], None)
        drafts = list(drafts)[:k]
        base = len(out) - 1  # the cache holds out[:-1]
        logits = model(torch.tensor([[out[-1]] + drafts], device=dev), cache=cache)[0]  # (1 + n, V)
        p_logits = sampling.logits(logits, [out + drafts[:i] for i in range(len(drafts) + 1)])
        new = []
        for i, d in enumerate(drafts):
            if not temperature:
                keep = int(p_logits[i].argmax()) == d
            else:
                p = p_logits[i].softmax(-1)
                q_d = float(q[i, d]) if q is not None else 1.0
                keep = _uniform(generator, dev) < min(1.0, float(p[d]) / q_d)
            if not keep:
                break
            new.append(d)
        n_ok = len(new)
        if n_ok < len(drafts) and temperature:  # the rejected place: draw from max(0, p - q)
            p = p_logits[n_ok].softmax(-1)
            if q is not None:
                resid = (p - q[n_ok].to(p.device)).clamp(min=0)
            else:
                resid = p.clone()
                resid[drafts[n_ok]] = 0
            new.append(_draw(resid / resid.sum() if float(resid.sum()) > 0 else p, generator))
        else:  # greedy (first mismatch or all kept), or every draft kept: the target's own next token
            new.append(pick(p_logits[n_ok]))
        cache.rewind(base + 1 + n_ok)  # keep out[-1] and the accepted drafts
        st["rounds"] += 1
        st["target_passes"] += 1
        st["proposed"] += len(drafts)
        st["accepted"] += n_ok
        for tok in new:
            done = emit(tok)
            if done:
                break
    if stats is not None:
        stats.update(st)
    return torch.cat([given.to(dev), torch.tensor([out[T:]], dtype=torch.long, device=dev)], 1)  # (1, T + n)
