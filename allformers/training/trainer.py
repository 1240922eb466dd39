"""One training loop for every objective: the loss is passed in (`loss_fn(model, batch) -> loss`),
so causal LM, MLM, seq2seq, reward models and PPO all reuse it; nothing here asks which model
it trains.

What it does: AdamW with decay groups, warmup + cosine schedule, gradient clipping and
accumulation, DDP under torchrun (each rank takes its slice of one global batch), periodic
evaluation, JSONL metrics, a loss plot, a tqdm bar with loss / tokens/s / MFU, and checkpoints
that resume exactly (model, optimizer, step, every rank's RNG and the data generator)."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ..deprecation import accepts_old_names, old_attribute, renamed_kwargs
from .guards import TrainingError, check_device, check_out, check_schedule, check_train_config, keep_aside
from .mfu import flops_per_token, measured_peak_flops

STATE_FILE = "trainer_state.pt"
CHECKPOINT_DIR = "checkpoint"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


@dataclass
class TrainConfig:
    max_steps: int = 2000
    batch_size: int = 12  # sequences per optimizer step, summed over ranks and micro-batches
    grad_accum: int = 1  # micro-batches per step: each is batch_size / (world_size * grad_accum) rows
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    lr_decay_steps: Optional[int] = None  # None -> max_steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 turns clipping off
    eval_interval: int = 250  # 0: evaluate only at the end
    eval_at_start: bool = True
    log_interval: int = 10
    checkpoint_interval: int = 0  # 0: checkpoint only at the end
    checkpoint: bool = True  # False: never write OUT/checkpoint (metrics and plot still go to OUT)
    seed: int = 1337
    device: str = "auto"  # "auto" -> cuda when available, else cpu
    threads: Optional[int] = None  # None: torch's default (one process) or cores / local ranks (DDP)
    optimizer_impl: str = "auto"  # "foreach", "fused", "for-loop" or "auto"

    # the old spellings, read-only (a DeprecationWarning says the new name)
    max_iters = old_attribute("max_steps", "max_iters")
    warmup_iters = old_attribute("warmup_steps", "warmup_iters")
    lr_decay_iters = old_attribute("lr_decay_steps", "lr_decay_iters")
    num_threads = old_attribute("threads", "num_threads")

    def __post_init__(self):  # every field in range when the config is made (training/guards.py)
        check_train_config(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = renamed_kwargs(d, "TrainConfig")  # settings written before the names were unified
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TrainingError(f"unknown training setting(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def replace(self, **changes) -> "TrainConfig":
        return self.from_dict({**self.to_dict(), **renamed_kwargs(changes, "TrainConfig.replace")})


TrainConfig.__init__ = accepts_old_names(TrainConfig.__init__)  # TrainConfig(max_iters=...) still works


# ---------------------------------------------------------------------- pieces
def lr_at(step: int, cfg: TrainConfig) -> float:
    """nanoGPT's schedule for the step about to be taken (0-based): linear warmup, cosine to min_lr."""
    decay_steps = cfg.lr_decay_steps or cfg.max_steps
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if step >= decay_steps:
        return cfg.min_lr
    ratio = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


