"""Fine-tune any encoder into a sequence classifier (e-mail spam, sentiment, topics ...).

    from allformers.recipes.finetune import finetune
    result = finetune("minilm", "../shared/data/spam_assassin/train.jsonl", "runs/spam")
    # or the named recipe: allformers train --recipe spam-minilm

What happens, step by step:
  * data: a JSON-lines file, one object a line with `text`, `label` and optionally `id` and
    `subject`. The model reads `record_text(r)`: the subject, a blank line, then the body
    (just the body when there is no subject). Labels are discovered from the data, sorted,
    and stored in the config (`labels`), so the saved model names its classes.
  * split: a FIXED held-out part, `heldout_split`: within each label, records are ranked by
    the SHA-256 of their id and the first round(fraction * n) are held out. The split never
    changes with the seed or the order of the file, and it is exactly `fraction` of every label
    (rounded), so precision and recall are measured on the label mix of the data.
  * model: the source (an allformers or Hugging Face folder, or the bundled MiniLM) is loaded;
    its body's weights go into a `TaskModel(task="sequence-classification")`; the head is
    newly initialised (from `seed`) and the load report says so. LM heads the classifier does
    not use are dropped and listed.
  * training: the library's Trainer (progress bar, metrics.jsonl, loss.png, checkpoints) with a
    cross-entropy objective; the held-out part is its "val" evaluation set, and the objective
    counts a confusion matrix during those evaluations (the Trainer's `eval_metrics` hook), so
    accuracy, per-class precision and recall cost no extra pass.
  * output: `out` is a model folder in our format (config.json, model.safetensors, tokenizer)
    that `allformers.load(out)` and `allformers classify out` read, plus finetune.json (settings
    and held-out metrics), metrics.jsonl and loss.png."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ..data.split import hash_split, key_hash
from ..deprecation import accepts_old_names
from ..errors import AllformersError
from ..objectives.epochs import EpochSampler
from ..training.guards import check_device, check_out
from ..training.trainer import CHECKPOINT_DIR, TrainConfig, Trainer
from .registry import Recipe, register, settings_of

SUMMARY_FILE = "finetune.json"  # settings + held-out metrics, beside the weights
DEFAULT_DATA = Path("spam_assassin") / "train.jsonl"  # under the data root (../shared/data)


class FinetuneError(AllformersError, ValueError):
    """The fine-tuning data or settings are unusable."""


# ---------------------------------------------------------------------- records
def record_text(record: dict) -> str:
    """What the model reads: "subject\\n\\nbody", or the body alone when there is no subject."""
    subject = (record.get("subject") or "").strip()
    text = record.get("text") or ""
    return f"{subject}\n\n{text}" if subject else text


def resolve_data(data=None) -> Path:
    """A JSON-lines file: the path itself, else the same relative path (or a data set folder
    holding train.jsonl) under the data root (../shared/data or $ALLFORMERS_DATA). No argument:
    the SpamAssassin set under the data root."""
    from ..training.data import resolve_data_path

    return resolve_data_path(data, default=DEFAULT_DATA, inside="train.jsonl", error=FinetuneError,
                             what='a JSON-lines file with one {"text": ..., "label": ...} object a line')


def read_records(path, need_label: bool = True) -> list[dict]:
    """Every record of a JSON-lines file, checked: each line a JSON object with a `text` field
    (and a `label` when `need_label`). Errors name the file and the line; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FinetuneError(f"{path} does not exist or is not a file")
    from ..training.data import read_jsonl

    records = []
    for n, rec in read_jsonl(path, FinetuneError):
        if "text" not in rec:
            raise FinetuneError(f"{path} line {n} has no 'text' field (fields: {sorted(rec)}); every "
                                f"record needs 'text' (and optionally 'subject')")
        if not isinstance(rec["text"], str) or not isinstance(rec.get("subject") or "", str):
            raise FinetuneError(f"{path} line {n}: 'text' and 'subject' must be strings")
        if need_label and rec.get("label") is None:
            raise FinetuneError(f"{path} line {n} has no 'label' field; training records need one")
        rec["_line"] = n
        records.append(rec)
    if not records:
        raise FinetuneError(f"{path} is empty: no records to read (expected one JSON object a line)")
    return records


