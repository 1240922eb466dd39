"""CTRL's recipe at toy scale: a character-level CTRL (zoo: baby-ctrl-char) trained on text tagged by
source, Tiny Shakespeare as <shakespeare> and the State of the Union addresses as <sotu>, each row
starting with its source's code and each source drawn equally often (training/control_codes.py).
Afterwards a sample drawn after a code should read like that source: the run draws samples per code
and lets a character-trigram naive Bayes classifier (metrics/source_classifier.py), fitted on the
first half of each source's held-out split, say which source each sample is (code_accuracy); the same
classifier on real text of the second half gives its own ceiling.

    allformers train --recipe ctrl-sources            # ~10 min on 2 quiet cores; -quick: a smoke run
    allformers generate runs/ctrl-sources/model "" --control-code "<sotu>" --temperature 0.8"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..errors import AllformersError
from ..training.control_codes import TaggedWindows, tagged_corpus
from ..training.data import default_data_root, tiny_shakespeare_path
from ..training.trainer import TrainConfig, Trainer
from .registry import Recipe, register


def source_texts(data=None) -> dict:
    """control code -> text: Tiny Shakespeare and the State of the Union addresses from the data root."""
    root = Path(data) if data else default_data_root()
    sotu = root / "sotu" / "sotu.txt" if root else None
    if sotu is None or not sotu.is_file():
        raise AllformersError(f"the State of the Union text is not at {sotu}; pass --data (the folder holding "
                              f"sotu/sotu.txt and tinyshakespeare/input.txt)")
    return {"<shakespeare>": tiny_shakespeare_path(root).read_text(encoding="utf-8"),
            "<sotu>": sotu.read_text(encoding="utf-8")}


@dataclass(kw_only=True)
class CTRLRecipe(Recipe):
    model: str = "baby-ctrl-char"  # a zoo config with CTRL's switches
    model_overrides: dict = field(default_factory=dict)  # Config fields (block_size, n_layer, n_embd ...)
    train: TrainConfig
    eval_batches: int = 20  # held-out tagged rows for the validation loss, batch_size each
    samples_per_code: int = 50
    sample_chars: int = 120
    temperature: float = 0.8
    kind = "ctrl"

    def run(self, *, out: Path, data=None, progress: bool = True, resume: bool = False, verbose: bool = True) -> dict:
        return run_ctrl(self, out=out, data=data, progress=progress)

    def report(self, r: dict) -> str:
        lines = [f"--- {code} sample\n{text}" for code, text in r["examples"].items()]
        lines.append(f"--- {r['recipe']}: {r['params']:,} parameters, {r['steps']} steps, val loss {r['val_loss']:.4f}, "
                     f"{r['wall_time_s']:.0f} s")
        lines.append(f"code accuracy {r['code_accuracy']:.3f} ({', '.join(f'{c} {a:.2f}' for c, a in r['per_code'].items())}); "
                     f"the classifier on real held-out text: {r['classifier_accuracy_on_real_text']:.3f}")
        lines.append(f"model: {r['model_dir']}  (allformers generate {r['model_dir']} \"\" --control-code \"<sotu>\")")
        return "\n".join(lines)


_TRAIN = TrainConfig(max_steps=1000, batch_size=16, lr=2e-3, min_lr=2e-4, warmup_steps=50, weight_decay=0.1, beta2=0.99,
                     grad_clip=1.0, eval_interval=0, eval_at_start=False, log_interval=20, checkpoint=False, seed=0)
CTRL_SOURCES = register(CTRLRecipe(
    name="ctrl-sources", model_overrides={"block_size": 128}, train=_TRAIN,
    description="a 4x128 character CTRL on Tiny Shakespeare <shakespeare> vs State of the Union <sotu>; samples after "
                "each code judged by a character-trigram naive Bayes",
    target="code accuracy >= 0.9 (600 steps: 0.99)"))
register(replace(CTRL_SOURCES, name="ctrl-sources-quick", description="ctrl-sources in a minute: a 2x32 model, 30 steps",
                 model_overrides={"block_size": 32, "n_layer": 2, "n_embd": 32, "n_head": 2, "intermediate_size": 128},
                 train=_TRAIN.replace(max_steps=30, batch_size=8, warmup_steps=2, log_interval=5), eval_batches=4,
                 samples_per_code=4, sample_chars=24, target=""))


def run_ctrl(recipe: CTRLRecipe, *, out, data=None, progress: bool = True) -> dict:
    """Train, save the model with its tokenizer to OUT/model, measure code accuracy; summary.json in OUT."""
    from ..config import Config
    from ..models import TransformerLM
    from ..objectives import CausalLM

    t0, out = time.perf_counter(), Path(out)
    corpus = tagged_corpus(source_texts(data))
    tok, cfg = corpus.tokenizer, recipe.train
    over = dict(recipe.model_overrides)
    if "n_embd" in over and "embed_scale" not in over:
        over["embed_scale"] = over["n_embd"] ** 0.5  # CTRL scales embeddings by sqrt(width)
    config = Config.from_name(recipe.model, **{**over, "vocab_size": tok.vocab_size})
    block = config.block_size
    torch.manual_seed(cfg.seed)
    model = TransformerLM(config)
    held_out = TaggedWindows(corpus.val, tok, block, seed=cfg.seed + 1)
    val = [held_out.sample(cfg.batch_size) for _ in range(recipe.eval_batches)]
    trainer = Trainer(model, CausalLM(), TaggedWindows(corpus.train, tok, block, seed=cfg.seed), cfg,
                      eval_data={"val": val}, out=out, tokenizer=tok, progress=progress)
    summary = trainer.fit()
    model.eval()
    model.save(out / "model", tokenizer=tok)
    classifier = fit_source_classifier(corpus)
    acc = code_accuracy(model, tok, classifier, samples_per_code=recipe.samples_per_code,
                        sample_chars=recipe.sample_chars, temperature=recipe.temperature, seed=cfg.seed)
    result = {"recipe": recipe.name, "params": model.num_params(), "steps": summary["step"],
              "val_loss": trainer.last_eval["val"], "code_accuracy": acc["accuracy"], "per_code": acc["per_code"],
              "classifier_accuracy_on_real_text": real_text_accuracy(corpus, classifier, recipe.sample_chars,
                                                                     seed=cfg.seed),
              "samples_per_code": recipe.samples_per_code, "sample_chars": recipe.sample_chars,
              "temperature": recipe.temperature, "examples": acc["examples"], "model_dir": str(out / "model"),
              "wall_time_s": time.perf_counter() - t0, "model_config": config.to_dict(), "train_config": cfg.to_dict()}
    (out / "summary.json").write_text(json.dumps(result, indent=2))
    return result


def fit_source_classifier(corpus, n: int = 3):
    """A character n-gram naive Bayes over the first half of each source's held-out split (text the
    model never trained on; the second half is left to test the classifier itself)."""
    from ..metrics import CharNGramClassifier

    tok = corpus.tokenizer
    return CharNGramClassifier(n).fit({code: tok.decode(ids[: len(ids) // 2].tolist()) for code, ids in corpus.val.items()})


@torch.no_grad()
def code_accuracy(model, tokenizer, classifier, *, samples_per_code: int, sample_chars: int, temperature: float,
                  seed: int = 0) -> dict:
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
