"""CTRL's training data (Keskar et al. 2019): every sequence starts with the control code of the source
it comes from, so the model learns p(text | code) and generation follows the code it is given.

`tagged_corpus` builds one character vocabulary over all sources plus one special token per code;
`TaggedWindows` samples training rows [code, w_0 .. w_{T-2}] -> [w_0 .. w_{T-1}], each source equally
often whatever its size, with its own generator (checkpointed like RandomWindows)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import AllformersError


@dataclass
class TaggedCorpus:
    tokenizer: object  # char tokenizer that knows the codes (tokenizer.control_codes)
    train: dict  # code -> 1-D token ids
    val: dict  # code -> 1-D token ids


def tagged_corpus(texts: dict, train_fraction: float = 0.9) -> TaggedCorpus:
    """texts: control code -> that source's text. The first train_fraction of each source trains."""
    from ..tokenization import Tokenizer
    from .data import encode_chars

    if len(texts) < 2:
        raise AllformersError(f"control codes need at least two sources to tell apart, got {list(texts)}")
    tok = Tokenizer.char("".join(texts.values())).add_control_codes(list(texts))
    train, val = {}, {}
    for code, text in texts.items():
        ids = encode_chars(tok, text)
        n = int(train_fraction * len(ids))
        train[code], val[code] = ids[:n], ids[n:]
    return TaggedCorpus(tok, train, val)


class TaggedWindows:
    """Rows of block_size tokens: the code's token, then a random window of its source."""

    def __init__(self, sources: dict, tokenizer, block_size: int, seed: int = 0):
        short = [c for c, ids in sources.items() if len(ids) <= block_size]
        if short:
            raise AllformersError(f"source(s) {short} hold fewer than block_size={block_size} + 1 tokens")
        self.codes = list(sources)
        self.code_ids = torch.tensor([tokenizer.token_id(c) for c in self.codes])
        self.data = [sources[c].long() for c in self.codes]
        self.block_size = block_size
        self.generator = torch.Generator().manual_seed(seed)
        self._offsets = torch.arange(block_size)  # (T,)

    def sample(self, n: int):
        which = torch.randint(len(self.codes), (n,), generator=self.generator)  # (n,) source of each row
        T = self.block_size
        x = torch.empty(n, T, dtype=torch.long)
        y = torch.empty(n, T, dtype=torch.long)
        for s, data in enumerate(self.data):
            rows = (which == s).nonzero()[:, 0]
            if len(rows) == 0:
                continue
            ix = torch.randint(len(data) - T, (len(rows),), generator=self.generator)
            w = data[ix[:, None] + self._offsets]  # (rows, T)
            x[rows, 0], x[rows, 1:], y[rows] = self.code_ids[s], w[:, :-1], w
        return x, y

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
