"""Encoder-decoder generation: the encoder runs once, the decoder keeps a self-attention KV
cache, and cross-attention keys/values are projected at the first step and reused.

Beam search follows the semantics of `transformers` 5 (2K candidates a step, finished
hypotheses scored by sum log-prob / length ** length_penalty, the same early-stopping
heuristic) so that its outputs can be compared token for token."""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import AllformersError, ContextLengthError, InputError
from .checks import check_generation, check_token_ids
from .generate import decode_loop, eos_tensor


def banned_ngram_tokens(seqs: torch.Tensor, n: int) -> list:
    """For each row of seqs (N, L), the tokens that would repeat an n-gram already present."""
    banned = []
    for row in seqs.tolist():
        if len(row) + 1 < n:
            banned.append([])
            continue
        prefix = tuple(row[len(row) - n + 1:])
        banned.append([row[i + n - 1] for i in range(len(row) - n + 1) if tuple(row[i:i + n - 1]) == prefix])
    return banned


def _block_ngrams(log_probs: torch.Tensor, seqs: torch.Tensor, n: int) -> torch.Tensor:
    for r, tokens in enumerate(banned_ngram_tokens(seqs, n)):
        if tokens:
            log_probs[r, tokens] = float("-inf")
    return log_probs


@torch.inference_mode()
def generate_seq2seq(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                     max_new_tokens: int = 64, num_beams: int = 1, length_penalty: float = 1.0,
                     early_stopping=False, no_repeat_ngram_size: int = 0, temperature: float = 0.0,
                     top_k: Optional[int] = None, top_p: Optional[float] = None, repetition_penalty: float = 1.0,
                     eos_id=None, pad_id: Optional[int] = None, decoder_start_token_id: Optional[int] = None,
                     generator: Optional[torch.Generator] = None, on_token=None,
                     encoder_out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Source ids (B, S) -> decoder sequences (B, 1 + n), starting with the decoder start token.
    encoder_out (B, S, C): states to decode from instead of model.encode(input_ids) (e.g. the encoder
    output after fusing image features into it); input_ids then only give the batch and length."""
    check_generation(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                     repetition_penalty=repetition_penalty, num_beams=num_beams, length_penalty=length_penalty,
                     no_repeat_ngram_size=no_repeat_ngram_size)
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 1:
        input_ids = input_ids[None]
    if encoder_out is None:
        check_token_ids(input_ids, model.config.vocab_size, "input_ids")
    if num_beams > 1 and temperature:
        raise AllformersError("beam search here is deterministic; use temperature=0 with num_beams > 1")
    limit = model.config.block_size
    if input_ids.shape[1] > limit:
        raise ContextLengthError(f"the source has {input_ids.shape[1]} tokens, more than the model's {limit}; "
                                 f"truncate it (tokenizer max_length={limit})")
    if max_new_tokens + 1 > limit:
        raise ContextLengthError(f"max_new_tokens={max_new_tokens} does not fit the decoder's {limit} positions")
    device = model.device
    input_ids = input_ids.to(device)
    attention_mask = attention_mask.to(device) if attention_mask is not None else None
    start = model.config.decoder_start_token_id if decoder_start_token_id is None else decoder_start_token_id
    eos = eos_tensor(eos_id)
    B = input_ids.shape[0]
    enc = model.encode(input_ids, attention_mask) if encoder_out is None else encoder_out.to(device)  # (B, S, C), once
    if num_beams == 1:
        cache = model.new_cache(B, max_new_tokens + 1)
        out = torch.full((B, 1), start, dtype=torch.long, device=device)

        def step(nxt):
            return model(None, nxt[:, None], attention_mask=attention_mask, encoder_out=enc, cache=cache, last_only=True)[:, -1]

        pad = pad_id if pad_id is not None else (int(eos[0]) if len(eos) else 0)
        if no_repeat_ngram_size:
            raise AllformersError("no_repeat_ngram_size is implemented for beam search (num_beams > 1)")
        return decode_loop(step, step(out[:, 0]), out, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, eos=eos, pad_id=pad,
                           on_token=on_token, generator=generator)
    return _beam_search(model, enc, attention_mask, start=start, eos=eos.to(device), pad_id=pad_id, K=num_beams,
                        max_length=max_new_tokens + 1, length_penalty=length_penalty, early_stopping=early_stopping,
                        no_repeat_ngram_size=no_repeat_ngram_size)


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t (B, N, ...) rows idx (B, M) -> (B, M, ...)."""
    return t.gather(1, idx.view(*idx.shape, *([1] * (t.dim() - 2))).expand(*idx.shape, *t.shape[2:]))


def _beam_search(model, enc, attention_mask, *, start, eos, pad_id, K, max_length, length_penalty,
                 early_stopping, no_repeat_ngram_size):
    B, S, C = enc.shape
    device = enc.device
    n_keep = max(2, 1 + len(eos)) * K  # enough candidates that K stay open after some finish
    top_mask = torch.arange(n_keep, device=device) < K
    fill = pad_id if pad_id else (int(eos[0]) if len(eos) else -1)
    enc = enc.repeat_interleave(K, dim=0)  # (B*K, S, C)
    mask = attention_mask.repeat_interleave(K, dim=0) if attention_mask is not None else None
    cache = model.new_cache(B * K, max_length)

    running = torch.full((B, K, max_length), fill, dtype=torch.long, device=device)
    running[:, :, 0] = start
    run_scores = torch.zeros(B, K, device=device)
    run_scores[:, 1:] = -1e9  # all beams start identical: keep one
    seqs, scores = running.clone(), torch.full((B, K), -1e9, device=device)
    lengths = torch.zeros(B, K, dtype=torch.long, device=device)  # generated tokens of finished hypotheses
    finished = torch.zeros(B, K, dtype=torch.bool, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
    cur = 1
    while True:
        last = running[:, :, cur - 1].reshape(B * K, 1)
        logits = model(None, last, attention_mask=mask, encoder_out=enc, cache=cache, last_only=True)[:, -1]
        log_probs = logits.float().log_softmax(-1)  # (B*K, V)
        if no_repeat_ngram_size:
            log_probs = _block_ngrams(log_probs, running[:, :, :cur].reshape(B * K, cur), no_repeat_ngram_size)
        V = log_probs.shape[-1]
        acc = (log_probs.view(B, K, V) + run_scores[:, :, None]).view(B, K * V)
        top_lp, top_idx = acc.topk(n_keep, dim=1)  # (B, 2K)
        beam, tok = top_idx // V, top_idx % V
        cand = _gather(running, beam)
        cand[:, :, cur] = tok
        hits = torch.isin(tok, eos) | (cur + 1 >= max_length)

        # the best K candidates that did not finish keep running
        open_lp = top_lp + hits.float() * -1e9
        keep = open_lp.topk(K, dim=1).indices
        running, run_scores = _gather(cand, keep), _gather(open_lp, keep)
        parent = _gather(beam, keep) + torch.arange(B, device=device)[:, None] * K
        cache.reorder(parent.view(-1))

        # the finished ones compete with earlier finished hypotheses
        gen_len = cur + 1 - 1  # tokens generated so far, the start token excluded
        fin = top_lp / (gen_len ** length_penalty)
        fin = fin + ((finished.all(-1, keepdim=True) & (early_stopping is True)).float() * -1e9)
        fin = fin + (~improvable).float() * -1e9 + (~(hits & top_mask)).float() * -1e9
        merged = torch.cat([scores, fin], dim=1)
        best = merged.topk(K, dim=1).indices
        seqs = _gather(torch.cat([seqs, cand], dim=1), best)
        scores = _gather(merged, best)
        lengths = _gather(torch.cat([lengths, torch.full_like(fin, gen_len, dtype=torch.long)], dim=1), best)
        finished = _gather(torch.cat([finished, hits & top_mask], dim=1), best)

        cur += 1
        best_len = (max_length - 1) if (early_stopping == "never" and length_penalty > 0) else (cur - 1)
        best_running = run_scores[:, :1] / (best_len ** length_penalty)
        worst_done = torch.where(finished, scores.min(dim=1, keepdim=True).values, torch.full_like(scores, -1e9))
        improvable = improvable & (best_running > worst_done).any(-1, keepdim=True)
        if not (bool(improvable.any()) and not (bool(finished.all()) and early_stopping is True)
                and not bool(hits.all())):
            break
    best_seq = seqs[:, 0]
    return best_seq[:, : 1 + int(lengths[:, 0].max())]


def seq2seq_text(model, tokenizer, prompts, *, stream=None, max_length: Optional[int] = None, **kwargs):
    """Text in, text out for an encoder-decoder: the source is tokenized with the tokenizer's own
    special tokens (T5 appends </s>), right-padded, and the decoder output is decoded."""
    from .generate import TextStream

    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise InputError(f"max_length={max_length!r} must be a whole number >= 1 (source tokens kept; None = the "
                         f"model's block_size)")
    single = isinstance(prompts, str)
    batch = tokenizer.batch([prompts] if single else list(prompts), max_length=max_length or model.config.block_size)
    kwargs.setdefault("eos_id", tokenizer.eos_id)
    if kwargs.pop("stop", None):
        raise AllformersError("stop strings are not supported for encoder-decoders; use eos or max_new_tokens")
    on_token = TextStream(tokenizer, stream) if stream else None
    out = generate_seq2seq(model, batch["input_ids"], batch["attention_mask"], on_token=on_token, **kwargs)
    texts = [tokenizer.decode(row[1:].tolist()) for row in out]
    return texts[0] if single else texts
