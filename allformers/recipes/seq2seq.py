"""Seq2seq recipes on a CPU: pretrain a small T5 (span corruption) or BART (text infilling +
sentence permutation) on the State of the Union corpus, then fine-tune either to write an
e-mail's subject line from its body (SpamAssassin, the fixed 20% held out by
`finetune.heldout_split`, the same e-mails every benchmark holds out), scored by ROUGE-L F1.

    from allformers.recipes import run_recipe
    run_recipe("t5-span-corruption-sotu", out="runs/t5-sotu")     # or: allformers train --recipe t5-span-corruption-sotu

Pieces, usable one by one (benchmarks/bench_subject_lines.py chains them):
  * `prepare_data`: a byte-level BPE trained on sotu.txt + the TRAINING e-mails only (never the
    held-out ones) with <pad> </s> <s> <mask> and 100 sentinels <extra_id_0..99> at the END of the
    vocabulary (<extra_id_0> = vocab_size - 1, as T5); the encoded sotu stream (last 2% for
    validation) and the (body -> subject) pairs of both splits.
  * `tiny_config`: a 2+2-layer, 128-wide T5 (v1.0 layout) or BART (learned positions, post-LN)
    for the data's vocabulary.
  * `pretrain` (span corruption or BART denoising), `finetune_subjects`, `evaluate_subjects`.
  * `rouge_l` (from allformers.metrics): ROUGE-L F1 from the longest common subsequence
    (lower-cased alphanumeric words, the `rouge-score` package's default tokenisation, no stemming).

The named recipes (Seq2SeqRecipe) are entries of the one registry (allformers.recipes)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..deprecation import accepts_old_names
from ..errors import AllformersError
from ..metrics.rouge import lcs_length, rouge_l, rouge_tokens  # noqa: F401 (re-exported)
from ..training.trainer import TrainConfig, Trainer
from .registry import Recipe, register

SOTU = Path("sotu") / "sotu.txt"
SPECIALS = ("<pad>", "</s>", "<s>", "<mask>")
N_SENTINELS = 100


# ---------------------------------------------------------------------- data
def clean(text: str) -> str:
    return " ".join(str(text or "").split())


def train_seq2seq_tokenizer(texts, vocab_size: int = 4096, n_sentinels: int = N_SENTINELS):
    """Byte-level BPE with <pad>=0 </s>=1 <s>=2 <mask>=3 and the sentinels last: <extra_id_i> = vocab_size - 1 - i."""
    from ..tokenization import Tokenizer

    tok = Tokenizer.train_bpe(texts, vocab_size=vocab_size - n_sentinels, special_tokens=SPECIALS)
    tok.backend.add_special_tokens([f"<extra_id_{i}>" for i in reversed(range(n_sentinels))])
    tok.bos_token, tok.eos_token, tok.pad_token = "<s>", "</s>", "<pad>"
    if tok.token_id("<extra_id_0>") != tok.vocab_size - 1:
        raise AllformersError(f"the BPE learned fewer than {vocab_size - n_sentinels} tokens; lower vocab_size")
    return tok


@dataclass
class SubjectLineData:
    tokenizer: object
    sotu_train: np.ndarray  # token stream for pretraining
    sotu_val: np.ndarray
    train_src: list  # e-mail bodies (ids, EOS-terminated)
    train_tgt: list  # their subjects (ids, EOS-terminated)
    held_src: list
    held_tgt: list
    held_subjects: list  # the held-out subjects as text (ROUGE references)
    held_bodies: list  # the held-out bodies as text (for baselines)
    info: dict = field(default_factory=dict)


@accepts_old_names
def load_sources(data=None, max_sotu_chars: Optional[int] = None, max_records: Optional[int] = None):
    """(sotu text, training records, held-out records), the split by finetune.heldout_split(0.2)."""
    from ..training.data import default_data_root
    from .finetune import heldout_split, read_records, resolve_data, split_key

    root = Path(data) if data else default_data_root()
    if root is None or not (root / SOTU).is_file():
        raise AllformersError(f"no {SOTU} under the data root ({root}); set ALLFORMERS_DATA or pass data")
    sotu = (root / SOTU).read_text(encoding="utf-8")
    if max_sotu_chars:
        sotu = sotu[:max_sotu_chars]
    records = read_records(resolve_data(root / "spam_assassin" / "train.jsonl"))
    train_idx, held_idx = heldout_split(records, 0.2)  # the fixed split of every e-mail benchmark
    train, held = [records[i] for i in train_idx], [records[i] for i in held_idx]
    if max_records:  # a deterministic subset for smoke runs (by the split key, not the file order)
        train = sorted(train, key=split_key)[:max_records]
        held = sorted(held, key=split_key)[:max(8, max_records // 4)]
    return sotu, train, held


@accepts_old_names
def prepare_data(data=None, vocab_size: int = 4096, max_source: int = 128, max_target: int = 24,
                 tokenizer=None, max_sotu_chars: Optional[int] = None, max_records: Optional[int] = None,
                 val_fraction: float = 0.02) -> SubjectLineData:
    t0 = time.perf_counter()
    sotu, train, held = load_sources(data, max_sotu_chars, max_records)
    docs = [line for line in sotu.split("\n") if line.strip()]
    if tokenizer is None:
        texts = docs + [clean(r.get("subject")) for r in train] + [clean(r["text"]) for r in train]
        tokenizer = train_seq2seq_tokenizer(texts, vocab_size)
    t_tok = time.perf_counter()
    eos = tokenizer.eos_id
    stream = np.concatenate([np.asarray(ids + [eos], dtype=np.int64) for ids in tokenizer.encode_batch(docs)])
    n_val = max(1, int(len(stream) * val_fraction))

    def pairs(records):
        bodies = tokenizer.encode_batch([clean(r["text"]) for r in records])
        subjects = tokenizer.encode_batch([clean(r.get("subject")) for r in records])
        return ([b[:max_source - 1] + [eos] for b in bodies], [s[:max_target - 1] + [eos] for s in subjects])

    train_src, train_tgt = pairs(train)
    held_src, held_tgt = pairs(held)
    info = {"sotu_tokens": int(len(stream)), "train_emails": len(train), "heldout_emails": len(held),
            "vocab_size": tokenizer.vocab_size, "max_source": max_source, "max_target": max_target,
            "tokenizer_s": t_tok - t0, "encode_s": time.perf_counter() - t_tok,
            "mean_source_tokens": float(np.mean([len(s) for s in train_src])),
            "mean_target_tokens": float(np.mean([len(t) for t in train_tgt]))}
    return SubjectLineData(tokenizer, stream[:-n_val], stream[-n_val:], train_src, train_tgt, held_src, held_tgt,
                           [clean(r.get("subject")) for r in held], [clean(r["text"]) for r in held], info)


# ---------------------------------------------------------------------- models
TINY = dict(n_layer=2, n_decoder_layer=2, n_embd=128, n_head=4, head_dim=32, intermediate_size=512, block_size=256)


def tiny_config(kind: str, tokenizer, dropout: float = 0.0, **overrides):
    """A small T5 (the t5-small layout: relative bias, pre-RMSNorm, ReLU, tied + scaled output) or BART
    (the bart-base layout: learned positions, post-LN, GELU) sized by TINY, for `tokenizer`."""
    from ..config import Config

    size = {**TINY, **overrides}
    if kind == "t5":
        return Config.from_name("t5-small", vocab_size=tokenizer.vocab_size, dropout=dropout,
                                head_input_scale=size["n_embd"] ** -0.5, decoder_start_token_id=tokenizer.pad_id,
                                **size).replace(name="t5-tiny", description="t5-small's layout at TINY size")
    if kind == "bart":
        return Config.from_name("bart-base", vocab_size=tokenizer.vocab_size, dropout=dropout,
                                decoder_start_token_id=tokenizer.eos_id, **size).replace(
                                    name="bart-tiny", description="bart-base's layout at TINY size")
    raise AllformersError(f"kind={kind!r}: 't5' or 'bart'")


def build(kind: str, tokenizer, seed: int = 0, **kw):
    """A freshly initialised tiny model: T5 with T5's own initialisation (its config's init="t5"), BART with
    GPT-2's N(0, 0.02)."""
    from ..models import Seq2SeqLM

    torch.manual_seed(seed)
    return Seq2SeqLM(tiny_config(kind, tokenizer, **kw))


