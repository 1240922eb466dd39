"""Transformer-XL's segment memory, measured: two identical character-level Transformer-XLs (same
parameters, same data order, same steps) trained and evaluated on State of the Union segment by
segment, one with `mem_len` tokens of memory per layer, one without (mem_len=0). The memory model
reads each segment with the previous one's hidden states as extra keys/values (no gradient into
them); the baseline sees only the segment. Eval loss is the mean next-character cross-entropy over
the same validation segments, read in order.

    python benchmarks/long_context_xl.py --quick      # proves it runs (well under a minute of CPU)
    python benchmarks/long_context_xl.py --threads 1 --plot docs/img/xl_memory.png   # the measured run

`xl_memory_section()` is the section benchmarks/bench_long_context.py prints; run alone, this file
prints a table and, last, one JSON object."""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from allformers import Config
from allformers.models import build_model
from allformers.objectives.segment_lm import SegmentLM, SegmentStream
from allformers.training import TrainConfig, Trainer
from allformers.training.data import DataError, char_corpus, default_data_root

# baby-xl-char shrunk to 2 x 64 (114K parameters): at 4 x 128 and the same lr, 300 steps left both models at the
# same loss (2.08 vs 2.05, seg_len 64); this size shows the memory's gain from the first evaluation on.
FULL = dict(steps=1500, batch_size=16, seg_len=32, mem_len=32, eval_segments=60, eval_every=250, n_layer=2, n_embd=64,
            n_head=4)
QUICK = dict(steps=30, batch_size=8, seg_len=32, mem_len=32, eval_segments=6, eval_every=10, n_layer=2, n_embd=64, n_head=4)


def sotu_path(data=None) -> Path:
    root = Path(data) if data else default_data_root()
    path = (root / "sotu" / "sotu.txt") if root else None
    if path is None or not path.exists():
        raise DataError(f"State of the Union not found at {path}; pass --data (the folder holding sotu/sotu.txt)")
    return path


def _train_and_eval(config: Config, corpus, s: dict, seed: int, progress: bool) -> dict:
    torch.manual_seed(seed)
    model = build_model(config)
    val = SegmentStream(corpus.val, s["batch_size"], s["seg_len"]).batches()[: s["eval_segments"]]
    trainer = Trainer(model, SegmentLM(), SegmentStream(corpus.train, s["batch_size"], s["seg_len"]),
                      TrainConfig(max_steps=s["steps"], batch_size=s["batch_size"], lr=2e-3, min_lr=2e-4,
                                  warmup_steps=max(1, s["steps"] // 20), weight_decay=0.1, eval_interval=s["eval_every"],
                                  eval_at_start=False, log_interval=max(1, s["steps"] // 10), checkpoint=False,
                                  seed=seed, device="cpu"),
                      eval_data={"val": val}, progress=progress)
    t0 = time.perf_counter()
    summary = trainer.fit()
    curve = [[r["step"], round(r["val_loss"], 4)] for r in trainer.history if r["event"] == "eval"]
    return {"val_loss": trainer.last_eval["val"], "params": model.num_params(), "train_loss": summary["loss"],
            "seconds": time.perf_counter() - t0, "model": model, "val": val, "curve": curve}


def xl_memory_section(quick: bool = False, data=None, seed: int = 0, progress: bool = False, **overrides) -> dict:
    """{"xl_memory_loss", "xl_no_memory_loss", ...}: eval losses of the two models (memory must be lower)."""
    s = {**(QUICK if quick else FULL), **overrides}
    corpus = char_corpus(sotu_path(data))
    base = Config.from_name("baby-xl-char", vocab_size=corpus.tokenizer.vocab_size, n_layer=s["n_layer"],
                            n_embd=s["n_embd"], n_head=s["n_head"], block_size=4 * s["seg_len"])
    with_memory = _train_and_eval(base.replace(mem_len=s["mem_len"]), corpus, s, seed, progress)
    without = _train_and_eval(base.replace(mem_len=0), corpus, s, seed, progress)
    # The memory-trained model read without its memory: is the gain the memory, or the training?
    objective, mem_model = SegmentLM(mem_len=0), with_memory["model"].eval()
    with torch.no_grad():
        losses = [objective(mem_model, b).item() for b in with_memory["val"]]
    assert with_memory["params"] == without["params"]
    return {"xl_memory_loss": with_memory["val_loss"], "xl_no_memory_loss": without["val_loss"],
            "xl_memory_model_without_memory_loss": sum(losses) / len(losses),
            "xl_params": with_memory["params"], "xl_steps": s["steps"], "xl_seg_len": s["seg_len"],
            "xl_mem_len": s["mem_len"], "xl_batch_size": s["batch_size"],
            "xl_eval_tokens": s["eval_segments"] * s["batch_size"] * s["seg_len"],
            "xl_train_seconds": [round(with_memory["seconds"], 1), round(without["seconds"], 1)],
            "xl_memory_curve": with_memory["curve"], "xl_no_memory_curve": without["curve"],
            "xl_memory_wins": with_memory["val_loss"] < without["val_loss"]}


def plot_curves(r: dict, path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for key, label in (("xl_memory_curve", f"memory of {r['xl_mem_len']} characters"), ("xl_no_memory_curve", "no memory")):
        steps, losses = zip(*r[key])
        ax.plot(steps, losses, marker="o", label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel("eval loss (nats / character)")
    ax.set_title(f"Transformer-XL on State of the Union, segments of {r['xl_seg_len']} characters")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny models, a few steps: proves the benchmark runs")
    p.add_argument("--data", help="the folder holding sotu/sotu.txt (default: ../shared/data)")
    p.add_argument("--max-steps", type=int, help="override the number of training steps")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--plot", help="write the two eval-loss curves to this PNG")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    extra = {"steps": args.max_steps} if args.max_steps else {}
    load = os.getloadavg()[0]
    r = xl_memory_section(quick=args.quick, data=args.data, seed=args.seed, progress=args.progress, **extra)
    print(f"{'model':<40}{'eval loss':>10}")
    print(f"{'Transformer-XL, mem_len=' + str(r['xl_mem_len']):<40}{r['xl_memory_loss']:>10.4f}")
    print(f"{'same model read without memory':<40}{r['xl_memory_model_without_memory_loss']:>10.4f}")
    print(f"{'Transformer-XL trained without memory':<40}{r['xl_no_memory_loss']:>10.4f}")
    print(f"{r['xl_params']:,} parameters each, {r['xl_steps']} steps, segments of {r['xl_seg_len']} characters")
    if args.plot:
        plot_curves(r, args.plot)
    print(json.dumps({**r, "quick": args.quick, "load_avg_before": load, "load_avg_after": os.getloadavg()[0],
                      "torch": torch.__version__, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
