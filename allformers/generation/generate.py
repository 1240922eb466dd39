"""Autoregressive generation with a pre-allocated KV cache.

The prompt runs once (prefill); each new token then costs one forward pass over a single
position. Sampling follows Hugging Face's processor order (repetition penalty, temperature,
top-k, top-p) so greedy and seeded runs can be compared with `transformers.generate`."""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

from ..errors import AllformersError, ContextLengthError
from .checks import check_generation, check_token_ids
# the pieces every decoder shares (speculative.py too), also importable from here
from .sampling import TextStream, eos_tensor, left_pad, process_logits  # noqa: F401


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, *, attention_mask: Optional[torch.Tensor] = None,
             max_new_tokens: int = 64, temperature: float = 0.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, repetition_penalty: float = 1.0,
             eos_id: Optional[Union[int, Sequence[int]]] = None, pad_id: Optional[int] = None,
             stop: Optional[Sequence[str]] = None, tokenizer=None,
             on_token: Optional[Callable[[int], None]] = None,
             generator: Optional[torch.Generator] = None, draft=None, draft_tokens: int = 4,
             stats: Optional[dict] = None) -> torch.Tensor:
    """input_ids (B, T) -> (B, T + n) with n <= max_new_tokens new tokens.

    temperature 0 is greedy. Rows that hit `eos_id` or a `stop` string (needs `tokenizer`)
    are filled with `pad_id` (default: eos) until every row is done. `on_token(id)` is called
    for each new token of row 0 (streaming). `draft` ('ngram', a smaller TransformerLM of the
    same vocabulary, or a drafter) decodes speculatively, `draft_tokens` per target pass, batch 1
    (speculative.py); `stats` (a dict) then receives its acceptance counts."""
    if draft is not None:
        from .speculative import speculative_generate

        return speculative_generate(model, input_ids, draft, draft_tokens=draft_tokens, attention_mask=attention_mask,
                                    max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                    repetition_penalty=repetition_penalty, eos_id=eos_id, pad_id=pad_id, stop=stop,
                                    tokenizer=tokenizer, on_token=on_token, generator=generator, stats=stats)
    stop = check_generation(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=repetition_penalty, stop=stop)
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 1:
        input_ids = input_ids[None]
    check_token_ids(input_ids, model.config.vocab_size, "input_ids")
    if stop and tokenizer is None:
        raise AllformersError("stop strings need the tokenizer: pass tokenizer=...")
    B, T = input_ids.shape
    limit = model.config.block_size
    if T + max_new_tokens > limit:
        raise ContextLengthError(
            f"the prompt has {T} tokens and max_new_tokens={max_new_tokens}: {T + max_new_tokens} > the model's "
            f"context of {limit}; shorten the prompt or lower max_new_tokens to {max(limit - T, 0)}")
    eos = eos_tensor(eos_id)
    pad_id = pad_id if pad_id is not None else (int(eos[0]) if len(eos) else 0)
    input_ids = input_ids.to(model.device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(model.device)

    cache = model.new_cache(B, T + max_new_tokens)
    logits = model(input_ids, attention_mask=attention_mask, cache=cache, last_only=True)[:, -1]
    step = lambda nxt: model(nxt[:, None], cache=cache, last_only=True)[:, -1]  # noqa: E731
    return decode_loop(step, logits, input_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                       top_p=top_p, repetition_penalty=repetition_penalty, eos=eos, pad_id=pad_id, stop=stop,
                       tokenizer=tokenizer, on_token=on_token, generator=generator)


def decode_loop(step: Callable, logits: torch.Tensor, out: torch.Tensor, *, max_new_tokens: int, temperature: float,
                top_k, top_p, repetition_penalty: float, eos: torch.Tensor, pad_id: int, stop=None, tokenizer=None,
                on_token=None, generator=None) -> torch.Tensor:
    """Greedy or sampled decoding shared by decoder-only and encoder-decoder models.
    step(next ids (B,)) -> next logits (B, V); out (B, T) holds what came before (prompt or start token)."""
    B, T = out.shape
    device = out.device
    done = torch.zeros(B, dtype=torch.bool, device=device)
    eos = eos.to(device)
    for i in range(max_new_tokens):
        logits = process_logits(logits.float(), out, temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=repetition_penalty)
        if temperature:
            probs = logits.softmax(-1)
            if generator is not None and generator.device != probs.device:
                # a CPU generator with a GPU model: draw on the CPU, so a seed gives the same
                # stream wherever the model runs
                nxt = torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(device)
            else:
                nxt = torch.multinomial(probs, 1, generator=generator)[:, 0]
        else:
            nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        out = torch.cat([out, nxt[:, None]], dim=1)
        if on_token is not None and not done[0]:
            on_token(int(nxt[0]))
        if len(eos):
            done |= torch.isin(nxt, eos)
        if stop:
            for b in range(B):
                if not done[b]:
                    done[b] = any(s in tokenizer.decode(out[b, T:].tolist()) for s in stop)
        if bool(done.all()) or i == max_new_tokens - 1:
            break
        logits = step(nxt)
    return out