def discover_labels(records: list[dict]) -> list[str]:
    labels = sorted({str(r["label"]) for r in records})
    if len(labels) < 2:
        raise FinetuneError(f"the data has only one label ({labels}); a classifier needs at least two")
    return labels


def split_key(record: dict) -> str:
    """SHA-256 of the record's id (of its text when it has none): a stable, seed-free rank."""
    return key_hash(_split_id(record))


def _split_id(record: dict) -> str:
    key = record.get("id")
    return f"id:{key}" if key is not None else "text:" + record_text(record)


def heldout_split(records: list[dict], fraction: float = 0.2) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices): per label, the round(fraction * n) records with the
    smallest split_key are held out (data.split.hash_split). Independent of the seed and of the file's order."""
    if not 0.0 < fraction < 1.0:
        raise FinetuneError(f"eval fraction {fraction} must be between 0 and 1 (exclusive)")
    return hash_split(records, fraction, key=_split_id, by=lambda r: str(r.get("label")), error=FinetuneError)


# ---------------------------------------------------------------------- data for the Trainer
def encode(tokenizer, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids (N, T), token types (N, T), lengths (N,)): the tokenizer's own special tokens,
    truncated to max_length, right-padded."""
    b = tokenizer.batch(texts, max_length=max_length)
    return b["input_ids"], b["token_type_ids"], b["attention_mask"].sum(1)


def collate(ids, types, lengths, labels, rows, pad_id: int) -> dict:
    """A batch of `rows`, cut to its longest row: input_ids, attention_mask, token_type_ids, labels."""
    rows = torch.as_tensor(rows, dtype=torch.long)
    T = int(lengths[rows].max())
    x = ids[rows, :T]
    mask = (torch.arange(T)[None, :] < lengths[rows, None]).long()
    x = torch.where(mask.bool(), x, torch.full_like(x, pad_id))
    return {"input_ids": x, "attention_mask": mask, "token_type_ids": types[rows, :T] * mask,
            "labels": labels[rows]}


class ClassificationData(EpochSampler):
    """Tokenised examples sampled in epochs: each epoch is a fresh permutation from the sampler's
    own generator; `sample(n)` continues where the last batch stopped. Its state (generator,
    permutation, position) goes into checkpoints, so a resumed run sees the same batches."""

    def __init__(self, ids, types, lengths, labels, pad_id: int, seed: int = 0):
        self.ids, self.types, self.lengths, self.labels, self.pad_id = ids, types, lengths, labels, pad_id
        self.start_epochs(len(labels), seed)

    def __len__(self):
        return len(self.labels)

    def sample(self, n: int) -> dict:
        return collate(self.ids, self.types, self.lengths, self.labels, self.next_rows(n), self.pad_id)


def eval_batches(ids, types, lengths, labels, pad_id: int, batch_size: int) -> list[dict]:
    """Every example once, in batches of similar length (less padding; order does not matter)."""
    order = torch.argsort(lengths, descending=True, stable=True).tolist()
    return [collate(ids, types, lengths, labels, order[i:i + batch_size], pad_id)
            for i in range(0, len(order), batch_size)]


# ---------------------------------------------------------------------- the objective
class SequenceClassification:
    """Cross-entropy on (B, num_labels) logits. During evaluation (model in eval mode) it also
    counts a confusion matrix and the summed loss; `metrics()` turns them into accuracy and
    per-class precision / recall / F1 (summed over ranks under DDP) and starts a new count."""

    name = "sequence_classification"

    def __init__(self, labels: list[str], prefix: str = "val"):
        self.labels, self.prefix = list(labels), prefix
        self.last_confusion: list = []
        self.reset()

    def reset(self):
        """Start a new count (metrics() calls it; last_confusion keeps the finished one)."""
        k = len(self.labels)
        self.confusion = torch.zeros(k, k, dtype=torch.long)  # [true, predicted]
        self.loss_sum = torch.zeros((), dtype=torch.float64)

    def __call__(self, model, batch) -> torch.Tensor:
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                       token_type_ids=batch["token_type_ids"])  # (B, K)
        loss = F.cross_entropy(logits.float(), batch["labels"])
        if not model.training:
            with torch.no_grad():
                y, pred = batch["labels"].cpu(), logits.argmax(-1).cpu()
                k = len(self.labels)
                self.confusion += torch.bincount(y * k + pred, minlength=k * k).view(k, k)
                self.loss_sum += loss.double().cpu() * len(y)
        return loss

    @staticmethod
    def num_tokens(batch) -> int:
        return int(batch["attention_mask"].sum())

    def metrics(self) -> dict:
        import torch.distributed as dist

        conf, loss_sum = self.confusion.clone(), self.loss_sum.clone()
        if dist.is_available() and dist.is_initialized():
            both = torch.cat([conf.flatten().double(), loss_sum[None]])
            dist.all_reduce(both)
            conf, loss_sum = both[:-1].round().long().view_as(conf), both[-1]
        self.reset()
        self.last_confusion = conf.tolist()
        return summarise(conf, self.labels, prefix=self.prefix, loss_sum=float(loss_sum))


def summarise(confusion: torch.Tensor, labels: list[str], prefix: str = "val", loss_sum: Optional[float] = None) -> dict:
    """Flat {name: float} from a [true, predicted] confusion matrix: accuracy, mean loss and
    precision / recall of every class (keys `{prefix}_precision_{label}` ...)."""
    conf = torch.as_tensor(confusion).double()
    n = conf.sum().item()
    out = {f"{prefix}_accuracy": conf.diag().sum().item() / n if n else float("nan")}
    if loss_sum is not None:
        out[f"{prefix}_mean_loss"] = loss_sum / n if n else float("nan")
    for i, name in enumerate(labels):
        tp, predicted, actual = conf[i, i].item(), conf[:, i].sum().item(), conf[i].sum().item()
        p = tp / predicted if predicted else 0.0
        r = tp / actual if actual else 0.0
        out[f"{prefix}_precision_{name}"] = p
        out[f"{prefix}_recall_{name}"] = r
    return out


def f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r else 0.0


def metrics_table(metrics: dict, labels: list[str], confusion: list, prefix: str = "val") -> str:
    """Accuracy, a per-class precision / recall / F1 / support table and the confusion matrix."""
    w = max(8, *(len(str(lab)) for lab in labels))
    lines = [f"accuracy {metrics[f'{prefix}_accuracy']:.4f} on {sum(map(sum, confusion))} held-out records",
             f"{'label':<{w}}  precision  recall     f1  support"]
    for i, lab in enumerate(labels):
        p, r = metrics[f"{prefix}_precision_{lab}"], metrics[f"{prefix}_recall_{lab}"]
        lines.append(f"{lab:<{w}}  {p:9.4f}  {r:6.4f}  {f1(p, r):.4f}  {sum(confusion[i]):7d}")
    lines.append("confusion (rows: true, columns: predicted): "
                 + "; ".join(f"{lab}: {row}" for lab, row in zip(labels, confusion)))
    return "\n".join(lines)


# ---------------------------------------------------------------------- the model
def head_keys(model) -> list[str]:
    return [k for k in model.state_dict() if k.startswith("head.")]


def classifier_from(source, labels: list[str], *, seed: int = 0, dropout: Optional[float] = None,
                    pooling: Optional[str] = None, verbose: bool = True):
    """(classifier, tokenizer, LoadReport, dropped keys): `source`'s body under a freshly
    initialised sequence-classification head for `labels`. The source may be an embedding
    model, an LM (MLM or causal), or a classifier (whose head is kept when its labels match)."""
    from .. import load
    from ..checkpoints.io import load_state_dict_into
    from ..zoo.assets import resolve_model
    from ..models import build_model
    from ..models.heads import TaskModel

    path = resolve_model(str(source))
    base = load(path)
    tokenizer = getattr(base, "tokenizer", None)
    if tokenizer is None:
        raise FinetuneError(f"{source} has no tokenizer (tokenizer.json); fine-tuning needs one to read the text")
    c = base.config
    changes = dict(task="sequence-classification", labels=list(labels), lm_head=False,
                   description=f"{c.name or 'model'} fine-tuned for sequence classification ({', '.join(labels)})")
    if dropout is not None:
        changes["dropout"] = dropout
    if pooling is not None:
        changes["pooling"] = pooling
    elif c.causal:  # a causal model's first token has seen nothing: pool over all tokens
        changes["pooling"] = "mean"
    config = c.replace(**changes)
    state = base.state_dict()
    if isinstance(base, TaskModel):
        body = {k: v for k, v in state.items() if k.startswith("body.")}
        old_head = {k: v for k, v in state.items() if k.startswith("head.")}
    else:  # a bare TransformerLM: its keys are the body's
        body, old_head = {f"body.{k}": v for k, v in state.items()}, {}
    torch.manual_seed(seed)  # the new head's initial weights
    model = build_model(config)
    own = model.state_dict()
    keep = {k: v for k, v in body.items() if k in own}
    dropped = sorted(k for k in body if k not in own)
    reuse_head = (c.task == "sequence-classification" and [str(x) for x in (c.labels or [])] == list(labels)
                  and all(k in own and own[k].shape == v.shape for k, v in old_head.items()))
    if reuse_head:
        keep.update(old_head)
    else:
        dropped += sorted(old_head)
    report = load_state_dict_into(model, keep, str(path), strict=True, allow_init=tuple(head_keys(model)))
    if verbose:
        print(f"[allformers] {report}", file=sys.stderr)
        if dropped:
            shown = ", ".join(dropped[:6]) + (f" ... (+{len(dropped) - 6})" if len(dropped) > 6 else "")
            print(f"[allformers] dropped {len(dropped)} tensor(s) the classifier does not use: {shown}", file=sys.stderr)
    model.tokenizer = tokenizer
    return model, tokenizer, report, dropped


def save_final(model, tokenizer, out: Path) -> None:
    """Write the model files (our format) into `out` beside the training artefacts: saved into a
    temporary sibling first, then each file moved in, so a crash never leaves a half-written file."""
    from ..checkpoints.io import save

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".final-model.tmp"
    save(model, tmp, tokenizer=tokenizer)
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------- the whole run
@accepts_old_names
def finetune(model="minilm", data=None, out="runs/spam", *, epochs: float = 1.0, lr: float = 1e-4,
             batch_size: int = 16, max_length: int = 128, eval_fraction: float = 0.2, seed: int = 0,
             dropout: Optional[float] = 0.1, weight_decay: float = 0.01, warmup_fraction: float = 0.06,
             eval_interval: int = 0, eval_batch_size: int = 64, grad_accum: int = 1, max_records: Optional[int] = None,
             keep_checkpoint: bool = False, checkpoint_interval: int = 0, resume: bool = False,
             threads: Optional[int] = None, device: str = "auto", progress: bool = True,
             verbose: bool = True, max_steps: Optional[int] = None) -> dict:
    """Fine-tune `model` (a folder or "minilm") on `data` and save the classifier into `out`.
    Returns the summary also written to out/finetune.json: held-out metrics, confusion matrix,
    timings and every setting. `max_records` keeps a deterministic subset (by split key) for
    quick trials; `max_steps` replaces the step count `epochs` gives (smoke runs)."""
    t0 = time.perf_counter()
    log = (lambda *a: print(*a, file=sys.stderr)) if verbose else (lambda *a: None)
    if threads:
        torch.set_num_threads(threads)
    check_settings(epochs, batch_size, max_length, warmup_fraction)
    # every training setting, the device and the output folder, before the data and the model are read
    TrainConfig(max_steps=max_steps or 1, batch_size=batch_size, grad_accum=grad_accum, lr=lr, min_lr=lr / 10,
                weight_decay=weight_decay, eval_interval=eval_interval, checkpoint_interval=checkpoint_interval,
                seed=seed, device=device, threads=threads, warmup_steps=0)
    check_device(device)
    check_out(out)
    data_path = resolve_data(data)
    records = read_records(data_path)
    if max_records is not None and max_records < len(records):
        records = sorted(records, key=split_key)[:max_records]
    labels = discover_labels(records)
    train_idx, held_idx = heldout_split(records, eval_fraction)
    log(f"[allformers] {data_path}: {len(records)} records, labels {labels}; "
        f"{len(train_idx)} train / {len(held_idx)} held out ({eval_fraction:.0%} of each label, by id hash)")

    clf, tok, report, dropped = classifier_from(model, labels, seed=seed, dropout=dropout, verbose=verbose)
    if max_length > clf.config.block_size:
        raise FinetuneError(f"max_length={max_length} is longer than the model's block_size={clf.config.block_size}")
    t_model = time.perf_counter()

    train_data, evals, at_max = tensors(tok, records, labels, train_idx, held_idx, max_length, eval_batch_size, seed)
    t_data = time.perf_counter()
    log(f"[allformers] tokenised {len(records)} texts in {t_data - t_model:.1f} s; "
        f"{at_max:.0%} reach max_length={max_length}")

    steps = max_steps or max(1, math.ceil(epochs * len(train_idx) / batch_size))
    cfg = TrainConfig(max_steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr, min_lr=lr / 10,
                      warmup_steps=max(1, int(warmup_fraction * steps)) if warmup_fraction else 0,
                      weight_decay=weight_decay, beta1=0.9, beta2=0.999, grad_clip=1.0,
                      eval_interval=eval_interval, eval_at_start=False, log_interval=max(1, steps // 500),
                      checkpoint_interval=checkpoint_interval, seed=seed, device=device, threads=threads)
    out = Path(out)  # checked at the start; a fresh run's Trainer keeps the last run's records aside
    objective = SequenceClassification(labels)
    trainer, summary, metrics = fit_classifier(clf, tok, objective, train_data, evals, cfg, out, resume, progress, log)
    t_fit = time.perf_counter()

    if trainer.is_main:
        save_final(clf, tok, out)
        if not keep_checkpoint:
            shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    confusion = objective.last_confusion
    result = {
        "model": str(model), "data": str(data_path), "out": str(out), "labels": labels,
        "text": "subject + blank line + text (text alone without a subject)",
        "split": {"method": "per label, smallest sha256(id) first", "eval_fraction": eval_fraction,
                  "train": len(train_idx), "heldout": len(held_idx)},
        "accuracy": metrics.get("val_accuracy"), "heldout_loss": metrics.get("val_mean_loss"),
        "per_class": per_class(metrics, labels, confusion),
        "confusion": confusion,
        "settings": {"epochs": epochs, "steps": steps, "lr": lr, "batch_size": batch_size, "max_length": max_length,
                     "seed": seed, "dropout": clf.config.dropout, "weight_decay": weight_decay,
                     "warmup_steps": cfg.warmup_steps, "pooling": clf.config.pooling, "threads": torch.get_num_threads()},
        "newly_initialised": report.initialised, "dropped": dropped,
        "times_s": {"load": t_model - t0, "tokenise": t_data - t_model, "train_and_eval": t_fit - t_data,
                    "train": summary["train_time_s"], "total": time.perf_counter() - t0},
        "final_train_loss": summary["loss"], "tokens_per_s": summary["tokens_per_s"], "mfu": summary["mfu"],
        "metrics_file": summary["metrics"], "plot": summary["plot"],
    }
    if trainer.is_main:
        (out / SUMMARY_FILE).write_text(json.dumps(result, indent=2))
        result["table"] = metrics_table(metrics, labels, confusion)
    return result


def fit_classifier(clf, tok, objective, train_data, evals, cfg: TrainConfig, out: Path, resume: bool, progress: bool,
                   log):
    """(trainer, fit summary, held-out metrics): a Trainer run, resumed from out's checkpoint when asked."""
    trainer = Trainer(clf, objective, train_data, cfg, eval_data=evals, out=out, tokenizer=tok,
                      progress=progress, eval_metrics=objective.metrics)
    if resume and (out / CHECKPOINT_DIR).exists():
        trainer.load_checkpoint()
        log(f"[allformers] resumed from {out / CHECKPOINT_DIR} at step {trainer.step}")
    summary = trainer.fit()
    if not trainer.last_metrics:  # resumed at the last step: fit() had nothing left to evaluate
        trainer.last_eval = trainer.evaluate()
        trainer.last_metrics = objective.metrics()
    return trainer, summary, trainer.last_metrics


