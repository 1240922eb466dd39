"""CTRL's recipe at toy scale: a character-level CTRL (zoo: baby-ctrl-char) trained on text tagged by
source, Tiny Shakespeare as <shakespeare> and the State of the Union addresses as <sotu>, each row
starting with its source's code (training/control_codes.py). Afterwards a sample drawn after a code
reads like that source: `code_accuracy` draws samples per code and lets a character-trigram naive
Bayes classifier, fitted on held-out text of both sources, say which source each one is.

    train_ctrl(out_dir="runs/ctrl")   # then: allformers generate runs/ctrl "" --control-code "<sotu>" """
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from ..errors import AllformersError
from .control_codes import TaggedWindows, tagged_corpus
from .data import default_data_root, tiny_shakespeare_path
from .trainer import TrainConfig, Trainer

FULL = dict(steps=1000, batch_size=16, block=128, n_layer=4, n_embd=128, n_head=4, lr=2e-3,
            samples_per_code=50, sample_chars=120, temperature=0.8)
QUICK = dict(steps=30, batch_size=8, block=32, n_layer=2, n_embd=32, n_head=2, lr=2e-3,
             samples_per_code=4, sample_chars=24, temperature=0.8)


def source_texts(data_dir=None) -> dict:
    """control code -> text: Tiny Shakespeare and the State of the Union addresses from the shared data."""
    root = Path(data_dir) if data_dir else default_data_root()
    sotu = root / "sotu" / "sotu.txt" if root else None
    if sotu is None or not sotu.is_file():
        raise AllformersError(f"the State of the Union text is not at {sotu}; pass data_dir= (the folder holding "
                              f"sotu/sotu.txt and tinyshakespeare/input.txt)")
    return {"<shakespeare>": tiny_shakespeare_path(root).read_text(encoding="utf-8"),
            "<sotu>": sotu.read_text(encoding="utf-8")}


def train_ctrl(quick: bool = False, data_dir=None, out_dir=None, seed: int = 0, progress: bool = False,
               **overrides) -> dict:
    """Train the tagged character CTRL; save it with its tokenizer to out_dir (when given).
    Returns {"model", "tokenizer", "corpus", "settings", "val_loss", "seconds", "params"}."""
    from ..config import Config
    from ..models import TransformerLM
    from ..objectives import CausalLM

    s = {**(QUICK if quick else FULL), **overrides}
    corpus = tagged_corpus(source_texts(data_dir))
    tok = corpus.tokenizer
    config = Config.from_name("baby-ctrl-char", vocab_size=tok.vocab_size, block_size=s["block"], n_layer=s["n_layer"],
                              n_embd=s["n_embd"], n_head=s["n_head"], intermediate_size=4 * s["n_embd"],
                              embed_scale=s["n_embd"] ** 0.5)
    torch.manual_seed(seed)
    model = TransformerLM(config)
    val_rows = TaggedWindows(corpus.val, tok, s["block"], seed=seed + 1)
    val = [val_rows.sample(s["batch_size"]) for _ in range(4 if quick else 20)]
    cfg = TrainConfig(max_iters=s["steps"], batch_size=s["batch_size"], lr=s["lr"], min_lr=s["lr"] / 10,
                      warmup_iters=max(1, s["steps"] // 20), weight_decay=0.1, beta2=0.99, grad_clip=1.0,
                      eval_interval=0, eval_at_start=False, log_interval=max(1, s["steps"] // 20),
                      checkpoint=False, seed=seed, device="cpu")
    trainer = Trainer(model, CausalLM(), TaggedWindows(corpus.train, tok, s["block"], seed=seed), cfg,
                      eval_data={"val": val}, out_dir=out_dir, tokenizer=tok, progress=progress)
    t0 = time.perf_counter()
    trainer.fit()
    model.eval()
    if out_dir is not None:
        model.save(Path(out_dir) / "model", tokenizer=tok)
    return {"model": model, "tokenizer": tok, "corpus": corpus, "settings": s, "val_loss": trainer.last_eval["val"],
            "seconds": time.perf_counter() - t0, "params": model.num_params()}


def fit_source_classifier(corpus, n: int = 3):
    """A character n-gram naive Bayes over the first half of each source's held-out split (text the
    model never trained on; the second half is left to test the classifier itself)."""
    from ..metrics import CharNGramClassifier

    tok = corpus.tokenizer
    return CharNGramClassifier(n).fit({code: tok.decode(ids[: len(ids) // 2].tolist()) for code, ids in corpus.val.items()})


@torch.no_grad()
def code_accuracy(model, tokenizer, classifier, *, samples_per_code: int, sample_chars: int, temperature: float,
                  seed: int = 0, **_) -> dict:
    """Per code: draw samples after the code alone and count those the classifier gives to its source."""
    from ..generation import generate_text

    gen = torch.Generator().manual_seed(seed)
    right, examples = {}, {}
    for code in tokenizer.control_codes:
        texts = generate_text(model, tokenizer, [""] * samples_per_code, control_code=code,
                              max_new_tokens=sample_chars, temperature=temperature, generator=gen)
        right[code] = sum(classifier.predict(t) == code for t in texts) / len(texts)
        examples[code] = texts[0]
    return {"accuracy": sum(right.values()) / len(right), "per_code": right, "examples": examples}


def real_text_accuracy(corpus, classifier, chars: int, n: int = 100, seed: int = 0) -> float:
    """The classifier on random windows of the real sources it was not fitted on (the second half of
    each held-out split): the ceiling for the samples."""
    gen = torch.Generator().manual_seed(seed)
    tok, hits = corpus.tokenizer, 0
    for code, ids in corpus.val.items():
        ids = ids[len(ids) // 2:]
        for start in torch.randint(len(ids) - chars, (n,), generator=gen).tolist():
            hits += classifier.predict(tok.decode(ids[start:start + chars].tolist())) == code
    return hits / (n * len(corpus.val))
