"""Questions about pictures in one call, asked the way each image + text model reads them:

  VisionLanguageLM (PaLM-E / LLaVA)  its chat format: the tokenizer's chat template, or LLaVA-1.5's
                                     "USER: <image>\\n{question} ASSISTANT:" when it has none
  BLIP2                              num_query_tokens placeholders (the queries go first, as BLIP-2 puts
                                     them), then the BLIP-2 paper's VQA prompt "Question: {question} Answer:"

The benchmark trains its models on exactly these prompts (benchmarks/vl_vqa.py), so `allformers ask` asks a
saved one the way it learnt. `with_image=False` gives the same text without the picture: the prompt of the
text-only baseline (the same LM, no image).

    answers = ask(model, ["pic.png"], ["what colour is the circle?"])   # greedy, -> ["red"]
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..errors import AllformersError, InputError

BLIP2_PROMPT = "Question: {} Answer:"  # BLIP-2's zero-shot VQA prompt for its OPT models (Li et al. 2023, sec. 4.2)


class NoVisionError(AllformersError, ValueError):
    """The model cannot read pictures."""


def vision_kind(model) -> str:
    """ "vlm" (VisionLanguageLM) or "blip2" (a BLIP-2 with a language model); anything else is refused."""
    from .blip2 import BLIP2
    from .vlm import VisionLanguageLM

    if isinstance(model, VisionLanguageLM):
        return "vlm"
    if isinstance(model, BLIP2) and model.lm is not None and not model.config.text.is_encoder_decoder:
        return "blip2"
    what = "a BLIP-2 without a decoder LM" if isinstance(model, BLIP2) else type(model).__name__
    raise NoVisionError(f"{what} cannot answer questions about pictures; pass a saved VisionLanguageLM "
                        f"(PaLM-E / LLaVA) or a BLIP-2 with a decoder LM (e.g. the benchmark's palme / blip2 models)")


def encode_words(tokenizer, text: str) -> list:
    """tokenizer.encode(text); a word-level vocabulary's unknown words are named (its own error names letters)."""
    try:
        return tokenizer.encode(text, add_bos=False)
    except InputError:
        from tokenizers import models

        backend = tokenizer.backend
        if not isinstance(backend.model, models.WordLevel):
            raise
        pieces = backend.pre_tokenizer.pre_tokenize_str(text) if backend.pre_tokenizer else [(w, None) for w in text.split()]
        unknown = sorted({w for w, _ in pieces if backend.token_to_id(w) is None})
        raise InputError(f"the model's vocabulary of {tokenizer.vocab_size} words has no {', '.join(map(repr, unknown))}; "
                         f"ask with words it knows (its questions' words)") from None


def prompt_ids(kind: str, tokenizer, question: str, *, config=None, with_image: bool = True) -> list:
    """The ids a model of `kind` ("vlm" / "blip2") reads for `question`, with its image placeholders
    (config: the model's config, for their id and number) or, with_image=False, without them."""
    if not isinstance(question, str) or not question.strip():
        raise InputError("the question is empty; ask something, e.g. \"what colour is the circle?\"")
    bos = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
    if kind == "blip2":
        ids = bos + encode_words(tokenizer, BLIP2_PROMPT.format(question.strip()))
        return [config.image_token_id] * config.num_query_tokens + ids if with_image else ids
    from .vlm import IMAGE_PLACEHOLDER, LLAVA_CHAT_TEMPLATE

    content = f"{IMAGE_PLACEHOLDER}\n{question.strip()}" if with_image else question.strip()
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], True,
                                         template=tokenizer.chat_template or LLAVA_CHAT_TEMPLATE)
    ids = list(bos)
    for i, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):  # as VisionLanguageLM.chat_ids
        if i:
            ids += [config.image_token_id] * config.image_seq_length
        if piece.strip():
            ids += encode_words(tokenizer, piece)
    return ids


def image_processor(model, folder=None):
    """The folder's preprocessor_config.json when it has one; else resize to the tower's size, CLIP's numbers."""
    from ..data.image_processing import ImageProcessor

    if folder is not None and (Path(folder) / "preprocessor_config.json").is_file():
        return ImageProcessor.from_hf(Path(folder))
    s = model.config.vision.image_size
    return ImageProcessor(shortest_edge=None, size=(s, s), crop=None)


@torch.inference_mode()
def answer_ids(model, tokenizer, pixel_values: torch.Tensor, questions: Sequence[str], *, max_new_tokens: int = 8,
               batch_size: int = 256) -> list:
    """Greedy answers -> strings, one per (picture, question); pixel_values (N, 3, H, W) normalised. Rows are
    batched by prompt length, so no row needs padding."""
    kind = vision_kind(model)
    prompts = [prompt_ids(kind, tokenizer, q, config=model.config) for q in questions]
    out: list = [None] * len(prompts)
    by_length: dict = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    for rows in by_length.values():
        for s in range(0, len(rows), batch_size):
            idx = rows[s:s + batch_size]
            ids = torch.tensor([prompts[i] for i in idx])
            px = pixel_values[idx]
            kw = dict(max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
            new = model.generate(ids, px, **kw) if kind == "vlm" else model.generate(px, ids, **kw)
            for i, row in zip(idx, new.tolist()):
                if tokenizer.eos_id in row:
                    row = row[:row.index(tokenizer.eos_id)]
                out[i] = tokenizer.decode(row).strip()
    return out


def ask(model, images, questions, *, tokenizer=None, processor=None, folder=None, max_new_tokens: int = 8) -> list:
    """Pictures (paths, PIL images or uint8 arrays; one per question, or one for all) -> greedy answers."""
    tokenizer = tokenizer or getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise AllformersError("the model has no tokenizer; save it with its tokenizer (save(..., tokenizer=tok))")
    vision_kind(model)
    questions = [questions] if isinstance(questions, str) else list(questions)
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    if len(images) == 1:
        images = images * len(questions)
    if len(images) != len(questions):
        raise InputError(f"{len(images)} pictures for {len(questions)} questions; give one picture, or one per question")
    px = (processor or image_processor(model, folder))(images).to(model.device)
    return answer_ids(model, tokenizer, px, questions, max_new_tokens=max_new_tokens)

