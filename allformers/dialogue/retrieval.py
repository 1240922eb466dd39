"""Passages and a dense index over them (sentence embeddings, cosine similarity), cached on disk.

    passages = sotu_passages()                       # the State of the Union corpus, ~100-word passages
    index = PassageIndex.build(passages, minilm)     # embeds once; later builds read the cache
    index.search("Emancipation of slaves", k=3)      # [Hit(score, passage), ...]

The cache lives under $ALLFORMERS_CACHE/retrieval (default ~/.cache/allformers/retrieval), never in
the repository. Its key is a hash of the passages (text and source) and of the encoder (config and
weights), so a changed corpus, chunking or model builds a new index instead of reading a stale one."""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from ..errors import AllformersError

SOTU = Path("sotu") / "sotu.txt"
_META = Path(__file__).with_name("sotu_addresses.tsv")


class RetrievalError(AllformersError, ValueError):
    """A corpus or index that cannot be used."""


@dataclass(frozen=True)
class Passage:
    text: str
    source: str  # what a citation names, e.g. "1862, Lincoln"
    doc: int = 0  # the document it came from
    meta: tuple = ()  # (key, value) pairs: year, president ...

    def info(self, key, default=None):
        return dict(self.meta).get(key, default)

    def citation(self, max_chars: int = 500) -> str:
        """'1862, Lincoln: text' cut at a word boundary within max_chars (Sparrow's evidence limit)."""
        text = self.text if len(self.text) <= max_chars else self.text[:max_chars].rsplit(" ", 1)[0] + " ..."
        return f"{self.source}: {text}"


@dataclass(frozen=True)
class Hit:
    score: float
    passage: Passage
    rank: int


# ---------------------------------------------------------------------- chunking
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[\"'(A-Z0-9])")


def chunk(text: str, words: int = 100) -> list[str]:
    """Passages of whole sentences, each about `words` words (a sentence longer than that is cut)."""
    out, cur, n = [], [], 0
    for sentence in _SENTENCE.split(text.strip()):
        w = sentence.split()
        while len(w) > words:  # an over-long sentence (lists, tables) on its own
            if cur:
                out.append(" ".join(cur))
                cur, n = [], 0
            out.append(" ".join(w[:words]))
            w = w[words:]
        if n + len(w) > words and cur:
            out.append(" ".join(cur))
            cur, n = [], 0
        cur.extend(w)
        n += len(w)
    if cur:
        out.append(" ".join(cur))
    return out


# ---------------------------------------------------------------------- the State of the Union corpus
@dataclass(frozen=True)
class Address:
    index: int
    date: str
    president: str
    surname: str
    text: str

    @property
    def year(self) -> int:
        return int(self.date[:4])


def sotu_path(data_root=None) -> Path:
    from ..training.data import default_data_root

    root = Path(data_root) if data_root is not None else default_data_root()
    path = root / SOTU if root is not None else None
    if path is None or not path.is_file():
        raise RetrievalError(f"no State of the Union corpus at {path}; put ../shared/data beside the project or set "
                             f"ALLFORMERS_DATA to the folder holding {SOTU}")
    return path


@lru_cache(maxsize=2)
def sotu_addresses(path: Optional[str] = None) -> tuple:
    """The corpus's 233 addresses with their date and president (sotu_addresses.tsv, checked by hash)."""
    path = Path(path) if path is not None else sotu_path()
    texts = [a.strip() for a in path.read_text(encoding="utf-8").split("\n\n") if a.strip()]
    rows = [line.split("\t") for line in _META.read_text().splitlines()[1:] if not line.startswith("#")]
    rows = [r for r in rows if r[0] != "index"]
    if len(texts) != len(rows):
        raise RetrievalError(f"{path} has {len(texts)} addresses but the metadata lists {len(rows)}: not the "
                             f"corpus sotu_addresses.tsv describes")
    out = []
    for (i, date, president, surname, sha), text in zip(rows, texts):
        if hashlib.sha1(text.encode()).hexdigest()[:len(sha)] != sha:
            raise RetrievalError(f"address {i} of {path} is not the text sotu_addresses.tsv dates ({date}, "
                                 f"{president}): a different corpus file")
        out.append(Address(int(i), date, president, surname, text))
    return tuple(out)


def sotu_passages(path: Optional[str] = None, words: int = 100, addresses: Optional[list] = None) -> list[Passage]:
    """Every address cut into passages of ~`words` words, each cited as 'YEAR, Surname'."""
    out = []
    for a in sotu_addresses(str(path) if path is not None else None):
        if addresses is not None and a.index not in addresses:
            continue
        meta = (("year", a.year), ("president", a.president), ("surname", a.surname), ("date", a.date))
        out.extend(Passage(t, f"{a.year}, {a.surname}", a.index, meta) for t in chunk(a.text, words))
    return out


