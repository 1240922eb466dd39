"""The tokenizer a GGUF file carries in its metadata (llama.cpp's `tokenizer.ggml.*` keys),
rebuilt with the `tokenizers` library.

Two kinds exist in practice: "gpt2" (byte-level BPE: tokens + merges, split first by a
regex that `tokenizer.ggml.pre` names) and "llama" (SentencePiece BPE: "▁" for spaces,
byte fallback, merges ranked by the tokens' scores)."""
from __future__ import annotations

import warnings

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from ..errors import CheckpointError
from .tokenizer import Tokenizer

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types (1 normal, 2 unknown, 5 unused, 6 byte)

_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")  # Qwen2 splits every digit


def _split_then_bytes(regex):
    return lambda: pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


# `tokenizer.ggml.pre` -> how text is split before BPE, as the model's own tokenizer.json does it.
PRE_TOKENIZERS = {
    "default": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),  # GPT-2's regex
    "gpt2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
    # SmolLM2 (and StarCoder): every digit on its own, then GPT-2's byte-level split.
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False)]),
    "starcoder": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False)]),
    **{name: _split_then_bytes(_LLAMA3) for name in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3")},
    **{name: _split_then_bytes(_QWEN2) for name in ("qwen2", "deepseek-r1-qwen")},
}


def metadata(reader, key: str, default=None):
    """One metadata value of a `gguf.GGUFReader` (str, number, bool or list), or `default`."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def tokenizer_from_gguf(reader) -> Tokenizer:
    kind = metadata(reader, "tokenizer.ggml.model")
    tokens = metadata(reader, "tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise CheckpointError("this GGUF file carries no tokenizer (no tokenizer.ggml.model / tokens); "
                              "load the model without one and build a Tokenizer from its original tokenizer.json")
    types = metadata(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in metadata(reader, "tokenizer.ggml.merges") or []]
    if kind == "gpt2":
        backend, add_bos = _byte_level(tokens, merges, metadata(reader, "tokenizer.ggml.pre", "default")), False
    elif kind == "llama":
        scores = metadata(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
        backend = _sentencepiece(tokens, scores, merges, metadata(reader, "tokenizer.ggml.add_space_prefix", True))
        add_bos = True  # llama.cpp's default for SentencePiece vocabularies
    else:
        raise CheckpointError(f"GGUF tokenizer model {kind!r} is not supported; supported: 'gpt2' (byte-level BPE) "
                              f"and 'llama' (SentencePiece BPE)")
    # Control tokens (<|im_start|> ...) must match whole and vanish on decode; user-defined ones only match whole.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty == CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, ty in zip(tokens, types) if ty == USER_DEFINED])

    def special(name):
        i = metadata(reader, f"tokenizer.ggml.{name}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    return Tokenizer(backend, bos_token=special("bos"), eos_token=special("eos"), pad_token=special("padding"),
                     chat_template=metadata(reader, "tokenizer.chat_template"),
                     add_bos=bool(metadata(reader, "tokenizer.ggml.add_bos_token", add_bos)))


def _byte_level(tokens, merges, pre) -> HFTokenizer:
    backend = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    if pre not in PRE_TOKENIZERS:
        warnings.warn(f"GGUF pre-tokenizer {pre!r} is unknown to allformers; splitting text with GPT-2's regex, "
                      f"which may give other ids than llama.cpp for digits or whitespace")
    backend.pre_tokenizer = PRE_TOKENIZERS.get(pre, PRE_TOKENIZERS["default"])()
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece(tokens, scores, merges, add_space_prefix) -> HFTokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = HFTokenizer(models.BPE(vocab, merges or _merges_from_scores(vocab, dict(zip(tokens, scores))),
                                     fuse_unk=True, byte_fallback=True))
    # "▁" marks a space; the first word gets one too when the vocabulary was trained that way.
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", split=False,
                                                     prepend_scheme="first" if add_space_prefix else "never")
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else []))
    return backend


def _merges_from_scores(vocab: dict, scores: dict) -> list:
    """SentencePiece files list no merges: every split of a token into two known tokens is a
    merge, ranked by the merged token's score (higher merges first), as `transformers` does."""
    found = []
    for token, score in scores.items():
        pairs = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        found += [(l, r, score) for l, r in sorted(pairs, key=lambda p: (vocab[p[0]], vocab[p[1]]))]
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(l, r) for l, r, _ in found]