def check_settings(epochs: float, batch_size: int, max_length: int, warmup_fraction: float) -> None:
    if epochs <= 0 or batch_size <= 0 or max_length < 8:
        raise FinetuneError(f"need epochs > 0, batch_size > 0 and max_length >= 8 "
                            f"(got {epochs}, {batch_size}, {max_length})")
    if not 0 <= warmup_fraction < 1:
        raise FinetuneError(f"warmup_fraction={warmup_fraction} must be in [0, 1) (the share of steps spent warming up)")


def tensors(tok, records: list[dict], labels: list[str], train_idx, held_idx, max_length: int, eval_batch_size: int,
            seed: int):
    """(training data, {"val": held-out batches}, share of texts cut at max_length): every record
    tokenised once, then indexed into the two sides of the split."""
    label_id = {lab: i for i, lab in enumerate(labels)}
    ids, types, lengths = encode(tok, [record_text(r) for r in records], max_length)
    y = torch.tensor([label_id[str(r["label"])] for r in records], dtype=torch.long)
    tr, ho = torch.tensor(train_idx), torch.tensor(held_idx)
    train_data = ClassificationData(ids[tr], types[tr], lengths[tr], y[tr], tok.pad_id, seed=seed)
    evals = {"val": eval_batches(ids[ho], types[ho], lengths[ho], y[ho], tok.pad_id, eval_batch_size)}
    return train_data, evals, (lengths >= max_length).float().mean().item()