def decay_groups(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """Names of the parameters that get weight decay (matmul weights and embedding tables, >= 2-D)
    and of those that do not (biases, norm gains: 1-D)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # tied weights appear once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(name)
    return decay, no_decay


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    params = dict(model.named_parameters())
    decay, no_decay = decay_groups(model)
    groups = [{"params": [params[n] for n in decay], "weight_decay": cfg.weight_decay},
              {"params": [params[n] for n in no_decay], "weight_decay": 0.0}]
    impl = cfg.optimizer_impl
    if impl == "auto":  # fused: one kernel per step; CPU has had it since torch 2.4 (as fast or faster here)
        impl = "fused" if device.type in ("cuda", "cpu") else "foreach"
    flags = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}
    if impl not in flags:
        raise TrainingError(f"optimizer_impl={impl!r} is not one of {list(flags) + ['auto']}")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **flags[impl])


def split_loss(out) -> tuple[torch.Tensor, Optional[dict]]:
    """A loss_fn returns a loss, or (loss, {name: float}) to have more numbers logged beside it
    (PPO's reward, KL and clip fraction; a reward model's accuracy)."""
    if isinstance(out, tuple):
        return out[0], out[1]
    return out, None


def take_rows(batch, start: int, stop: int):
    """Rows [start, stop) of every tensor in a batch (tensor, tuple, list, namedtuple or dict)."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, dict):
        return {k: take_rows(v, start, stop) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(take_rows(v, start, stop) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(take_rows(v, start, stop) for v in batch)
    return batch  # non-tensor metadata is shared by every slice


def to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def first_tensor(batch) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    values = batch.values() if isinstance(batch, dict) else batch
    for v in values:
        if isinstance(v, (torch.Tensor, dict, tuple, list)):
            t = first_tensor(v)
            if t is not None:
                return t
    return None


def init_distributed(device_type: str) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's env vars; joins the process group once."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


# ---------------------------------------------------------------------- the trainer
class Trainer:
    """trainer = Trainer(model, loss_fn, train_data, TrainConfig(...), eval_data={"val": batches})
    trainer.fit()

    train_data: has `sample(n) -> batch` (rows first) and optionally state_dict/load_state_dict
    (a RandomWindows). eval_data: {name: list of batches}; the same batches every evaluation.
    Seeds torch's global RNG (dropout) with seed + rank."""

    @accepts_old_names
    def __init__(self, model: torch.nn.Module, loss_fn: Callable, train_data, config: Optional[TrainConfig] = None,
                 *, eval_data: Optional[dict] = None, out=None, tokenizer=None, progress: bool = True,
                 eval_metrics: Optional[Callable[[], dict]] = None):
        self.cfg = cfg = config or TrainConfig()
        check_device(cfg.device)
        if out is not None:
            check_out(out)
        want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        self.rank, self.world_size, local_rank = init_distributed("cuda" if want_cuda else "cpu")
        self.is_main = self.rank == 0
        if cfg.device == "auto":
            self.device = torch.device(f"cuda:{local_rank}" if want_cuda else "cpu")
        else:
            self.device = torch.device(f"cuda:{local_rank}" if cfg.device == "cuda" and self.world_size > 1
                                       else cfg.device)
        self._set_threads()
        self._check(cfg)
        torch.manual_seed(cfg.seed + self.rank)  # dropout: its own stream per rank

        self.raw_model = model.to(self.device)
        self.model = self.raw_model
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(self.raw_model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.loss_fn, self.train_data, self.eval_data = loss_fn, train_data, eval_data or {}
        self.tokenizer, self.progress = tokenizer, progress
        self.optimizer = build_optimizer(self.raw_model, cfg, self.device)
        self._params = [p for p in self.raw_model.parameters() if p.requires_grad]
        self.out = Path(out) if out is not None else None
        self.step = 0
        self.history: list[dict] = []  # every logged record (train and eval), on every rank
        self.last_eval: dict = {}
        # Called after each evaluation; its {name: float} joins the eval record and the bar (e.g. accuracy
        # an objective counted during evaluate()). Every rank calls it: reduce across ranks inside.
        self.eval_metrics, self.last_metrics = eval_metrics, {}
        self._peak: Optional[float] = None
        # 6N FLOPs per token assume every weight is trained; with frozen weights (LoRA) the backward
        # pass is partial, so no MFU is reported rather than a wrong one.
        # (models without a transformer Config, such as a U-Net, report none either)
        self._mfu_counts = hasattr(getattr(model, "config", None), "n_layer") and all(
            p.requires_grad for p in model.parameters())
        self._metric_sums: dict = {}  # what loss_fn reported beside the loss since the last train record
        self._metric_steps = 0

    # ------------------------------------------------------------------ setup helpers
    def _set_threads(self):
        n = self.cfg.threads
        if n is None and self.world_size > 1 and self.device.type == "cpu":
            local = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
            n = max(1, (os.cpu_count() or 1) // local)  # ranks share the cores: no oversubscription
        if n:
            torch.set_num_threads(n)

    def _check(self, cfg: TrainConfig):
        check_train_config(cfg)  # again: a config changed after it was made (dataclass fields are writable)
        check_schedule(cfg)
        per_step = self.world_size * cfg.grad_accum
        if cfg.batch_size % per_step:
            raise TrainingError(
                f"batch_size={cfg.batch_size} does not split into world_size={self.world_size} x "
                f"grad_accum={cfg.grad_accum} equal micro-batches; use a multiple of {per_step}")

    out_dir = old_attribute("out", "out_dir")

    @property
    def checkpoint_path(self) -> Optional[Path]:
        return self.out / CHECKPOINT_DIR if self.out else None

    @property
    def metrics_path(self) -> Optional[Path]:
        return self.out / METRICS_FILE if self.out else None

    def _num_tokens(self, batch) -> int:
        counter = getattr(self.loss_fn, "num_tokens", None)
        return int(counter(batch)) if counter else first_tensor(batch).numel()

    # ------------------------------------------------------------------ one step
    def train_step(self) -> tuple[torch.Tensor, int, int]:
        """One optimizer step on one global batch -> (mean loss on this rank (0-dim tensor),
        tokens in the global batch, sequence length)."""
        cfg = self.cfg
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = self.train_data.sample(cfg.batch_size)  # the same global batch on every rank
        tokens, seq = self._num_tokens(batch), first_tensor(batch).shape[-1]
        rows = cfg.batch_size // self.world_size
        batch = to_device(take_rows(batch, self.rank * rows, (self.rank + 1) * rows), self.device)
        micro = rows // cfg.grad_accum
        total = torch.zeros((), device=self.device)
        for k in range(cfg.grad_accum):
            part = take_rows(batch, k * micro, (k + 1) * micro)
            last = k == cfg.grad_accum - 1
            # DDP all-reduces gradients only on the last micro-batch.
            ctx = self.model.no_sync() if self.world_size > 1 and not last else contextlib.nullcontext()
            with ctx:
                loss, metrics = split_loss(self.loss_fn(self.model, part))
                loss = loss / cfg.grad_accum
                loss.backward()
            total += loss.detach()
            for k, v in (metrics or {}).items():  # averaged over micro-batches and log windows
                self._metric_sums[k] = self._metric_sums.get(k, 0.0) + float(v) / cfg.grad_accum
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self._params, cfg.grad_clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._metric_steps += 1
        return total, tokens, seq

    def _mean_over_ranks(self, value: torch.Tensor) -> float:
        if self.world_size > 1:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world_size
        return value.item()

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()  # not inference_mode: a module caching a tensor here must still train after
    def evaluate(self) -> dict:
        """Token-weighted mean loss on each eval set; in DDP each rank takes its slice of every batch."""
        was_training = self.raw_model.training
        self.raw_model.eval()
        out = {}
        for name, batches in self.eval_data.items():
            num = torch.zeros((), dtype=torch.float64, device=self.device)
            den = torch.zeros((), dtype=torch.float64, device=self.device)
            for batch in batches:
                n_rows = first_tensor(batch).shape[0]
                if self.world_size > 1 and n_rows % self.world_size == 0:
                    rows = n_rows // self.world_size
                    batch = take_rows(batch, self.rank * rows, (self.rank + 1) * rows)
                elif self.world_size > 1 and self.rank:  # cannot split evenly: rank 0 does it all
                    continue
                n = self._num_tokens(batch)
                num += split_loss(self.loss_fn(self.raw_model, to_device(batch, self.device)))[0].double() * n
                den += n
            if self.world_size > 1:
                both = torch.stack([num, den])
                dist.all_reduce(both)
                num, den = both[0], both[1]
            out[name] = (num / den).item() if den.item() else float("nan")
        self.raw_model.train(was_training)
        return out

    # ------------------------------------------------------------------ the loop
    def fit(self, stop_at: Optional[int] = None) -> dict:
        """Train until step == max_steps (or `stop_at`, to pause early). Evaluates, logs and
        checkpoints on the way; returns a summary."""
        from tqdm import tqdm

        cfg = self.cfg
        end = min(cfg.max_steps, stop_at) if stop_at is not None else cfg.max_steps
        wall0 = time.perf_counter()
        if self.is_main:
            self._peak = measured_peak_flops(self.device)
        self.raw_model.train()
        if self.step == 0 and self.is_main and self.out:
            keep_aside(self.out)  # a fresh run in a used folder: its curves must not continue the last run's
        if self.step == 0 and cfg.eval_at_start and self.eval_data:
            self._eval_and_log()
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not (self.progress and self.is_main),
                   dynamic_ncols=True, desc="train")
        window_tokens, window_time, total_tokens, total_time = 0, 0.0, 0, 0.0
        loss = None
        while self.step < end:
            t0 = time.perf_counter()
            loss, tokens, seq = self.train_step()
            dt = time.perf_counter() - t0
            self.step += 1
            window_tokens, window_time = window_tokens + tokens, window_time + dt
            total_tokens, total_time = total_tokens + tokens, total_time + dt
            bar.update(1)
            done = self.step == cfg.max_steps
            if self.step % cfg.log_interval == 0 or done or self.step == end:
                record = self._log_train(self._mean_over_ranks(loss), window_tokens, window_time, seq)
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                mfu=f"{100 * record['mfu']:.1f}%" if record["mfu"] is not None else "n/a")
                window_tokens, window_time = 0, 0.0
            if self.eval_data and ((cfg.eval_interval and self.step % cfg.eval_interval == 0) or done):
                ev = self._eval_and_log()
                if self.progress and self.is_main:
                    bar.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in ev.items()))
            if self.out and cfg.checkpoint and (
                    (cfg.checkpoint_interval and self.step % cfg.checkpoint_interval == 0) or done):
                self.save_checkpoint()
        bar.close()
        plot = None
        if self.is_main and self.out and self.history:
            from .plot import plot_losses

            plot = plot_losses(self.metrics_path, self.out / PLOT_FILE, title=f"{self.step} steps")
        fpt = flops_per_token(self.raw_model, seq) if loss is not None and self._mfu_counts else None
        tok_s = total_tokens / total_time if total_time else None
        return {"step": self.step, "loss": self.history_train_losses()[-1] if loss is not None else None,
                "train_loss": self.last_eval.get("train"), "val_loss": self.last_eval.get("val"),
                "fit_time_s": time.perf_counter() - wall0, "train_time_s": total_time, "tokens_per_s": tok_s,
                "mfu": fpt * tok_s / (self._peak * self.world_size) if fpt and tok_s and self._peak else None,
                "peak_flops": self._peak, "world_size": self.world_size,
                "out": str(self.out) if self.out else None, "plot": str(plot) if plot else None,
                "checkpoint": str(self.checkpoint_path) if self.out and cfg.checkpoint else None,
                "metrics": str(self.metrics_path) if self.out else None}

    def history_train_losses(self) -> list[float]:
        return [r["loss"] for r in self.history if r["event"] == "train"]

    def _log_train(self, loss: float, tokens: int, seconds: float, seq: int) -> dict:
        tok_s = tokens / seconds if seconds else 0.0
        mfu = None
        if self._peak and self._mfu_counts:
            mfu = flops_per_token(self.raw_model, seq) * tok_s / (self._peak * self.world_size)
        record = {"event": "train", "step": self.step, "loss": loss, "lr": lr_at(self.step - 1, self.cfg),
                  "tokens_per_s": tok_s, "mfu": mfu,
                  **{k: v / max(1, self._metric_steps) for k, v in self._metric_sums.items()}}
        self._metric_sums, self._metric_steps = {}, 0
        self._write(record)
        return record

    def _eval_and_log(self) -> dict:
        self.last_eval = self.evaluate()
        self.last_metrics = dict(self.eval_metrics()) if self.eval_metrics else {}
        self._write({"event": "eval", "step": self.step, **{f"{k}_loss": v for k, v in self.last_eval.items()},
                     **self.last_metrics})
        return {**self.last_eval, **self.last_metrics}

    def _write(self, record: dict):
        self.history.append(record)
        if self.is_main and self.metrics_path:
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path=None) -> Optional[Path]:
        """Model (our format, with the tokenizer) + trainer_state.pt, written atomically by rank 0.
        Every rank must call it: each rank's RNG state is gathered."""
        from ..checkpoints.io import atomic_folder_write, save

        path = Path(path) if path else self.checkpoint_path
        if path is None:
            raise TrainingError("no checkpoint path: give the Trainer an out folder or pass a path")
        rng = [torch.get_rng_state()]
        cuda_rng = [torch.cuda.get_rng_state(self.device)] if self.device.type == "cuda" else [None]
        if self.world_size > 1:
            rng, cuda_rng = [None] * self.world_size, [None] * self.world_size
            dist.all_gather_object(rng, torch.get_rng_state())
            dist.all_gather_object(cuda_rng, torch.cuda.get_rng_state(self.device)
                                   if self.device.type == "cuda" else None)
        if self.is_main:
            state = {"step": self.step, "optimizer": self.optimizer.state_dict(), "rng": rng, "cuda_rng": cuda_rng,
                     "data": self.train_data.state_dict() if hasattr(self.train_data, "state_dict") else None,
                     "train_config": self.cfg.to_dict(), "world_size": self.world_size, "last_eval": self.last_eval}

            def write(tmp: Path):
                save(self.raw_model, tmp, tokenizer=self.tokenizer)  # replaces tmp with the model folder
                torch.save(state, tmp / STATE_FILE)

            atomic_folder_write(path, write)
        if self.world_size > 1:
            dist.barrier()  # nobody resumes from a half-written folder
        return path

    def load_checkpoint(self, path=None) -> int:
        """Restore everything save_checkpoint wrote; returns the step to continue from."""
        from ..checkpoints.io import load_state_dict_into, read_safetensors

        path = Path(path) if path else self.checkpoint_path
        if path is None or not (path / STATE_FILE).exists():
            raise TrainingError(f"no checkpoint to resume at {path} (missing {STATE_FILE}); "
                                f"train without --resume first, or point at a checkpoint folder")
        try:
            state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
            state["step"], state["optimizer"], state["rng"], state["data"]  # noqa: B018  (all must be there)
        except Exception as e:  # truncated (RuntimeError, EOFError), not a checkpoint (UnpicklingError, KeyError)
            raise TrainingError(f"{path / STATE_FILE} is truncated or unreadable ({type(e).__name__}); the run cannot "
                                f"resume from it: restore the file, or start afresh without --resume (the earlier "
                                f"run's records are kept aside)") from None
        tied = getattr(getattr(self.raw_model, "config", None), "tie_embeddings", False)
        load_state_dict_into(self.raw_model, read_safetensors(path / "model.safetensors"), str(path),
                             allow_init=("lm_head.weight",) if tied else ())
        self.optimizer.load_state_dict(state["optimizer"])
        if state["data"] is not None and hasattr(self.train_data, "load_state_dict"):
            self.train_data.load_state_dict(state["data"])
        if len(state["rng"]) == self.world_size:
            torch.set_rng_state(state["rng"][self.rank])
            if state["cuda_rng"][self.rank] is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(state["cuda_rng"][self.rank], self.device)
        else:  # the data position is still exact; only dropout masks differ from an uninterrupted run
            if self.is_main:
                print(f"warning: checkpoint has {len(state['rng'])} rank RNG state(s), this run has "
                      f"{self.world_size}; dropout streams are reseeded")
            torch.manual_seed(self.cfg.seed + 1000 * state["step"] + self.rank)
        self.step = state["step"]
        self.last_eval = state.get("last_eval", {})
        if self.is_main and self.metrics_path and self.metrics_path.exists():
            # Drop records written after this checkpoint (a crash between checkpoints): no duplicates.
            lines = self.metrics_path.read_text().splitlines()
            kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= self.step]
            self.metrics_path.write_text("".join(ln + "\n" for ln in kept))
            self.history = [json.loads(ln) for ln in kept]
        return self.step
