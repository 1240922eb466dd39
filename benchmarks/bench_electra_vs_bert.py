"""ELECTRA vs BERT pretraining from scratch at equal compute, judged by spam fine-tuning.

1. One WordPiece tokenizer (8k, [PAD] [UNK] [CLS] [SEP] [MASK], BERT post-processor) trained on
   State of the Union (../shared/data/sotu/sotu.txt); the text cut into 128-token rows, 1 in 50
   held out.
2. BERT (recipe bert-mlm-sotu-tiny: 4 x 128 encoder, MLM with dynamic masking) and ELECTRA
   (electra-sotu-tiny: a discriminator of exactly the BERT's size + a 1/4-width generator,
   shared embeddings, loss MLM + 50 * BCE), same batch (32), rows (128 tokens), optimizer and
   schedule shape.
   EQUAL COMPUTE = equal training FLOPs: the FLOPs of one forward + backward of each objective
   are counted (torch FlopCounterMode: every matmul as executed, plus the attention matmuls by
   formula); BERT runs --bert-steps steps and ELECTRA floor(bert_steps * F_bert / F_electra).
   Wall time is measured and printed too.
3. Each pretrained encoder (ELECTRA: the discriminator), and the same architecture from random
   init, is fine-tuned on SpamAssassin with allformers' `finetune` (the fixed 20% held out by id
   hash, same settings and seed for all three): held-out accuracy.

Prints one table; the LAST line is one JSON object.

    python benchmarks/bench_electra_vs_bert.py            # the documented run (docs/electra_vs_bert.md)
    python benchmarks/bench_electra_vs_bert.py --quick    # smoke run: small slice, few steps (~2 min)"""
import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")


