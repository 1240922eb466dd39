"""Long context, sparse attention and mixtures of experts, measured (issue 14). Sections:

  moe    a top-2 mixture of experts vs a dense model with the same active parameters per token, same
         data order and steps, on character-level Tiny Shakespeare: moe_loss, dense_loss (mean
         cross-entropy over every window of the validation split), moe_dropped_fraction (share of the
         token-to-expert assignments over capacity while training, capacity factor 1.25)
  local  prefill time of a stack of local (sliding window) attention layers vs the same stack with
         dense causal attention at 1k, 2k, 4k and 8k tokens: local_attention_prefill_ms,
         dense_attention_prefill_ms (median of interleaved repeats), and their growth from 1k to 8k
         (8 is linear; dense attention's share grows with the square)
  ctrl   a tiny CTRL trained on text tagged by source (Shakespeare vs State of the Union; long_context_ctrl.py); samples drawn
         after each control code are assigned to a source by a character n-gram naive Bayes classifier
         fitted on held-out text of both sources: ctrl_code_accuracy
  xl     Transformer-XL's segment memory vs none (benchmarks/long_context_xl.py): xl_memory_loss,
         xl_no_memory_loss

    python benchmarks/bench_long_context.py --quick                 # every section, small: proves it runs
    python benchmarks/bench_long_context.py --sections moe,local    # the measured run of two sections
    python benchmarks/bench_long_context.py --sections moe --set moe.steps=500   # a shorter variant

Each section is a function `(quick, data, seed, progress) -> dict`; SECTIONS maps its name to it
(a "module:function" string is imported when the section runs). Prints one line per section, then,
last, one JSON object with every section's numbers and the machine's load."""
from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling section modules (long_context_xl.py)

from allformers import Config, TransformerLM  # noqa: E402
from allformers.objectives import CausalLM  # noqa: E402
from allformers.training import TrainConfig, Trainer, char_corpus, tiny_shakespeare_path  # noqa: E402
from allformers.training.data import RandomWindows, all_windows  # noqa: E402
from allformers.zoo import count_active_params, count_params  # noqa: E402


# ---------------------------------------------------------------------- moe
# The dense model is nanoGPT's baby GPT (4 x 128, feed-forward 512, the shakespeare-char-cpu recipe's
# training); the MoE model swaps every feed-forward for 8 experts of width 256, two per token: the same
# 2 * 128 * 512 feed-forward weights run for each token (plus a 128 x 8 router per layer).
MOE_FULL = dict(steps=2000, batch_size=12, block=64, n_layer=4, n_embd=128, n_head=4, dense_hidden=512,
                n_expert=8, top_k=2, capacity_factor=1.25, lr=3e-3, eval_batches=None)
MOE_QUICK = dict(steps=20, batch_size=8, block=32, n_layer=2, n_embd=32, n_head=2, dense_hidden=64,
                 n_expert=4, top_k=2, capacity_factor=1.25, lr=3e-3, eval_batches=2)


def moe_configs(s: dict, vocab_size: int):
    dense = Config(vocab_size=vocab_size, block_size=s["block"], n_layer=s["n_layer"], n_embd=s["n_embd"],
                   n_head=s["n_head"], intermediate_size=s["dense_hidden"], activation="gelu",
                   attn_bias=False, mlp_bias=False, norm_bias=False)
    moe = dense.replace(intermediate_size=s["dense_hidden"] // s["top_k"], n_expert=s["n_expert"],
                        n_expert_per_token=s["top_k"], moe_every=1, moe_capacity_factor=s["capacity_factor"])
    return dense, moe


