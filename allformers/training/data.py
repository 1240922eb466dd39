"""Data for the training recipes: finding (or downloading) the corpus, encoding it, and a
nanoGPT-style random-window sampler with its own generator so a resumed run continues from
exactly the same data position.

Where the data comes from, first match wins:
  1. an explicit `data` (a folder holding `tinyshakespeare/input.txt` or `input.txt`, or the file);
  2. $ALLFORMERS_DATA;
  3. `../shared/data` next to the current directory or next to this repository;
  4. the download cache ($ALLFORMERS_CACHE or ~/.cache/allformers), filled from the canonical URL.
Files are read in place; nothing is copied into the repository."""
from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..deprecation import accepts_old_names
from ..errors import AllformersError

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_MD5 = "6fb458f1232090904fb40fe944165e91"
TINY_SHAKESPEARE_REL = Path("tinyshakespeare") / "input.txt"
REPO_ROOT = Path(__file__).resolve().parents[2]


class DataError(AllformersError, ValueError):
    """The training data is missing, unreadable or too short."""


# ---------------------------------------------------------------------- locating the corpus
def default_data_root() -> Optional[Path]:
    """$ALLFORMERS_DATA, else the first `../shared/data` that exists (from the cwd, then the repo)."""
    env = os.environ.get("ALLFORMERS_DATA")
    if env:
        if not Path(env).is_dir():
            raise DataError(f"ALLFORMERS_DATA={env!r} is not a folder; point it at your data folder or unset it")
        return Path(env)
    for base in (Path.cwd(), REPO_ROOT):
        candidate = (base / ".." / "shared" / "data").resolve()
        if candidate.is_dir():
            return candidate
    return None


def resolve_data_path(data=None, *, default=None, inside: Optional[str] = None, folder: bool = False,
                      what: str = "a file", error=None) -> Path:
    """Where a data argument points: the path itself, else the same relative path under the data
    root (../shared/data or $ALLFORMERS_DATA). `inside`: a file name also tried inside a folder (a
    data set folder holding train.jsonl). `data` None: `default` under the data root. `folder`:
    a folder is wanted, not a file. Errors (class `error`, DataError by default) say what to pass."""
    error = error or DataError
    root = default_data_root()
    if data is None:
        if default is None:
            raise error(f"no --data given; pass {what}")
        candidate = root / default if root is not None else None
        if candidate is None or not (candidate.is_dir() if folder else candidate.is_file()):
            raise error(f"no --data given and no {default} under the data root ({root}); pass --data {what}")
        return candidate
    p = Path(data)
    bases = [p] + ([root / p] if root is not None and not p.is_absolute() else [])
    for base in bases:
        for c in [base] + ([base / inside] if inside else []):
            if c.is_dir() if folder else c.is_file():
                return c
    kind = "folder" if folder else "file"
    raise error(f"{data} is not a {kind}" + (f" (nor under the data root {root})" if root else "") + f"; pass {what}")


def cache_dir() -> Path:
    return Path(os.environ.get("ALLFORMERS_CACHE") or Path.home() / ".cache" / "allformers")


def download(url: str, dest: Path) -> Path:
    """Fetch `url` into `dest` through a temporary file, so an interrupted download leaves nothing."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    os.close(fd)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            f.write(response.read())
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as e:
        raise DataError(f"could not download {url} ({e}); without network access, put the file at "
                        f"{dest} or pass --data (a folder holding {TINY_SHAKESPEARE_REL})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


@accepts_old_names
def tiny_shakespeare_path(data=None) -> Path:
    """Path of Tiny Shakespeare's input.txt, downloading it into the cache as a last resort."""
    if data is not None:
        d = Path(data)
        for candidate in (d, d / TINY_SHAKESPEARE_REL, d / "input.txt"):
            if candidate.is_file():
                return candidate
        raise DataError(f"no Tiny Shakespeare under {d}: expected {d / TINY_SHAKESPEARE_REL} or {d / 'input.txt'}")
    root = default_data_root()
    if root is not None and (root / TINY_SHAKESPEARE_REL).is_file():
        return root / TINY_SHAKESPEARE_REL
    cached = cache_dir() / TINY_SHAKESPEARE_REL
    if not cached.is_file():
        download(TINY_SHAKESPEARE_URL, cached)
        digest = hashlib.md5(cached.read_bytes()).hexdigest()
        if digest != TINY_SHAKESPEARE_MD5:
            print(f"warning: {cached} has md5 {digest}, expected {TINY_SHAKESPEARE_MD5}")
    return cached