# ---------------------------------------------------------------------- the index
def cache_root() -> Path:
    from ..training.data import cache_dir

    return cache_dir() / "retrieval"


def encoder_fingerprint(encoder) -> str:
    """A hash of the encoder's config and of every weight (a few MB of bytes for MiniLM: fast)."""
    h = hashlib.sha256(json.dumps(encoder.config.__dict__, sort_keys=True, default=str).encode())
    for name, p in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().to(torch.float32).contiguous().cpu().numpy().tobytes()[:1 << 16])
    return h.hexdigest()


def corpus_hash(passages: list) -> str:
    h = hashlib.sha256()
    for p in passages:
        h.update(json.dumps([p.text, p.source, p.doc], ensure_ascii=False).encode())
        h.update(b"\0")
    return h.hexdigest()


class PassageIndex:
    """Normalised passage embeddings (N, C); search ranks by cosine similarity to the query."""

    def __init__(self, passages: list, embeddings: torch.Tensor, encoder, name: str = "the corpus"):
        if len(passages) != len(embeddings):
            raise RetrievalError(f"{len(passages)} passages but {len(embeddings)} embeddings")
        self.passages, self.embeddings, self.encoder, self.name = passages, embeddings, encoder, name
        self.path: Optional[Path] = None  # the cache file it came from or went to

    @classmethod
    def build(cls, passages: list, encoder, *, cache: bool = True, name: str = "the corpus", batch_size: int = 64,
              progress: bool = False) -> "PassageIndex":
        """Embed `passages` with `encoder` (a sentence encoder: allformers.load('minilm')), or read the
        embeddings from the cache when this corpus and encoder were embedded before."""
        if not passages:
            raise RetrievalError("no passages to index")
        key = hashlib.sha256((corpus_hash(passages) + encoder_fingerprint(encoder)).encode()).hexdigest()[:24]
        path = cache_root() / f"{key}.safetensors"
        emb = _read(path, len(passages)) if cache else None
        if emb is None:
            emb = _embed_all([p.text for p in passages], encoder, batch_size, progress)
            if cache:
                _write(path, emb)
        index = cls(passages, emb, encoder, name)
        index.path = path if cache else None
        return index

    def search(self, query: str, k: int = 3, docs: Optional[set] = None) -> list[Hit]:
        """The k passages closest to `query` (only from documents in `docs` when given)."""
        from ..inference import embed

        q = embed(self.encoder, [query])[0].float()
        scores = self.embeddings.float() @ q  # (N,)
        if docs is not None:
            allowed = torch.tensor([p.doc in docs for p in self.passages])
            scores = scores.masked_fill(~allowed, float("-inf"))
        top = torch.topk(scores, min(k, len(self.passages)))
        return [Hit(float(s), self.passages[i], r) for r, (s, i) in enumerate(zip(top.values.tolist(),
                                                                                 top.indices.tolist()))
                if s != float("-inf")]


def _embed_all(texts, encoder, batch_size, progress) -> torch.Tensor:
    from tqdm import tqdm

    from ..inference import embed

    out = []
    for s in tqdm(range(0, len(texts), batch_size), desc="embedding passages", disable=not progress, leave=False):
        out.append(embed(encoder, texts[s:s + batch_size], batch_size=batch_size).float().cpu())
    return torch.cat(out)


def _read(path: Path, n: int) -> Optional[torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        emb = load_file(str(path))["embeddings"]
    except Exception:  # a torn or foreign file: rebuild it
        return None
    return emb if len(emb) == n else None


def _write(path: Path, emb: torch.Tensor) -> None:
    """Through a temporary file in the same folder, so readers see the old index or the new one."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"embeddings": emb.contiguous()}, str(tmp))
    os.replace(tmp, path)


def spread_addresses(n: int) -> list[int]:
    """n address indices spread evenly over the corpus's years (the first and the last included)."""
    total = len(sotu_addresses())
    if not 1 <= n <= total:
        raise RetrievalError(f"choose between 1 and {total} addresses to index, not {n}")
    return sorted({round(i * (total - 1) / max(1, n - 1)) for i in range(n)})


def sotu_index(n_addresses: int, encoder, progress: bool = False) -> PassageIndex:
    """An index over n addresses spread over the years (cached), e.g. with the bundled MiniLM."""
    return PassageIndex.build(sotu_passages(addresses=spread_addresses(n_addresses)), encoder,
                              name="the State of the Union addresses", progress=progress)
