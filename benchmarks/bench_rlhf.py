"""The ChatGPT recipe end to end on the real SmolLM2-135M-Instruct, on a CPU.

    python benchmarks/bench_rlhf.py                 # the full recipe (~15-25 min on 2 cores)
    python benchmarks/bench_rlhf.py --quick         # a smoke run of every stage (~3 min)

Starting from SmolLM2-135M-Instruct: preference pairs where the chosen reply opens by agreeing to
help (a property a program checks), a reward model trained on them, PPO against the reward model
with a KL penalty, separately DPO, and best-of-n reranking. On held-out prompts it prints the share
of sampled replies with the property and the mean KL per reply to the starting model, then, last,
one JSON object with the baseline, PPO and DPO rates and KLs. Target: PPO and DPO each +30 points
over the start with KL < 10 nats per reply, within 30 minutes."""
import argparse
import json
import os
import sys
import time

import torch

from allformers.cli.common import load_model
from allformers.recipes.rlhf import RLHFRecipe, format_table, quick_recipe, run_rlhf


def override(recipe, item: str):
    """recipe with one "a.b=value" field replaced (value read as JSON, else as a string)."""
    import dataclasses

    path, sep, raw = item.partition("=")
    if not sep:
        raise SystemExit(f"--set {item!r}: write FIELD=VALUE, e.g. ppo.kl_coef=0.3")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw

    def replace(obj, names):
        fields = [f.name for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj) else []
        if names[0] not in fields:
            raise SystemExit(f"--set {item!r}: no field {names[0]!r} here; fields: {fields}")
        inner = replace(getattr(obj, names[0]), names[1:]) if len(names) > 1 else value
        return dataclasses.replace(obj, **{names[0]: inner})

    return replace(recipe, path.split("."))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--out", default="runs/rlhf")
    p.add_argument("--quick", action="store_true", help="tiny settings: checks that every stage runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int)
    p.add_argument("--device", default="cpu", help="cpu (the target's setting), cuda, or auto")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a recipe field, e.g. --set ppo.kl_coef=0.3 --set reward.steps=40 (JSON values)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    load = os.getloadavg()[0]
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    lm = load_model(args.model).to(device)
    recipe = RLHFRecipe(seed=args.seed)
    if args.quick:
        recipe = quick_recipe(recipe)
    for item in args.set:
        recipe = override(recipe, item)
    s = run_rlhf(lm, lm.tokenizer, args.out, recipe, progress=not args.no_progress, threads=args.threads,
                 log=lambda m: print(m, file=sys.stderr))
    wall = time.perf_counter() - t0
    print(format_table(s))
    rows = s["rows"]
    base = rows["start"]["rate"]
    result = {"property": s["property"], "baseline_rate": base,
              "ppo_rate": rows["ppo"]["rate"], "ppo_kl": rows["ppo"]["kl"], "ppo_gain_pp": 100 * (rows["ppo"]["rate"] - base),
              "dpo_rate": rows["dpo"]["rate"], "dpo_kl": rows["dpo"]["kl"], "dpo_gain_pp": 100 * (rows["dpo"]["rate"] - base),
              "best_of_n_rate": next((r["rate"] for k, r in rows.items() if k.startswith("best-of")), None),
              "reward_model_heldout_accuracy": s["reward_model"]["heldout"]["accuracy"],
              "heldout_replies": rows["start"]["n"], "wall_time_s": round(wall, 1), "load_avg_before": load,
              "threads": torch.get_num_threads(), "device": device, "quick": args.quick, "plot": s["plot"]}
    result["met"] = bool(result["ppo_gain_pp"] >= 30 and result["dpo_gain_pp"] >= 30 and result["ppo_kl"] < 10
                         and result["dpo_kl"] < 10 and wall <= 1800)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
