"""Train the Shakespeare recipes end to end and report val loss and wall time.

    python benchmarks/bench_shakespeare.py                       # both recipes
    python benchmarks/bench_shakespeare.py --recipe shakespeare-char-cpu

Prints a table, then (last line) one JSON object with the results. The machine's load average
is recorded before and after each run: on a shared machine, timings are only as quiet as it was."""
import argparse
import json
import os
import platform
import sys
import time

import torch

from allformers.recipes import RECIPES, CharLMRecipe, run_recipe

def cpu_times():
    """(machine busy CPU-seconds, this process's CPU-seconds); machine figure is Linux-only."""
    own = sum(os.times()[:2])
    try:
        fields = [int(v) for v in open("/proc/stat").readline().split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        busy = float("nan")
    return busy, own


def wait_for_idle(max_wait_s: float, busy_below: float = 0.1):
    """Wait (up to max_wait_s) until the other processes use < busy_below of the machine for 5 s."""
    start = time.time()
    while time.time() - start < max_wait_s:
        b0, o0 = cpu_times()
        time.sleep(5)
        b1, o1 = cpu_times()
        if ((b1 - b0) - (o1 - o0)) / (5 * os.cpu_count()) < busy_below:
            return True
    return False


TARGETS = {"shakespeare-char-cpu": (1.89, 97.0), "shakespeare-char-long": (1.70, 600.0)}  # (val loss, seconds)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", action="append", choices=sorted(n for n, r in RECIPES.items() if isinstance(r, CharLMRecipe)), help="run only this recipe (repeatable)")
    p.add_argument("--data", help="folder holding tinyshakespeare/input.txt (default: ../shared/data, else a download)")
    p.add_argument("--out-root", default="runs/bench", help="each recipe writes to OUT_ROOT/RECIPE")
    p.add_argument("--max-steps", type=int, help="override the recipes' step count (quick checks)")
    p.add_argument("--seed", type=int)
    p.add_argument("--progress", action="store_true", help="show the progress bar")
    p.add_argument("--wait-idle", type=float, default=0, metavar="S",
                   help="before each run, wait up to S seconds for the machine to be idle")
    args = p.parse_args(argv)

    rows = []
    for name in args.recipe or list(TARGETS):
        idle = wait_for_idle(args.wait_idle) if args.wait_idle else None
        load_before = os.getloadavg()[0]
        busy0, own0, t0 = *cpu_times(), time.perf_counter()
        r = run_recipe(name, data=args.data, out=os.path.join(args.out_root, name), max_steps=args.max_steps,
                       seed=args.seed, progress=args.progress, overrides={"samples": 1, "full_val": True})
        busy1, own1, t1 = *cpu_times(), time.perf_counter()
        # CPU time other processes used during our run, as a share of the whole machine
        others = ((busy1 - busy0) - (own1 - own0)) / ((t1 - t0) * os.cpu_count())
        target_loss, target_s = TARGETS.get(name, (None, None))
        rows.append({"recipe": name, "params": r["params"], "steps": r["step"], "val_loss": r["val_loss"],
                     "val_loss_full_split": r["val_loss_full"], "train_loss": r["train_loss"],
                     "wall_time_s": r["wall_time_s"], "train_time_s": r["train_time_s"],
                     "tokens_per_s": r["tokens_per_s"], "mfu": r["mfu"], "peak_gflops": r["peak_flops"] / 1e9,
                     "threads": r["threads"], "target_val_loss": target_loss, "target_wall_s": target_s,
                     "met": (target_loss is None or r["val_loss"] <= target_loss)
                     and (target_s is None or r["wall_time_s"] <= target_s),
                     "load_avg_before": load_before, "load_avg_after": os.getloadavg()[0],
                     "others_cpu_share": max(0.0, others), "started_idle": idle,
                     "out": r["out"]})
        print(f"--- {name} sample:\n{r['samples'][0][:300]}\n", file=sys.stderr)

    head = f"{'recipe':<24}{'params':>9}{'steps':>7}{'val':>8}{'val(all)':>10}{'train':>8}{'wall s':>8}" \
           f"{'tok/s':>8}{'MFU':>7}{'target':>16}{'met':>5}{'others':>8}"
    print(head)
    for r in rows:
        target = f"<={r['target_val_loss']} in {r['target_wall_s']:.0f}s" if r["target_val_loss"] else "-"
        print(f"{r['recipe']:<24}{r['params']:>9,}{r['steps']:>7}{r['val_loss']:>8.4f}{r['val_loss_full_split']:>10.4f}"
              f"{r['train_loss']:>8.4f}{r['wall_time_s']:>8.1f}{r['tokens_per_s']:>8.0f}{100 * r['mfu']:>6.1f}%"
              f"{target:>16}{'yes' if r['met'] else 'NO':>5}{100 * r['others_cpu_share']:>7.0f}%")
    print("others = CPU share other processes took during the run (0% = quiet machine)")
    env = {"torch": torch.__version__, "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
           "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(json.dumps({"results": rows, "env": env}))


if __name__ == "__main__":
    main()
