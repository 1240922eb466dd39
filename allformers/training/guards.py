"""The guards every training run passes before it reads data, builds a model or touches its
output folder (issue 17): training settings in range, a device that exists, an output folder that
can be written. And the one rule for an earlier run's records: a fresh run moves them aside
(metrics.prev.jsonl, loss.prev.png, numbered when those are taken), it never deletes them."""
from __future__ import annotations

import errno
import math
import os
import re
from numbers import Integral, Real
from pathlib import Path

from ..errors import AllformersError, OutputError

RECORDS = ("metrics.jsonl", "loss.png")  # what a run appends to or redraws; kept aside by a fresh run
ASIDE = re.compile(r"^(metrics|loss)\.prev(-\d+)?\.(jsonl|png)$")  # where they go
DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class TrainingError(AllformersError, ValueError):
    """A training setting is inconsistent, or a checkpoint cannot be resumed."""


# ---------------------------------------------------------------------- settings
def _whole(cfg, name: str, least: int, meaning: str = "") -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, Integral) or v < least:
        raise TrainingError(f"{name}={v!r} must be a whole number >= {least}{meaning} (CLI: --{name.replace('_', '-')})")


def _real(cfg, name: str, low: float, low_open: bool = False, meaning: str = "") -> None:
    v = getattr(cfg, name)
    number = not isinstance(v, bool) and isinstance(v, Real) and math.isfinite(v)
    if not number or (v <= low if low_open else v < low):
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        raise TrainingError(f"{name}={v!r} must be a finite number {bound}{meaning} (CLI: --{name.replace('_', '-')})")


def check_train_config(cfg) -> None:
    """Every TrainConfig field in its allowed range, checked when the config is made (so a run with
    --batch-size 0 fails before it reads, builds or writes anything)."""
    for name in ("max_steps", "batch_size", "grad_accum", "log_interval"):
        _whole(cfg, name, 1)
    for name, meaning in (("warmup_steps", " (0 = no warmup)"), ("eval_interval", " (0 = only at the end)"),
                          ("checkpoint_interval", " (0 = only at the end)")):
        _whole(cfg, name, 0, meaning)
    if cfg.lr_decay_steps is not None:
        _whole(cfg, "lr_decay_steps", 1, " (None = max_steps)")
    if cfg.threads is not None:
        _whole(cfg, "threads", 1, " (None = torch's default)")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, Integral):
        raise TrainingError(f"seed={cfg.seed!r} must be a whole number (CLI: --seed)")
    _real(cfg, "lr", 0.0, low_open=True, meaning=" (the peak learning rate, e.g. 3e-4)")
    _real(cfg, "min_lr", 0.0, meaning=" (where the cosine ends, <= lr)")
    _real(cfg, "weight_decay", 0.0)
    _real(cfg, "grad_clip", 0.0, meaning=" (0 = off)")
    _real(cfg, "eps", 0.0, low_open=True)
    for name in ("beta1", "beta2"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, Real) or not 0 <= v < 1:
            raise TrainingError(f"{name}={v!r} must be in [0, 1) (AdamW's moving-average factor, e.g. 0.9 or 0.99)")
    if not isinstance(cfg.device, str) or not DEVICE.match(cfg.device):
        raise TrainingError(f"device={cfg.device!r} is not a device; use cpu, cuda, cuda:N, mps or auto")
    if cfg.optimizer_impl not in ("auto", "foreach", "fused", "for-loop"):
        raise TrainingError(f"optimizer_impl={cfg.optimizer_impl!r}: use auto, foreach, fused or for-loop")


def check_schedule(cfg) -> None:
    """What only a run needs (checked when it starts, not when a config is made or changed one field
    at a time): the cosine must fall from lr to min_lr."""
    if cfg.min_lr > cfg.lr:
        raise TrainingError(f"min_lr={cfg.min_lr:g} is above lr={cfg.lr:g}; the cosine decays from lr to min_lr: "
                            f"lower --min-lr or raise --lr")


def check_device(device) -> None:
    """Refuse a device this machine does not have (torch would fail deep inside .to(device))."""
    import torch

    name = str(device or "auto")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainingError(f"--device {name}: CUDA is not available on this machine (torch "
                                f"{torch.__version__}, {'a CPU-only build' if torch.version.cuda is None else 'no GPU seen'}); "
                                f"use --device cpu or auto")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise TrainingError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                                f"use cuda:0 ... cuda:{torch.cuda.device_count() - 1}")
    elif name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise TrainingError("--device mps: Apple's MPS is not available on this machine; use --device cpu or auto")


# ---------------------------------------------------------------------- the output folder
def _nearest_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def check_out(out, what: str = "output folder") -> Path:
    """Refuse an output folder a run could not write: a file, a path under a file, a read-only or
    unwritable place. Checked before the run starts; creates nothing (a probe file comes and goes)."""
    out = Path(out)
    if os.path.lexists(out) and not out.is_dir():
        raise OutputError(f"the {what} {out} is a file; give the path of a folder (new, empty or an earlier run's)")
    parent = _nearest_existing(out)
    if not parent.is_dir():
        raise OutputError(f"cannot create the {what} {out}: {parent} is a file; choose a folder that is not "
                            f"under a file")
    probe = parent / f".allformers-probe-{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.remove(probe)
    except OSError as e:
        why = {errno.EROFS: "the file system is read-only", errno.ENOSPC: "the disk is full"}.get(
            e.errno, "permission denied" if e.errno in (errno.EACCES, errno.EPERM) else e.strerror)
        raise OutputError(f"cannot write the {what} {out} ({why}); choose a folder you can write") from None
    return out


def check_output_file(path, inputs=(), what: str = "--output") -> Path:
    """A file a command will write: not one of its inputs, not a folder, its folder writable."""
    path = Path(path)
    for src in inputs:
        if Path(src).resolve() == path.resolve() or (path.exists() and Path(src).exists()
                                                     and os.path.samefile(src, path)):
            raise OutputError(f"{what} {path} is the input file; writing it would destroy the input: "
                                f"give another path")
    if path.is_dir():
        raise OutputError(f"{what} {path} is a folder; give the path of a file")
    check_out(path.parent if str(path.parent) else Path("."), what=f"folder of {what} {path}")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{what} {path} is not writable; give another path")
    return path


def keep_aside(out: Path) -> list:
    """A fresh run in a used folder: move the last run's metrics and plot aside (never delete them),
    so the new curve does not continue the old one. Returns the new names."""
    moved = []
    for name in RECORDS:
        src = out / name
        if not src.is_file():
            continue
        stem, ext = name.split(".")
        n, dst = 1, out / f"{stem}.prev.{ext}"
        while os.path.lexists(dst):  # an earlier aside copy is kept too
            n += 1
            dst = out / f"{stem}.prev-{n}.{ext}"
        src.replace(dst)
        moved.append(dst)
    return moved
