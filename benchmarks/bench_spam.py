"""all-MiniLM-L6-v2 fine-tuned as a spam / ham classifier on SpamAssassin (4,837 e-mails).

One full run of `allformers finetune`: 80% trains, the fixed 20% held out (per label, by id
hash) is evaluated; then the saved folder is reloaded and the held-out part classified again
through `allformers.inference.classify`, which must give the same accuracy (--no-verify skips
this second pass). Prints a table; the last line is one JSON object (accuracy, times, settings).

    python benchmarks/bench_spam.py                       # the documented run (docs/finetune.md)
    python benchmarks/bench_spam.py --max-length 256 --epochs 2"""
import argparse
import json
import os
import platform
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def load_avg():
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--data", default=None, help="default: spam_assassin/train.jsonl under ../shared/data")
    ap.add_argument("--out", default="runs/bench-spam")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--no-verify", action="store_true", help="skip reloading the folder and re-classifying")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import allformers
    from allformers.inference import classify
    from allformers.recipes.finetune import finetune, heldout_split, read_records, record_text, resolve_data

    load0, t0 = load_avg(), time.perf_counter()
    r = finetune(args.model, args.data, args.out, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                 max_length=args.max_length, seed=args.seed, threads=args.threads,
                 progress=not args.no_progress)
    wall = time.perf_counter() - t0

    verify = None
    if not args.no_verify:  # the saved folder, reloaded, on the same held-out records
        t1 = time.perf_counter()
        records = read_records(resolve_data(args.data))
        _, held = heldout_split(records, 0.2)
        model = allformers.load(args.out)
        labels, _ = classify(model, [record_text(records[i]) for i in held], batch_size=64,
                             max_length=args.max_length)
        acc = sum(lab == str(records[i]["label"]) for lab, i in zip(labels, held)) / len(held)
        verify = {"reloaded_accuracy": acc, "classify_time_s": time.perf_counter() - t1}

    t = r["times_s"]
    print(f"\n{r['table']}\n")
    rows = [("model", r["model"]), ("records", f"{r['split']['train']} train / {r['split']['heldout']} held out"),
            ("settings", f"{r['settings']['epochs']} epoch(s) = {r['settings']['steps']} steps, batch "
                         f"{r['settings']['batch_size']}, max_length {r['settings']['max_length']}, lr {r['settings']['lr']}"),
            ("held-out accuracy", f"{r['accuracy']:.4f}"),
            ("train time", f"{t['train']:.0f} s ({r['tokens_per_s']:.0f} tokens/s)"),
            ("wall time (load + tokenise + train + eval + save)", f"{wall:.0f} s"),
            ("threads / load avg", f"{r['settings']['threads']} / {load0} -> {load_avg()}")]
    if verify:
        rows.append(("reloaded folder, classify()", f"{verify['reloaded_accuracy']:.4f} in {verify['classify_time_s']:.0f} s"))
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    result = {"benchmark": "spam_minilm_finetune", "accuracy": r["accuracy"], "wall_time_s": wall,
              "train_time_s": t["train"], "eval_and_save_s": t["train_and_eval"] - t["train"],
              "per_class": r["per_class"], "confusion": r["confusion"], "settings": r["settings"],
              "split": r["split"], "tokens_per_s": r["tokens_per_s"], "verify": verify,
              "load_avg": [load0, load_avg()], "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
              "out": r["out"]}
    print(json.dumps(result))
    if verify and abs(verify["reloaded_accuracy"] - r["accuracy"]) > 1e-9:
        print("reloaded model disagrees with the evaluated one", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