def with_dropout(model, dropout: float):
    """The same weights in a model built with another dropout (pretraining runs without, fine-tuning with)."""
    from ..models import Seq2SeqLM

    new = Seq2SeqLM(model.config.replace(dropout=dropout))
    new.load_state_dict(model.state_dict())
    return new


# ---------------------------------------------------------------------- pretraining
def pretrain_data(kind: str, data: SubjectLineData, seed: int = 0, inputs_length: int = 128, window: int = 128):
    """Train and validation samplers: T5 span corruption (15% noise, mean span 3, inputs of
    inputs_length) or BART text infilling (30%, Poisson(3)) + sentence permutation (all sentences)."""
    from ..objectives.denoising import BartNoiser, DenoisingData, full_stop_ids
    from ..objectives.span_corruption import SpanCorruptionData, sentinel_ids_from_tokenizer

    tok = data.tokenizer
    if kind == "t5":
        sentinels = sentinel_ids_from_tokenizer(tok)
        make = lambda stream, s: SpanCorruptionData(stream, sentinels, tok.eos_id, tok.pad_id,  # noqa: E731
                                                    inputs_length=inputs_length, seed=s)
    else:
        noiser = BartNoiser(mask_id=tok.token_id("<mask>"), full_stop_ids=full_stop_ids(tok), permute_ratio=1.0,
                            infill_ratio=0.3, poisson_lambda=3.0)
        make = lambda stream, s: DenoisingData(stream, noiser, tok.eos_id, tok.pad_id, window=window, seed=s)  # noqa: E731
    return make(data.sotu_train, seed), make(data.sotu_val, seed + 1)


