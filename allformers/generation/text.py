"""Text in, text out: generate_text and chat over the token-level decoders (generate.py for
decoder-only models, seq2seq.py for encoder-decoders), stop strings and CTRL's control codes."""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

from ..errors import AllformersError, InputError
from .checks import check_generation
from .generate import TextStream, generate, left_pad
from .seq2seq import seq2seq_text


def trim_at_stop(text: str, stop: Optional[Sequence[str]]) -> str:
    """text cut at the first of the stop strings it holds."""
    for s in stop or ():
        if s in text:
            text = text[: text.index(s)]
    return text


def control_prefix(tokenizer, code: str) -> list:
    """CTRL: the token ids of control code `code` (bos first if the tokenizer adds one), to go before a
    prompt. A tokenizer that lists its codes (`control_codes`) refuses any other."""
    known = getattr(tokenizer, "control_codes", None)
    if known and code not in known:
        raise AllformersError(f"control code {code!r} is not one this model was trained with; use one of {known}")
    ids = tokenizer.encode(code)
    if not ids:
        raise AllformersError(f"control code {code!r} encodes to no tokens; pass a word of the model's vocabulary")
    return ids


def generate_text(model, tokenizer, prompts: Union[str, Sequence[str]], *, stream: Optional[Callable[[str], None]] = None,
                  stop: Optional[Sequence[str]] = None, control_code: Optional[str] = None, **kwargs) -> Union[str, list]:
    """Text in, text out. A list of prompts is run as one left-padded batch (decoder-only) or
    one right-padded source batch (encoder-decoder). `control_code` (CTRL) puts that code's tokens
    before every prompt; the output holds only what follows the prompt."""
    if getattr(model.config, "is_encoder_decoder", False):
        if control_code is not None:
            raise AllformersError("control codes condition decoder-only models (CTRL); this is an encoder-decoder")
        return seq2seq_text(model, tokenizer, prompts, stream=stream, stop=stop, **kwargs)
    num_beams = kwargs.pop("num_beams", 1)
    if num_beams != 1:  # it would be ignored: say so rather than sample as if it were not given
        raise InputError(f"num_beams={num_beams!r}: beam search is for encoder-decoders (T5, BART); this decoder-only "
                         f"model decodes greedily or samples: drop num_beams (CLI: --num-beams)")
    stop = check_generation(stop=stop)
    single = isinstance(prompts, str)
    batch = [prompts] if single else list(prompts)
    if control_code is not None:
        prefix = control_prefix(tokenizer, control_code)
        encoded = [prefix + tokenizer.encode(p, add_bos=False) for p in batch]
    else:
        encoded = [tokenizer.encode(p) for p in batch]
    ids, mask = left_pad(encoded, tokenizer.pad_id)
    kwargs.setdefault("eos_id", tokenizer.eos_id)
    streamer = TextStream(tokenizer, stream) if stream else None
    out = generate(model, ids, attention_mask=mask if len(batch) > 1 else None, stop=stop, tokenizer=tokenizer,
                   on_token=streamer, **kwargs)
    texts = [trim_at_stop(tokenizer.decode(row[ids.shape[1]:].tolist()), stop) for row in out]
    return texts[0] if single else texts


def chat(model, tokenizer, messages: list, **kwargs) -> str:
    """One assistant reply to a conversation, rendered with the model's chat template."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = torch.tensor([tokenizer.backend.encode(prompt, add_special_tokens=False).ids])
    kwargs.setdefault("eos_id", tokenizer.eos_id)
    stream = kwargs.pop("stream", None)
    stop = check_generation(stop=kwargs.pop("stop", None))
    streamer = TextStream(tokenizer, stream) if stream else None
    out = generate(model, ids, tokenizer=tokenizer, stop=stop, on_token=streamer, **kwargs)
    return trim_at_stop(tokenizer.decode(out[0, ids.shape[1]:].tolist()), stop).strip()
