"""Supervised fine-tuning of a causal LM on prompt/response records, fully or with LoRA.

    from allformers.recipes.sft import run_sft
    from allformers.models import LoRAConfig
    result = run_sft("smollm2", "data/alpaca.jsonl", "runs/sft", template="alpaca",
                     lora=LoRAConfig(rank=8, alpha=16), merge=True, max_steps=100)
    model = result["trained_model"]  # in memory; also saved into runs/sft

Step by step:
  * data: a JSON-lines file (or a list) of Alpaca records {instruction, input?, output} or chat
    records {messages}; each becomes prompt + response + eos with the loss on the response and
    eos only (allformers/objectives/sft.py). A fixed share (by hash of the record) is held out
    and its response loss is evaluated before and after training.
  * model: a path / bundled name ("smollm2") or a model object (PPO and DPO pass their own).
    With `lora`, every base weight is frozen and adapters train instead.
  * training: the library's Trainer with the SFT objective; `pack` fills rows of max_length
    tokens with several examples, attention isolated per example.
  * output (when `out` is given): a model folder in our format with the tokenizer (and a chat
    template, so `allformers chat OUT` works): the full model after full fine-tuning or with
    `merge`; else a small adapter folder that names its base (allformers.load reads it too).
    Also sft.json (settings, losses), metrics.jsonl and loss.png."""
from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from ..checkpoints.composite import save_adapter
from ..data.split import hash_split, key_hash
from ..deprecation import accepts_old_names
from ..models.lora import LoRAConfig, apply_lora, lora_parameters, merge_lora
from ..objectives.sft import (TEMPLATES, SFTData, SFTError, SFTLoss, check_record, collate, encode_example,
                              template_for_saving)
from ..training.data import read_jsonl
from ..training.guards import check_device, check_out
from ..training.trainer import CHECKPOINT_DIR, TrainConfig, Trainer
from .registry import Recipe, register, settings_of

SUMMARY_FILE = "sft.json"


def read_sft_records(path) -> list[dict]:
    """Every record of a JSON-lines file, each checked; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise SFTError(f"{path} does not exist or is not a file; pass a JSON-lines file of "
                       f"{{instruction, input, output}} or {{messages}} records")
    records = []
    for n, rec in read_jsonl(path, SFTError):
        check_record(rec, f"{path} line {n}")
        records.append(rec)
    if not records:
        raise SFTError(f"{path} has no records")
    return records


def record_key(record: dict) -> str:
    return key_hash(json.dumps(record, sort_keys=True))


def heldout(records: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, held out): fraction * n distinct records (rounded half up, at least one when fraction > 0),
    those with the smallest hash, are held out (data.split.hash_split), copies of a record together,
    independent of the seed and the file's order."""
    if fraction <= 0:
        return records, []
    train, held = hash_split(records, fraction, key=lambda r: json.dumps(r, sort_keys=True), min_held=1, error=SFTError)
    return [records[i] for i in train], [records[i] for i in held]


def load_base(model, tokenizer=None):
    """(model, tokenizer, base path or None) from a path, a bundled name or a model object."""
    if isinstance(model, torch.nn.Module):
        tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        source = None
    else:
        from .. import load
        from ..zoo.assets import resolve_model

        source = Path(resolve_model(str(model))).resolve()
        model = load(source)
        print(f"[allformers] {model.load_report}", file=sys.stderr)
        tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tok is None:
        raise SFTError("SFT needs the model's tokenizer: load a folder saved with its tokenizer or pass tokenizer=")
    if not getattr(model.config, "causal", False) or getattr(model.config, "is_encoder_decoder", False):
        raise SFTError("SFT here trains decoder-only causal LMs (e.g. smollm2); this model is not one")
    return model, tok, source