PRETRAIN = TrainConfig(max_steps=150, batch_size=32, lr=1e-3, min_lr=1e-4, warmup_steps=20, weight_decay=0.01,
                       beta2=0.99, grad_clip=1.0, eval_interval=0, log_interval=10)
FINETUNE = TrainConfig(max_steps=150, batch_size=32, lr=1e-3, min_lr=1e-4, warmup_steps=20, weight_decay=0.01,
                       beta2=0.99, grad_clip=1.0, eval_interval=0, eval_at_start=False, log_interval=10)
# Peak learning rate per architecture, picked from {1e-3, 3e-3} by a 150-step from-scratch fine-tune:
# T5 (pre-norm) 3e-3 (held-out loss 5.80 vs 6.55 at 1e-3); BART (post-LN) 1e-3 (5.72 vs 6.38 at 3e-3).
LR = {"t5": 3e-3, "bart": 1e-3}


def for_kind(cfg: TrainConfig, kind: str) -> TrainConfig:
    """cfg with the architecture's peak learning rate (and min_lr a tenth of it)."""
    return cfg.replace(lr=LR[kind], min_lr=LR[kind] / 10)


@accepts_old_names
def pretrain(model, kind: str, data: SubjectLineData, cfg: TrainConfig = PRETRAIN, *, out=None,
             progress: bool = True, eval_batches: int = 4) -> dict:
    """Pretrain in place with the kind's denoising objective; returns the Trainer's summary + times."""
    from ..objectives.seq2seq import Seq2SeqLoss

    train, val = pretrain_data(kind, data, seed=cfg.seed)
    trainer = Trainer(model, Seq2SeqLoss(), train, cfg, out=out, tokenizer=data.tokenizer, progress=progress,
                      eval_data={"val": val.fixed_batches(cfg.batch_size, eval_batches, seed=cfg.seed + 7)})
    return trainer.fit()


# ---------------------------------------------------------------------- subject lines
@accepts_old_names
def finetune_subjects(model, data: SubjectLineData, cfg: TrainConfig = FINETUNE, *, out=None,
                      progress: bool = True, label_smoothing: float = 0.0, heldout_loss: bool = True) -> dict:
    """Teacher-forced fine-tuning on (body -> subject) of the training e-mails; the held-out loss at the end."""
    from ..objectives.seq2seq import Seq2SeqExamples, Seq2SeqLoss

    tok = data.tokenizer
    train = Seq2SeqExamples(data.train_src, data.train_tgt, tok.pad_id, seed=cfg.seed)
    held = Seq2SeqExamples(data.held_src, data.held_tgt, tok.pad_id).batches(64) if heldout_loss else None
    trainer = Trainer(model, Seq2SeqLoss(label_smoothing), train, cfg, out=out, tokenizer=tok,
                      progress=progress, eval_data={"val": held} if held else None)
    summary = trainer.fit()
    summary["epochs"] = cfg.max_steps * cfg.batch_size / len(train)
    return summary


