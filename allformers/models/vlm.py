"""Image tokens in a language model's input sequence: the mechanism BLIP-2's soft prompts, PaLM-E and
LLaVA (the GPT-4-style image + text decoder) share.

The text carries one placeholder id (`image_token_id`) per image vector, where the image goes (Hugging Face's
processors expand each <image> into that many placeholders); the word embeddings of those positions are
replaced by the image vectors, row-major, and the language model runs on the result. Generation prefills the
KV cache with those embeddings and continues with ordinary token ids.

    ids = with_image_tokens(prompt_ids, n_image_tokens, image_token_id)   # placeholders in front of the prompt
    embeds = scatter_image_tokens(lm.wte(ids), ids, image_token_id, image_vectors)
    new = generate_from_embeds(lm, embeds, attention_mask, max_new_tokens=20, prompt_ids=ids)
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..errors import AllformersError, ContextLengthError


class ImageTokenError(AllformersError, ValueError):
    """The image placeholders in the text do not match the image vectors."""


class FrozenParts(nn.Module):
    """A model some of whose parts are frozen (a pretrained image encoder, a pretrained LM): `freeze_parts(names)`
    turns their gradients off, so no optimizer step or weight decay reaches them and they stay bit-identical, and
    keeps them in eval mode (no dropout) whatever train() is called with. The others train."""

    frozen: tuple = ()

    def freeze_parts(self, names: Sequence[str]):
        for p in self.parameters():
            p.requires_grad_(True)
        for n in names:
            getattr(self, n).requires_grad_(False)
        self.frozen = tuple(names)
        return self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        for n in self.frozen:
            getattr(self, n).eval()
        return self


def with_image_tokens(ids: Sequence[int], n: int, image_token_id: int, *, at: int = 0) -> list:
    """Token ids with n image placeholders inserted at position `at` (0: before the text, as BLIP-2 does)."""
    ids = list(ids)
    return ids[:at] + [image_token_id] * n + ids[at:]


def expand_image_tokens(ids: Sequence[int], n: int, image_token_id: int) -> list:
    """Each single image placeholder -> n of them (what a processor does with "<image>" before the model sees it)."""
    out = []
    for i in ids:
        out.extend([image_token_id] * n if i == image_token_id else [i])
    return out


def scatter_image_tokens(embeds: torch.Tensor, input_ids: torch.Tensor, image_token_id: int,
                         features: torch.Tensor) -> torch.Tensor:
    """embeds (B, T, E) of input_ids (B, T): the positions holding image_token_id take the rows of features
    ((B, N, E) or (M, E), row-major, as transformers' masked_scatter) -> (B, T, E)."""
    where = input_ids == image_token_id  # (B, T)
    n, rows = int(where.sum()), features.reshape(-1, features.shape[-1])
    if n != rows.shape[0]:
        raise ImageTokenError(f"the text holds {n} image placeholder(s) (id {image_token_id}) but the images give "
                              f"{rows.shape[0]} vectors; put {rows.shape[0] // max(len(input_ids), 1)} placeholders "
                              f"per image in each row (allformers.models.vlm.with_image_tokens)")
    if rows.shape[-1] != embeds.shape[-1]:
        raise ImageTokenError(f"image vectors of width {rows.shape[-1]}; the language model embeds {embeds.shape[-1]}")
    return embeds.masked_scatter(where[..., None], rows.to(embeds.dtype))


def left_padded(attention_mask: Optional[torch.Tensor], *tensors: torch.Tensor):
    """Right (or mixed) padding -> left padding: each row's real positions moved to its end, in order.
    -> (mask or None, *tensors), the mask unchanged when it was None or already left-padded."""
    if attention_mask is None or bool((attention_mask.long().diff(dim=1) >= 0).all()):
        return (attention_mask, *tensors)
    m = attention_mask.bool()
    order = torch.sort(m.long(), dim=1, stable=True).indices  # padding first, then the real positions in order
    out = [t.gather(1, order.view(*order.shape, *([1] * (t.dim() - 2))).expand_as(t)) for t in tensors]
    return (m.gather(1, order).long(), *out)


@torch.inference_mode()
def generate_from_embeds(lm, inputs_embeds: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                         max_new_tokens: int = 64, temperature: float = 0.0, top_k: Optional[int] = None,
                         top_p: Optional[float] = None, repetition_penalty: float = 1.0, eos_id=None,
                         pad_id: Optional[int] = None, prompt_ids: Optional[torch.Tensor] = None, generator=None,
                         on_token=None, lm_kwargs: Optional[dict] = None, step_kwargs: Optional[dict] = None,
                         stop=None, tokenizer=None) -> torch.Tensor:
    """A decoder-only TransformerLM continues inputs_embeds (B, T, E), left-padded by attention_mask (B, T) ->
    the new tokens (B, n), n <= max_new_tokens (rows that finished are filled with pad_id). prompt_ids (B, T):
    the ids the embeddings stand for (the repetition penalty sees them, as transformers' does). lm_kwargs /
    step_kwargs: extra arguments of the prefill / of each cached step (Flamingo's image context)."""
    from ..generation.checks import check_generation
    from ..generation.generate import decode_loop, eos_tensor

    stop = check_generation(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=repetition_penalty, stop=stop)
    B, T = inputs_embeds.shape[:2]
    if T + max_new_tokens > lm.config.block_size:
        raise ContextLengthError(f"{T} prompt positions (image tokens included) and max_new_tokens={max_new_tokens} "
                                 f"exceed the language model's {lm.config.block_size}")
    eos = eos_tensor(eos_id)
    cache = lm.new_cache(B, T + max_new_tokens)
    mask = attention_mask.long() if attention_mask is not None else None
    logits = lm(None, attention_mask=mask, cache=cache, last_only=True, inputs_embeds=inputs_embeds,
                **(lm_kwargs or {}))[:, -1]
    step = lambda nxt: lm(nxt[:, None], cache=cache, last_only=True, **(step_kwargs or {}))[:, -1]  # noqa: E731
    seen = prompt_ids if prompt_ids is not None else torch.empty(B, 0, dtype=torch.long, device=inputs_embeds.device)
    out = decode_loop(step, logits, seen.to(inputs_embeds.device), max_new_tokens=max_new_tokens,
                      temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                      eos=eos, pad_id=pad_id if pad_id is not None else (int(eos[0]) if len(eos) else 0), stop=stop,
                      tokenizer=tokenizer, on_token=on_token, generator=generator)
    return out[:, seen.shape[1]:]