def per_class(metrics: dict, labels: list[str], confusion) -> dict:
    """{label: precision, recall, f1, support} from the objective's held-out metrics."""
    rows = confusion or [[]] * len(labels)
    return {lab: {"precision": metrics.get(f"val_precision_{lab}"), "recall": metrics.get(f"val_recall_{lab}"),
                  "f1": f1(metrics.get(f"val_precision_{lab}", 0.0), metrics.get(f"val_recall_{lab}", 0.0)),
                  "support": sum(row) if row else 0}
            for lab, row in zip(labels, rows)}


def training_settings(path) -> dict:
    """The settings a fine-tuned folder was trained with (finetune.json), or {}."""
    f = Path(path) / SUMMARY_FILE
    try:
        return json.loads(f.read_text()).get("settings", {}) if f.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


# ---------------------------------------------------------------------- the named recipe
@dataclass(kw_only=True)
class FinetuneRecipe(Recipe):
    """finetune()'s settings as a recipe (the same names and defaults)."""

    model: str = "minilm"
    data: Optional[str] = None  # default: spam_assassin/train.jsonl under the data root
    epochs: float = 1.0
    lr: float = 1e-4
    batch_size: int = 16
    max_length: int = 128
    eval_fraction: float = 0.2
    seed: int = 0
    dropout: Optional[float] = 0.1
    weight_decay: float = 0.01
    warmup_fraction: float = 0.06
    eval_interval: int = 0
    eval_batch_size: int = 64
    grad_accum: int = 1
    max_records: Optional[int] = None
    keep_checkpoint: bool = False
    checkpoint_interval: int = 0
    threads: Optional[int] = None
    device: str = "auto"
    max_steps: Optional[int] = None
    kind = "fine-tuning"

    def with_max_steps(self, n: int) -> "FinetuneRecipe":
        return dataclasses.replace(self, max_steps=n)

    def run(self, *, out: Path, data=None, progress: bool = True, resume: bool = False, verbose: bool = True) -> dict:
        kw = settings_of(self)
        kw["data"] = data if data is not None else self.data
        return finetune(out=out, resume=resume, progress=progress, verbose=verbose, **kw)

    def report(self, result: dict) -> str:
        t, s = result["times_s"], result["settings"]
        return (f"{result['table']}\ntrained {s['steps']} steps ({s['epochs']} epochs, max_length {s['max_length']}) "
                f"in {t['train']:.0f} s; total {t['total']:.0f} s\n"
                f"model: {result['out']} (allformers classify {result['out']} --input FILE.jsonl)\n"
                f"metrics: {result['metrics_file']}\nplot: {result['plot']}")


register(FinetuneRecipe(
    name="spam-minilm", description="the bundled all-MiniLM-L6-v2 fine-tuned into a spam / ham classifier on "
    "SpamAssassin: 1 epoch over 80%, the fixed 20% of each label (by id hash) held out and scored",
    target="98.04% held-out accuracy (benchmarks/bench_spam.py)"))