def _train(config: Config, corpus, s: dict, seed: int, progress: bool, out: Path) -> dict:
    torch.manual_seed(seed)
    model = TransformerLM(config)
    cfg = TrainConfig(max_steps=s["steps"], batch_size=s["batch_size"], lr=s["lr"], min_lr=s["lr"] / 10,
                      warmup_steps=max(1, s["steps"] // 20), weight_decay=0.1, beta2=0.99, grad_clip=1.0,
                      eval_interval=0, eval_at_start=False, log_interval=max(1, s["steps"] // 40),
                      checkpoint=False, seed=seed, device="cpu")
    val = all_windows(corpus.val, s["block"], 64)[: s.get("eval_batches")]  # every window of the validation split
    trainer = Trainer(model, CausalLM(), RandomWindows(corpus.train, s["block"], seed=seed), cfg,
                      eval_data={"val": val}, out=out, progress=progress)
    t0 = time.perf_counter()
    trainer.fit()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    dropped = [r["moe_dropped"] for r in rows if "moe_dropped" in r]
    return {"val_loss": trainer.last_eval["val"], "seconds": time.perf_counter() - t0,
            "dropped": sum(dropped) / len(dropped) if dropped else None,
            "load": {k: round(v, 4) for k, v in rows[-2].items() if k.startswith("moe_load_e")} if dropped else None}


def settings(base: dict, overrides: dict) -> dict:
    unknown = sorted(set(overrides) - set(base))
    if unknown:
        raise SystemExit(f"unknown setting(s) {unknown}; this section has {sorted(base)}")
    return {**base, **overrides}


def moe_section(quick: bool = False, data=None, seed: int = 0, progress: bool = False, **overrides) -> dict:
    s = settings(MOE_QUICK if quick else MOE_FULL, overrides)
    corpus = char_corpus(tiny_shakespeare_path(data), train_fraction=0.9)
    dense_cfg, moe_cfg = moe_configs(s, corpus.tokenizer.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        moe = _train(moe_cfg, corpus, s, seed, progress, Path(tmp) / "moe")
        dense = _train(dense_cfg, corpus, s, seed, progress, Path(tmp) / "dense")
    return {"moe_loss": moe["val_loss"], "dense_loss": dense["val_loss"], "moe_dropped_fraction": moe["dropped"],
            "moe_wins": moe["val_loss"] < dense["val_loss"],
            "moe_params_total": count_params(moe_cfg), "moe_params_active": count_active_params(moe_cfg),
            "dense_params": count_params(dense_cfg), "moe_router_params": s["n_layer"] * s["n_embd"] * s["n_expert"],
            "moe_final_expert_share": moe["load"],
            "moe_steps": s["steps"], "moe_batch_size": s["batch_size"], "moe_block": s["block"],
            "moe_experts": f"{s['n_expert']} experts, top {s['top_k']}, capacity factor {s['capacity_factor']}",
            "moe_train_seconds": round(moe["seconds"], 1), "dense_train_seconds": round(dense["seconds"], 1)}


# ---------------------------------------------------------------------- local
LOCAL_FULL = dict(lengths=(1024, 2048, 4096, 8192), n_layer=4, n_embd=256, n_head=4, window=256, repeats=3)
LOCAL_QUICK = dict(lengths=(256, 512), n_layer=2, n_embd=64, n_head=2, window=64, repeats=1)


@torch.inference_mode()
def _prefill_ms(model, T: int) -> float:
    x = torch.randint(0, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(T))
    cache = model.new_cache(1, T)
    t0 = time.perf_counter()
    model(x, cache=cache, last_only=True)  # what generate() runs on a prompt
    return 1000 * (time.perf_counter() - t0)


def local_section(quick: bool = False, data=None, seed: int = 0, progress: bool = False, **overrides) -> dict:
    s = settings(LOCAL_QUICK if quick else LOCAL_FULL, overrides)
    base = Config(vocab_size=256, block_size=max(s["lengths"]), n_layer=s["n_layer"], n_embd=s["n_embd"],
                  n_head=s["n_head"], position="learned", window_size=s["window"])
    torch.manual_seed(seed)
    models = {"local": TransformerLM(base.replace(attention_pattern=["local"])).eval(),
              "dense": TransformerLM(base).eval()}
    times = {k: {T: [] for T in s["lengths"]} for k in models}
    for T in s["lengths"]:  # one warm-up each, then local and dense interleaved
        for m in models.values():
            _prefill_ms(m, T)
    for _ in range(s["repeats"]):
        for T in s["lengths"]:
            for name, m in models.items():
                times[name][T].append(_prefill_ms(m, T))
    med = {k: {str(T): round(statistics.median(v), 2) for T, v in per.items()} for k, per in times.items()}
    lo, hi = str(min(s["lengths"])), str(max(s["lengths"]))
    return {"local_attention_prefill_ms": med["local"], "dense_attention_prefill_ms": med["dense"],
            "local_prefill_growth": round(med["local"][hi] / med["local"][lo], 2),
            "dense_prefill_growth": round(med["dense"][hi] / med["dense"][lo], 2),
            "length_growth": max(s["lengths"]) // min(s["lengths"]),
            "local_prefill_model": f"{s['n_layer']} layers x {s['n_embd']}, {s['n_head']} heads, window {s['window']}, "
                                   f"batch 1, {torch.get_num_threads()} threads, median of {s['repeats']}"}


# ---------------------------------------------------------------------- sections
SECTIONS = {"moe": moe_section, "local": local_section, "ctrl": "long_context_ctrl:ctrl_section",
            "xl": "long_context_xl:xl_memory_section"}


def section_function(name: str):
    """The section's function; None when its module is not in this checkout."""
    fn = SECTIONS[name]
    if isinstance(fn, str):
        module, attr = fn.split(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            return None
    return fn


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", help=f"comma-separated, of {list(SECTIONS)} (default: every one this checkout has)")
    p.add_argument("--quick", action="store_true", help="small and short: proves every section runs")
    p.add_argument("--data", help="the folder holding tinyshakespeare/ and sotu/ (default: ../shared/data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one section setting, e.g. moe.steps=500 or local.repeats=5 (a Python literal)")
    args = p.parse_args(argv)
    if args.sections:
        names = [n.strip() for n in args.sections.split(",") if n.strip()]
        unknown = [n for n in names if n not in SECTIONS]
        if unknown:
            p.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
        missing = [n for n in names if section_function(n) is None]
        if missing:
            p.error(f"section(s) {missing}: their module ({', '.join(SECTIONS[n] for n in missing)}) is not in "
                    f"this checkout")
    else:
        names = [n for n in SECTIONS if section_function(n) is not None]
    overrides = {n: {} for n in names}
    for item in args.set:
        key, sep, value = item.partition("=")
        section, dot, field = key.partition(".")
        if not (sep and dot and section in overrides):
            p.error(f"--set {item!r}: write SECTION.KEY=VALUE with SECTION among {names}")
        overrides[section][field] = ast.literal_eval(value)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"sections": names, "quick": args.quick, "threads": torch.get_num_threads(),
               "load_avg_before": os.getloadavg()[0]}
    t0 = time.perf_counter()
    for name in names:
        t = time.perf_counter()
        out = section_function(name)(quick=args.quick, data=args.data, seed=args.seed, progress=args.progress,
                                     **overrides[name])
        results.update(out)
        shown = {k: v for k, v in out.items() if not isinstance(v, dict)}
        print(f"{name} ({time.perf_counter() - t:.0f} s): {shown}", file=sys.stderr)
    results.update(wall_s=round(time.perf_counter() - t0, 1), load_avg_after=os.getloadavg()[0])
    print(json.dumps(results))


if __name__ == "__main__":
    main()