def encode_all(records: list[dict], tokenizer, template: str, max_length: int) -> tuple[list, int, int]:
    """(examples, skipped, truncated): skipped records keep no response token within max_length."""
    examples, skipped, truncated = [], 0, 0
    for i, r in enumerate(records):
        try:
            e = encode_example(r, tokenizer, template, max_length)
        except SFTError as err:
            raise SFTError(f"record {i} ({json.dumps(r)[:60]}...): {err}") from None
        if e is None:
            skipped += 1
            continue
        truncated += e.labels[-1] != tokenizer.eos_id  # the eos was cut off
        examples.append(e)
    return examples, skipped, truncated


@accepts_old_names
def run_sft(model: Union[str, Path, torch.nn.Module] = "smollm2", data: Union[str, Path, list] = None,
            out: Optional[Union[str, Path]] = None, *, template: str = "chatml", tokenizer=None,
            lora: Optional[LoRAConfig] = None, merge: bool = False, pack: bool = False, max_length: Optional[int] = None,
            max_steps: int = 100, batch_size: int = 8, grad_accum: int = 1, lr: Optional[float] = None,
            min_lr: Optional[float] = None, warmup_steps: Optional[int] = None, weight_decay: float = 0.0,
            eval_fraction: float = 0.1, eval_interval: int = 0, eval_batch_size: int = 8,
            max_records: Optional[int] = None, log_interval: int = 1, seed: int = 0,
            threads: Optional[int] = None, device: str = "auto", progress: bool = True,
            verbose: bool = True) -> dict:
    """Fine-tune `model` on `data` (see the module docstring). Returns a summary (also written to
    out/sft.json) with the held-out response loss before and after, and `trained_model`."""
    t0 = time.perf_counter()
    log = (lambda *a: print(*a, file=sys.stderr)) if verbose else (lambda *a: None)
    # every setting, the device and the output folder are checked before anything is read or loaded
    check_settings(template, data, lora, merge, max_length)
    lr = lr if lr is not None else (2e-4 if lora is not None else 2e-5)
    cfg = TrainConfig(max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                      min_lr=min_lr if min_lr is not None else lr / 10,
                      warmup_steps=warmup_steps if warmup_steps is not None else max_steps // 10,
                      weight_decay=weight_decay, beta1=0.9, beta2=0.999, grad_clip=1.0,
                      eval_interval=eval_interval, eval_at_start=True, log_interval=log_interval,
                      seed=seed, device=device, threads=threads)
    check_device(device)
    out = Path(out) if out is not None else None
    if out is not None:
        check_out(out)
    if threads:
        torch.set_num_threads(threads)
    records, data_name = sft_records(data, max_records)

    model, tok, source = load_base(model, tokenizer)
    max_length = max_length if max_length is not None else min(512, model.config.block_size)  # 0 is refused below
    check_max_length(max_length, model.config.block_size)
    train_recs, eval_recs = heldout(records, eval_fraction)
    train_ex, skipped, truncated = encode_all(train_recs, tok, template, max_length)
    eval_ex, _, _ = encode_all(eval_recs, tok, template, max_length)
    if not train_ex:
        raise SFTError(f"no training example keeps a response token within max_length={max_length}; raise it")
    examples = {"train": len(train_ex), "heldout": len(eval_ex), "skipped": skipped, "truncated": truncated,
                "train_response_tokens": sum(sum(t != -100 for t in e.labels) for e in train_ex)}
    log(f"[allformers] {data_name}: {len(train_ex)} train / {len(eval_ex)} held-out examples, template {template}; "
        f"{examples['train_response_tokens']} response tokens of {sum(len(e) for e in train_ex)}; {skipped} skipped, "
        f"{truncated} truncated at max_length={max_length}")

    torch.manual_seed(seed)  # the adapters' initial A
    wrapped, trainable, total = add_adapters(model, lora, log)
    save_tok = copy.copy(tok)  # saved with a chat template, so `allformers chat OUT` prompts as trained
    save_tok.chat_template = template_for_saving(tok, template)
    # (out was checked at the start; a fresh run's Trainer keeps the last run's records aside)
    train_data = SFTData(train_ex, tok.pad_id, pack=pack, block_size=max_length, seed=seed)
    evals = ({"val": [collate(eval_ex[i:i + eval_batch_size], tok.pad_id)
                      for i in range(0, len(eval_ex), eval_batch_size)]} if eval_ex else None)
    trainer = Trainer(model, SFTLoss(), train_data, cfg, eval_data=evals, out=out, tokenizer=save_tok,
                      progress=progress)
    fit = trainer.fit()

    if lora is not None and merge:
        merge_lora(model)
    model.tokenizer = save_tok
    saved = save_outputs(model, save_tok, out, lora, merge, source) if out is not None and trainer.is_main else None
    summary = {
        "model": str(source) if source is not None else "(model object)", "data": data_name, "template": template,
        "out": str(out) if out is not None else None, "saved": saved, "pack": pack, "max_length": max_length,
        "lora": {"rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout, "targets": list(lora.targets),
                 "wrapped": len(wrapped), "merged": merge} if lora is not None else None,
        "trainable_params": trainable, "total_params": total, "examples": examples,
        "settings": {"max_steps": max_steps, "batch_size": batch_size, "grad_accum": grad_accum, "lr": lr,
                     "min_lr": cfg.min_lr, "warmup_steps": cfg.warmup_steps, "weight_decay": weight_decay,
                     "seed": seed, "threads": torch.get_num_threads()},
        **loss_summary(trainer, fit, t0),
    }
    if out is not None and trainer.is_main:
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    summary["trained_model"] = model
    return summary