def evaluate_subjects(model, data: SubjectLineData, *, max_new_tokens: Optional[int] = None, num_beams: int = 1,
                      batch_size: int = 64) -> dict:
    """Generate a subject for every held-out body (greedy by default) -> mean ROUGE-L F1 and examples."""
    from ..objectives.seq2seq import greedy_targets

    tok = data.tokenizer
    t0 = time.perf_counter()
    max_new = max_new_tokens or data.info["max_target"]
    ids = greedy_targets(model, data.held_src, pad_id=tok.pad_id, eos_id=tok.eos_id, max_new_tokens=max_new,
                         batch_size=batch_size, num_beams=num_beams)
    preds = [clean(tok.decode(x)) for x in ids]
    scores = [rouge_l(p, r) for p, r in zip(preds, data.held_subjects)]
    return {"rouge_l": float(np.mean(scores)), "n": len(scores), "generate_s": time.perf_counter() - t0,
            "empty_predictions": sum(not p for p in preds), "distinct_predictions": len(set(preds)),
            "examples": [{"reference": r, "prediction": p} for r, p in list(zip(data.held_subjects, preds))[:8]]}


def baseline_scores(data: SubjectLineData, k: int = 6) -> dict:
    """A reference point without a model: the first k words of the body as the subject."""
    first = float(np.mean([rouge_l(" ".join(b.split()[:k]), s) for b, s in zip(data.held_bodies, data.held_subjects)]))
    return {f"first_{k}_words": first}


# ---------------------------------------------------------------------- named recipes
@dataclass(kw_only=True)
class Seq2SeqRecipe(Recipe):
    arch: str  # "t5" or "bart"
    pretrain: Optional[TrainConfig] = None  # denoising on sotu first (None: none)
    finetune: Optional[TrainConfig] = None  # subject lines after (None: none)
    task: str = "subjects"  # fine-tuning data: "subjects" (body -> subject) or "flan" (instruction mixture)
    seed: int = 0  # the model's initialisation and every stage's data order
    quick: bool = False  # a slice of the data (300k sotu characters, 200 e-mails): smoke runs
    kind = "seq2seq"

    def run(self, *, out: Path, data=None, progress: bool = True, resume: bool = False, verbose: bool = True) -> dict:
        """`data`: a SubjectLineData (prepare_data), or the data root (default: ../shared/data)."""
        return run_seq2seq(self, out=out, data=data, progress=progress)

    def report(self, r: dict) -> str:
        lines = [f"--- {r['recipe']}: {r['params']:,} parameters, {r['wall_time_s']:.0f} s"]
        for stage in ("pretrain", "finetune"):
            if stage in r:
                lines.append(f"{stage}: {r[stage]['step']} steps, final loss {r[stage]['loss']:.4f}, "
                             f"held-out loss {r[stage]['val_loss'] if r[stage]['val_loss'] is not None else float('nan'):.4f}")
        if "heldout" in r:
            lines.append(f"held-out subject lines: ROUGE-L {r['heldout']['rouge_l']:.4f} on {r['heldout']['n']} e-mails")
        lines.append(f"model: {r['out']}")
        return "\n".join(lines)


register(Seq2SeqRecipe(
    name="t5-span-corruption-sotu",
    description="2+2x128 T5 pretrained with span corruption (15%, mean span 3, 128 inputs) on sotu.txt",
    arch="t5", pretrain=for_kind(PRETRAIN, "t5")))
register(Seq2SeqRecipe(
    name="bart-denoising-sotu", description="2+2x128 BART pretrained with text infilling (30%, Poisson(3)) + "
    "sentence permutation on 128-token sotu.txt windows", arch="bart", pretrain=for_kind(PRETRAIN, "bart")))