# ---------------------------------------------------------------------- JSON-lines records
def read_jsonl(path, error=DataError) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSON-lines file. A line that is not
    one JSON object raises `error` (the caller's error class) naming the file and the line."""
    import json

    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path} line {n} is not valid JSON ({e.msg}); each line must be one JSON object") from None
            if not isinstance(rec, dict):
                raise error(f"{path} line {n} is a {type(rec).__name__}, not a JSON object")
            rows.append((n, rec))
    return rows


# ---------------------------------------------------------------------- encoding
@dataclass
class Corpus:
    tokenizer: object  # allformers Tokenizer
    train: torch.Tensor  # (N_train,) int64 token ids
    val: torch.Tensor  # (N_val,)


def char_corpus(path, train_fraction: float = 0.9) -> Corpus:
    """Character-level corpus: the first `train_fraction` of the text trains, the rest validates."""
    from ..tokenization import Tokenizer

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path} as UTF-8 text: {e}") from None
    if len(text) < 2:
        raise DataError(f"{path} is empty; a training corpus needs text")
    tok = Tokenizer.char(text)
    ids = encode_chars(tok, text)
    n = int(train_fraction * len(ids))
    return Corpus(tok, ids[:n], ids[n:])


def encode_chars(tok, text: str) -> torch.Tensor:
    """Encode with a lookup table built from the tokenizer's own vocabulary: the same ids as
    `tok.encode` (checked on a prefix), ~100x faster than running the tokenizer on 1M chars."""
    vocab = tok.backend.get_vocab()
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # one code point per char
    table = np.full(int(codes.max()) + 1, -1, dtype=np.int64)
    for ch, i in vocab.items():
        if len(ch) == 1 and ord(ch) < len(table):
            table[ord(ch)] = i
    ids = table[codes]
    if (ids < 0).any() or ids[:1000].tolist() != tok.encode(text[:1000]):
        ids = np.asarray(tok.encode(text), dtype=np.int64)  # not a plain char vocabulary: slow path
    return torch.from_numpy(ids)


# ---------------------------------------------------------------------- sampling
class RandomWindows:
    """nanoGPT's get_batch: random windows of block_size + 1 tokens, split into (x, y) = (w[:-1], w[1:]).

    The generator is the sampler's own (not torch's global one), so dropout and data order are
    independent, and its state goes into checkpoints."""

    def __init__(self, data: torch.Tensor, block_size: int, seed: int = 0):
        if data.dim() != 1:
            raise DataError(f"expected a 1-D tensor of token ids, got shape {tuple(data.shape)}")
        if len(data) <= block_size:
            raise DataError(f"{len(data)} tokens cannot fill one window of block_size={block_size} + 1; "
                            f"use more text or a smaller block_size")
        self.data, self.block_size = data.long(), block_size
        self.generator = torch.Generator().manual_seed(seed)
        self._offsets = torch.arange(block_size + 1)  # (T+1,)

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(self.data) - self.block_size, (n,), generator=self.generator)  # (n,)
        w = self.data[ix[:, None] + self._offsets]  # (n, T+1)
        return w[:, :-1], w[:, 1:]  # (n, T), (n, T)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def fixed_batches(data: torch.Tensor, block_size: int, batch_size: int, n_batches: int, seed: int) -> list:
    """The same `n_batches` random batches every time: evaluations are comparable across steps
    and never touch the training generators."""
    sampler = RandomWindows(data, block_size, seed)
    return [sampler.sample(batch_size) for _ in range(n_batches)]


def all_windows(data: torch.Tensor, block_size: int, batch_size: int) -> list:
    """Every non-overlapping window of the split, batched: the loss on the whole split."""
    n = (len(data) - 1) // block_size
    x = data[: n * block_size].view(n, block_size)  # (n, T)
    y = data[1: n * block_size + 1].view(n, block_size)
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, n, batch_size)]