def add_adapters(model, lora: Optional[LoRAConfig], log) -> tuple[list, int, int]:
    """(wrapped Linears, trainable, total parameters) after LoRA (when given) freezes the base."""
    wrapped = apply_lora(model, lora) if lora is not None else []
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if lora is not None:
        log(f"[allformers] LoRA rank {lora.rank}, alpha {lora.alpha} on {len(wrapped)} Linears: "
            f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")
    return wrapped, trainable, total


def check_settings(template: str, data, lora, merge: bool, max_length: Optional[int]) -> None:
    """The settings run_sft can refuse before it reads or loads anything."""
    if template not in TEMPLATES:
        raise SFTError(f"unknown template {template!r}; use one of {list(TEMPLATES)}")
    if data is None:
        raise SFTError("no data: pass a JSON-lines file (or a list of records)")
    if merge and lora is None:
        raise SFTError("merge only applies to LoRA training (full fine-tuning already changes the weights)")
    if max_length is not None and max_length < 8:
        raise SFTError(f"max_length={max_length} is too short for a prompt and a reply; use >= 8 (or leave it out: "
                       f"512 or the model's context)")


def check_max_length(max_length: int, block_size: int) -> None:
    if max_length > block_size:
        raise SFTError(f"max_length={max_length} is longer than the model's block_size={block_size}")
    if max_length < 8:
        raise SFTError(f"max_length={max_length} is too short for a prompt and a reply")


def sft_records(data, max_records: Optional[int]) -> tuple[list[dict], str]:
    """(records, a name for the log) from a JSON-lines path or an in-memory list, each record checked."""
    if isinstance(data, (list, tuple)):
        for i, r in enumerate(data):
            check_record(r, f"record {i}")
        records, name = list(data), f"{len(data)} records"
    else:
        records, name = read_sft_records(data), str(data)
    return (records[:max_records] if max_records is not None else records), name


def save_outputs(model, tokenizer, out: Path, lora, merge: bool, source) -> str:
    """Write the trained model (full or merged) or its adapters into out; -> what was saved."""
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)  # optimizer state: not needed after the run
    if lora is None or merge:
        from .finetune import save_final

        save_final(model, tokenizer, out)
        return "merged model" if merge else "model"
    base = source
    if base is None:  # an in-memory model: its frozen weights go beside the adapters
        base = out / "base"
        frozen = copy.deepcopy(model)
        with torch.no_grad():
            for p in lora_parameters(frozen):
                p.zero_()  # a zero update: merging gives back the base weights
        merge_lora(frozen).save(base, tokenizer=tokenizer)
    tmp = out / ".adapter.tmp"
    save_adapter(model, tmp, lora, base.resolve(), tokenizer=tokenizer)
    for f in tmp.iterdir():
        f.replace(out / f.name)
    shutil.rmtree(tmp, ignore_errors=True)
    return "adapters"