for _kind in ("t5", "bart"):
    register(Seq2SeqRecipe(
        name=f"{_kind}-subject-lines", description=f"2+2x128 {_kind.upper()} fine-tuned from scratch to write an "
        f"e-mail's subject line from its body (SpamAssassin, fixed 20% held out)", arch=_kind,
        finetune=for_kind(FINETUNE, _kind)))
    register(Seq2SeqRecipe(
        name=f"{_kind}-pretrained-subject-lines", description=f"{'span corruption' if _kind == 't5' else 'BART denoising'}"
        f" on sotu.txt, then subject lines", arch=_kind, pretrain=for_kind(PRETRAIN, _kind),
        finetune=for_kind(FINETUNE, _kind)))
register(Seq2SeqRecipe(
    name="flan-mixture", description="2+2x128 T5 span-corruption-pretrained on sotu.txt, then fine-tuned on a "
    "Flan-style instruction mixture (subject lines, spam/ham, sotu continuation; several templates each); scored on "
    "held-out subject lines asked with the first subject template", arch="t5", pretrain=for_kind(PRETRAIN, "t5"),
    finetune=for_kind(FINETUNE.replace(max_steps=300), "t5"), task="flan"))


def run_seq2seq(recipe: Seq2SeqRecipe, *, out, data=None, progress: bool = True) -> dict:
    """Run a recipe end to end; saves the model (with its tokenizer) and summary.json into `out`."""
    out = Path(out)
    t0 = time.perf_counter()
    if not isinstance(data, SubjectLineData):
        data = prepare_data(data, max_sotu_chars=300_000 if recipe.quick else None,
                            max_records=200 if recipe.quick else None)
    model = build(recipe.arch, data.tokenizer, seed=recipe.seed)
    result = {"recipe": recipe.name, "out": str(out), "params": model.num_params(), "data": data.info}
    if recipe.pretrain:
        result["pretrain"] = pretrain(model, recipe.arch, data, recipe.pretrain.replace(seed=recipe.seed),
                                      progress=progress)
    if recipe.finetune:
        model = with_dropout(model, 0.1)
        if recipe.task == "flan":
            data = instruction_data(data, seed=recipe.seed)
            result["mixture"] = data.info["mixture"]
        result["finetune"] = finetune_subjects(model, data, recipe.finetune.replace(seed=recipe.seed),
                                               progress=progress)
        result["heldout"] = evaluate_subjects(model, data)
    result["wall_time_s"] = time.perf_counter() - t0
    model.save(out, tokenizer=data.tokenizer)
    (out / "summary.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def instruction_data(data: SubjectLineData, records=None, seed: int = 0, chunk_chars: int = 600,
                     sotu_chars: int = 300_000) -> SubjectLineData:
    """The same data as Flan-style instructions: training pairs are a mixture of the TRAINING e-mails
    rendered as subject-line and spam/ham tasks and sotu passages as continuation tasks
    (zoo.seq2seq.render_instruction, several templates per task); the held-out sources ask for the
    subject with the first subject template (references unchanged)."""
    from ..zoo.seq2seq import flan_mixture, render_instruction

    if records is None:
        _, records, _ = load_sources(max_records=data.info["train_emails"] if data.info["train_emails"] < 1000 else None)
    tok, eos = data.tokenizer, data.tokenizer.eos_id
    src_len, tgt_len = data.info["max_source"], data.info["max_target"]
    text = tok.decode(data.sotu_train[: sotu_chars // 4].tolist())
    passages = [{"id": f"sotu-{i}", "text": text[i:i + chunk_chars]} for i in range(0, len(text) - chunk_chars, chunk_chars)]
    rows = flan_mixture({"subject": records, "classify": records, "continue": passages}, seed=seed)

    def enc(texts, n):
        return [ids[:n - 1] + [eos] for ids in tok.encode_batch(texts)]

    held = enc([render_instruction("subject", {"text": b}, template=0)[0] for b in data.held_bodies], src_len)
    counts = {k: sum(r[0] == k for r in rows) for k in ("subject", "classify", "continue")}
    return SubjectLineData(tok, data.sotu_train, data.sotu_val, enc([r[1] for r in rows], src_len),
                           enc([r[2] for r in rows], tgt_len), held, data.held_tgt, data.held_subjects,
                           data.held_bodies, {**data.info, "mixture": counts})