def load_avg():
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 300k characters, 2k vocabulary, 12 steps, "
                                                          "fine-tuning on 200 records")
    ap.add_argument("--text", default=None, help="pretraining text (default: sotu/sotu.txt under ../shared/data)")
    ap.add_argument("--spam", default=None, help="fine-tuning data (default: spam_assassin/train.jsonl)")
    ap.add_argument("--out", default="runs/bench-electra-vs-bert")
    ap.add_argument("--tokenizer", default=None,
                    help="folder with a tokenizer.json to reuse (e.g. OUT/tokenizer of an earlier run) instead of "
                         "training one: the `tokenizers` WordPiece trainer breaks ties in hash order, so a fresh "
                         "training can keep a slightly different vocabulary")
    ap.add_argument("--bert-steps", type=int, default=None, help="BERT's steps (default: the recipe's, 300)")
    ap.add_argument("--ft-epochs", type=float, default=1.0)
    ap.add_argument("--ft-lr", type=float, default=3e-4)
    ap.add_argument("--ft-batch-size", type=int, default=16)
    ap.add_argument("--ft-max-length", type=int, default=128)
    ap.add_argument("--ft-max-records", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0, help="fine-tuning seed (pretraining uses the recipes' seed)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared, busy 2-core machine two threads were "
                         "~3x slower per step than one)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from allformers.recipes.finetune import finetune
    from allformers.recipes.pretrain_encoders import (equal_flop_steps, get_pretrain_recipe, prepare_data,
                                                       random_init_encoder, recipe_step_flops, run_pretrain_recipe)

    BERT, ELECTRA = "bert-mlm-sotu-tiny", "electra-sotu-tiny"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_over = {"max_chars": 300_000, "vocab_size": 2000} if args.quick else {}
    bert_steps = args.bert_steps or (12 if args.quick else get_pretrain_recipe(BERT).train.max_steps)
    ft_records = args.ft_max_records or (200 if args.quick else None)
    ft_len = 64 if args.quick and args.ft_max_length == 128 else args.ft_max_length
    train_over = {"threads": args.threads, **({"eval_interval": 0} if args.quick else {})}
    load0, t0 = load_avg(), time.perf_counter()

    # 1. the shared tokenizer and rows
    import dataclasses

    recipe = get_pretrain_recipe(BERT)
    recipe = dataclasses.replace(recipe, **data_over) if data_over else recipe
    tok, train_rows, val_rows, text_path = prepare_data(recipe, args.text, args.tokenizer)
    tok.save(out / "tokenizer")
    t_data = time.perf_counter() - t0

    # 2. equal training FLOPs
    over = {**data_over, **train_over}
    f_bert = recipe_step_flops(BERT, tok, train_rows, overrides=over)
    f_electra = recipe_step_flops(ELECTRA, tok, train_rows, overrides=over)
    electra_steps = equal_flop_steps(bert_steps, f_bert, f_electra)
    print(f"[bench] FLOPs per step (batch x 128): BERT {f_bert['total'] / 1e9:.2f} G, ELECTRA "
          f"{f_electra['total'] / 1e9:.2f} G (x{f_electra['total'] / f_bert['total']:.3f}) -> BERT {bert_steps} "
          f"steps, ELECTRA {electra_steps} steps", flush=True)
    prepared = (tok, train_rows, val_rows, text_path)
    runs = {}
    for name, steps in ((BERT, bert_steps), (ELECTRA, electra_steps)):
        runs[name] = run_pretrain_recipe(name, out=out / name, max_steps=steps, prepared=prepared,
                                         overrides=over, progress=not args.no_progress)
        r = runs[name]
        print(f"[bench] {name}: {r['steps']} steps, {r['train_flops'] / 1e12:.2f} TFLOP, train "
              f"{r['times_s']['train']:.0f} s, held-out {r['val_metrics']}", flush=True)
    base = random_init_encoder(BERT, tok, out / "random-init" / "encoder",
                               seed=get_pretrain_recipe(BERT).train.seed)

    # 3. fine-tune all three the same way
    ft = {}
    for label, folder in (("BERT (MLM)", runs[BERT]["encoder"]), ("ELECTRA (disc.)", runs[ELECTRA]["encoder"]),
                          ("random init", str(base))):
        t1 = time.perf_counter()
        slug = label.split()[0].lower().replace("random", "random-init")
        ft[label] = finetune(folder, args.spam, out / f"spam-{slug}", epochs=args.ft_epochs, lr=args.ft_lr,
                             batch_size=args.ft_batch_size, max_length=ft_len, seed=args.seed,
                             max_records=ft_records, threads=args.threads, progress=not args.no_progress,
                             verbose=False)
        ft[label]["bench_wall_s"] = time.perf_counter() - t1
        print(f"[bench] fine-tuned {label}: accuracy {ft[label]['accuracy']:.4f} in {ft[label]['bench_wall_s']:.0f} s",
              flush=True)
    wall = time.perf_counter() - t0

    # the table
    def pre(name):
        r = runs[name]
        if r["objective"] == "mlm":
            losses = (f"MLM {r['train_parts']['mlm_loss']:.3f} / held-out MLM {r['val_loss']:.3f}, "
                      f"acc {r['val_metrics'].get('val_mlm_acc', float('nan')):.3f}")
        else:
            tp, vm = r["train_parts"], r["val_metrics"]
            losses = (f"gen MLM {tp['gen_loss']:.3f}, disc BCE {tp['disc_loss']:.4f} / held-out gen {vm['val_gen_loss']:.3f}, "
                      f"disc {vm['val_disc_loss']:.4f}, disc acc {vm['val_disc_acc']:.3f}")
        return (r["steps"], f"{r['train_flops'] / 1e12:.2f}", f"{r['times_s']['train']:.0f}", losses)

    rows = [("BERT (MLM)", *pre(BERT)), ("ELECTRA (disc.)", *pre(ELECTRA)), ("random init", 0, "0", "0", "-")]
    head = ("model", "pretrain steps", "pretrain TFLOP", "pretrain s", "final pretraining loss(es) (train, last 50 steps / held-out)",
            "spam acc")
    table = [head] + [(*row, f"{ft[row[0]]['accuracy']:.4f}") for row in rows]
    widths = [max(len(str(r[i])) for r in table) for i in range(len(head))]
    print()
    for i, r in enumerate(table):
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    n_held = ft["random init"]["split"]["heldout"]
    print(f"\nequal compute = equal counted training FLOPs (batch {runs[BERT]['batch_size']} x {runs[BERT]['seq_len']}); "
          f"ELECTRA's step costs x{f_electra['total'] / f_bert['total']:.3f} BERT's in FLOPs and "
          f"x{runs[ELECTRA]['times_s']['per_step'] / runs[BERT]['times_s']['per_step']:.2f} in wall time here")
    print(f"spam: fine-tuned {ft['random init']['settings']['steps']} steps (batch {args.ft_batch_size}, max_length {ft_len}, "
          f"lr {args.ft_lr}, seed {args.seed}); {n_held} held-out records, so one record = {100 / n_held:.2f} points")
    print(f"wall time {wall:.0f} s (data {t_data:.0f} s), {args.threads} thread(s), load avg {load0} -> {load_avg()}")

    summary = {
        "bench": "electra_vs_bert", "quick": args.quick, "text": str(text_path), "vocab_size": tok.vocab_size,
        "tokenizer": args.tokenizer or "trained on the text",
        "train_rows": len(train_rows), "heldout_rows": len(val_rows),
        "equal_compute": "equal counted training FLOPs (FlopCounterMode matmuls + attention by formula)",
        "flops_per_step": {"bert": f_bert["total"], "electra": f_electra["total"]},
        "pretrain": {name: {"steps": r["steps"], "train_flops": r["train_flops"], "train_s": round(r["times_s"]["train"], 1),
                            "s_per_step": round(r["times_s"]["per_step"], 3), "train_parts": r["train_parts"],
                            "val_loss": r["val_loss"], "val_metrics": r["val_metrics"], "params": r["params"]}
                     for name, r in runs.items()},
        "spam": {label: {"accuracy": f["accuracy"], "heldout_loss": f["heldout_loss"], "steps": f["settings"]["steps"],
                         "train_s": round(f["times_s"]["train"], 1), "per_class": f["per_class"]}
                 for label, f in ft.items()},
        "finetune_settings": {"epochs": args.ft_epochs, "lr": args.ft_lr, "batch_size": args.ft_batch_size,
                              "max_length": ft_len, "seed": args.seed, "max_records": ft_records},
        "wall_time_s": round(wall, 1), "data_time_s": round(t_data, 1), "threads": args.threads,
        "load_avg": [load0, load_avg()], "torch": torch.__version__, "python": platform.python_version(),
    }
    (out / "bench.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