def loss_summary(trainer: Trainer, fit: dict, t0: float) -> dict:
    """The held-out and training losses, speed, times and files of a finished fit, as summary keys."""
    eval_losses = [r["val_loss"] for r in trainer.history if r["event"] == "eval"]
    train_losses = trainer.history_train_losses()
    first_or_none = lambda xs, i: xs[i] if xs else None  # noqa: E731
    return {"heldout_loss_before": first_or_none(eval_losses, 0), "heldout_loss_after": first_or_none(eval_losses, -1),
            "first_train_loss": first_or_none(train_losses, 0), "final_train_loss": first_or_none(train_losses, -1),
            "response_tokens_per_s": fit["tokens_per_s"],
            "times_s": {"fit": fit["fit_time_s"], "train": fit["train_time_s"], "total": time.perf_counter() - t0},
            "metrics_file": fit["metrics"], "plot": fit["plot"]}


# ---------------------------------------------------------------------- the named recipe
@dataclass(kw_only=True)
class SFTRecipe(Recipe):
    """run_sft()'s settings as a recipe (the same names and defaults)."""

    model: str = "smollm2"
    data: Optional[str] = None  # a JSON-lines file of SFT records
    template: str = "chatml"
    lora: Optional[LoRAConfig] = None
    merge: bool = False
    pack: bool = False
    max_length: Optional[int] = None
    max_steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    lr: Optional[float] = None
    min_lr: Optional[float] = None
    warmup_steps: Optional[int] = None
    weight_decay: float = 0.0
    eval_fraction: float = 0.1
    eval_interval: int = 0
    eval_batch_size: int = 8
    max_records: Optional[int] = None
    log_interval: int = 1
    seed: int = 0
    threads: Optional[int] = None
    device: str = "auto"
    kind = "sft"

    def with_max_steps(self, n: int) -> "SFTRecipe":
        return dataclasses.replace(self, max_steps=n)

    def run(self, *, out: Path, data=None, progress: bool = True, resume: bool = False, verbose: bool = True) -> dict:
        kw = settings_of(self)
        kw["data"] = data if data is not None else self.data
        result = run_sft(out=out, progress=progress, verbose=verbose, **kw)
        result.pop("trained_model")
        return result

    def report(self, result: dict) -> str:
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        return (f"trained {result['settings']['max_steps']} steps in {result['times_s']['train']:.0f} s "
                f"({result['trainable_params']:,} of {result['total_params']:,} parameters trained)\n"
                f"held-out response loss: {fmt(result['heldout_loss_before'])} -> {fmt(result['heldout_loss_after'])}; "
                f"train loss {fmt(result['first_train_loss'])} -> {fmt(result['final_train_loss'])}\n"
                f"saved {result['saved']} to {result['out']} (allformers chat {result['out']})\n"
                f"metrics: {result['metrics_file']}\nplot: {result['plot']}")


def _seed_tasks() -> str:
    from .self_instruct import SEED_TASKS

    return str(SEED_TASKS)


register(SFTRecipe(
    name="sft-smollm2-lora", description="LoRA (rank 8, alpha 16) SFT of the bundled SmolLM2-135M-Instruct with "
    "Alpaca's prompt, merged into a plain model; default data: the 20 seed tasks shipped with allformers (a smoke "
    "run: pass --data FILE.jsonl, e.g. the self-instruct recipe's output)",
    data=_seed_tasks(), template="alpaca", lora=LoRAConfig(rank=8, alpha=16), merge=True, max_steps=20,
    batch_size=4, lr=1e-3, target="the held-out response loss falls; `allformers chat OUT` answers as trained"))
