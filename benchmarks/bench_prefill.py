"""Prefill from 128 to 8,192 tokens of context: tokens/s and peak memory, allformers vs transformers.

The model is SmolLM2-135M's shape (30 layers, 9 query / 3 key-value heads, width 576, 8,192-token
context) with random weights, saved once in Hugging Face's layout so both libraries read the same
numbers. For each context length T: batch 1, T token ids, one forward pass that fills the KV cache
and keeps the logits of the last position only, which is all that generation needs (ours:
`last_only=True` into a Cache; transformers: `use_cache=True, logits_to_keep=1`).

Each length runs in fresh child processes. The timing child alternates the two libraries `--reps`
times after a warm-up pass each and reports each median. Memory is measured apart, one child per
library and length, so nothing freed by another run can hide a peak: after a warm-up pass the
resident-set high-water mark is reset (Linux /proc/self/clear_refs) and one pass is measured, its
peak above the resident set it started from (glibc is told to hand every block of 64 KB or more
back to the system when freed, so the resident set follows what is live).
Memory that grows linearly in T means no T x T tensor was made: SDPA's fused causal kernel and the
last-position logits avoid both (a T x T fp32 score matrix per head would be 2.4 GB at 8,192).

    python benchmarks/bench_prefill.py                      # 128 ... 8,192, ~10 min on 2 cores
    python benchmarks/bench_prefill.py --lengths 128,1024 --reps 2 --layers 4   # a quick look

The last line is one JSON object: per length tokens/s of each library, their ratio and peak MB,
and longest_vs_shortest (tokens/s at the longest length over tokens/s at the shortest)."""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- memory (Linux)
def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def peak_mb() -> float:
    return _status_kb("VmHWM") / 1024


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}: this benchmark's memory figures need Linux")


def reset_peak() -> None:
    """Set the high-water mark to the current resident set (man 5 proc: clear_refs, value 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def measured(fn) -> tuple[float, float]:
    """(seconds, peak MB above the resident set before) of one call."""
    gc.collect()
    before = rss_mb()
    reset_peak()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0, peak_mb() - before


# ---------------------------------------------------------------------- one length (the child)
def prefill_fns(model_dir: str, libs, T: int):
    """{lib: a no-argument prefill of T tokens} for the libraries asked, each loaded from model_dir."""
    fns = {}
    x = None
    if "ours" in libs:
        from allformers import load
        from allformers.models.lm import Cache

        ours = load(model_dir).eval()
        x = torch.randint(0, ours.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(T))
        fns["ours"] = lambda ids=x: ours(ids, cache=Cache(ours, 1, ids.shape[1]), last_only=True)[:, -1]
    if "hf" in libs:
        import transformers as tf

        hf = tf.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
        if x is None:
            x = torch.randint(0, hf.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(T))
        fns["hf"] = lambda ids=x: hf(ids, use_cache=True, logits_to_keep=1).logits[:, -1]
    return fns, x


def child_times(model_dir: str, T: int, reps: int) -> dict:
    """Medians of `reps` interleaved passes of both libraries (after one warm-up pass each)."""
    fns, x = prefill_fns(model_dir, ("ours", "hf"), T)
    with torch.inference_mode():
        warm = x[:, :min(T, 64)]
        if (fns["ours"](warm) - fns["hf"](warm)).abs().max() >= 1e-3:
            raise SystemExit("the two libraries disagree on the same weights: the comparison would mean nothing")
        times = {"ours": [], "hf": []}
        for _ in range(reps):
            for lib in ("ours", "hf"):
                t0 = time.perf_counter()
                fns[lib]()
                times[lib].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"tokens": T, "tok_s": round(T / med["ours"], 1), "tok_s_hf": round(T / med["hf"], 1),
            "ratio": round(med["hf"] / med["ours"], 3), "runs": reps}


def child_memory(model_dir: str, T: int, lib: str) -> dict:
    """Peak MB above the resident set of one pass of one library, alone in its process."""
    fns, x = prefill_fns(model_dir, (lib,), T)
    with torch.inference_mode():
        fns[lib](x[:, :min(T, 64)])  # warm-up: kernels and lazy buffers
        _, mb = measured(fns[lib])
    return {"peak_mb": round(mb, 1)}


# ---------------------------------------------------------------------- the curve (the parent)
def save_model(folder: Path, layers: int, seed: int) -> dict:
    from allformers import Config
    from allformers.models import build_model

    torch.manual_seed(seed)
    overrides = {"n_layer": layers} if layers else {}
    model = build_model(Config.from_name("smollm2-135m", **overrides))
    model.save(folder, format="hf")
    return {"model": "smollm2-135m shape, random weights", "n_layer": model.config.n_layer,
            "params": sum(p.numel() for p in model.parameters())}


def run_child(model_dir: str, T: int, what: str, args) -> dict:
    """One length in a fresh process: "times" (both libraries) or one library's memory. The memory
    children return every large block to the system when it is freed (a fixed glibc mmap threshold),
    so a later allocation cannot reuse memory without the resident set showing it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if what != "times":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    cmd = [sys.executable, __file__, "--child", model_dir, str(T), what, "--reps", str(args.reps),
           "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"prefill ({what}) at {T} tokens failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="128,256,512,1024,2048,4096,8192", help="comma-separated context lengths")
    ap.add_argument("--reps", type=int, default=3, help="timed passes per library and length (memory is "
                                                        "measured apart, one pass in its own process)")
    ap.add_argument("--layers", type=int, help="fewer layers than SmolLM2's 30 (a quicker run)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", nargs=3, metavar=("MODEL_DIR", "T", "WHAT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        torch.set_num_threads(args.threads)
        d, T, what = args.child[0], int(args.child[1]), args.child[2]
        print(json.dumps(child_times(d, T, args.reps) if what == "times" else child_memory(d, T, what)))
        return
    lengths = sorted(int(t) for t in args.lengths.split(","))
    if lengths[0] < 1 or args.reps < 1:
        ap.error("lengths and --reps must be positive")
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        info = save_model(Path(d), args.layers, args.seed)
        rows = []
        for T in lengths:
            row = run_child(d, T, "times", args)
            for lib, key in (("ours", "peak_mb"), ("hf", "peak_mb_hf")):
                row[key] = run_child(d, T, lib, args)["peak_mb"]
            rows.append(row)
            print(f"{T:>6} tokens  ours {row['tok_s']:8.0f} tok/s {row['peak_mb']:7.0f} MB   transformers "
                  f"{row['tok_s_hf']:8.0f} tok/s {row['peak_mb_hf']:7.0f} MB   {row['ratio']:.2f}x", file=sys.stderr)
    first, last = rows[0], rows[-1]
    out = {**info, "threads": args.threads, "reps": args.reps, "torch": torch.__version__,
           "lengths": lengths, "prefill": rows,
           "longest_vs_shortest": last["tok_s"] / first["tok_s"],  # tokens/s at the longest length / the shortest
           "prefill_ratio_min": min(r["ratio"] for r in rows),
           "peak_mb_per_1k_tokens": (last["peak_mb"] - first["peak_mb"]) / max(1, last["tokens"] - first["tokens"]) * 1000,
           "wall_s": time.perf_counter() - t_start}
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items()}))


if __name__ == "__main__":
    main()
