"""Subject lines from e-mail bodies: does denoising pretraining help a tiny encoder-decoder?

Four rows, each fine-tuned with the same settings on the SpamAssassin training e-mails (body ->
subject) and scored by ROUGE-L F1 on the fixed 20% held out (finetune.heldout_split: the same
e-mails every benchmark holds out), greedy decoding:

    T5 from scratch | T5 + span corruption on sotu.txt | BART from scratch | BART + denoising on sotu.txt

Models: 2+2 layers, 128 wide (recipes/seq2seq.py: TINY); one byte-level BPE of 4,096
trained on sotu.txt + the training e-mails; 150 pretraining and 150 fine-tuning steps of 32 at the
architecture's learning rate (seq2seq_recipes.LR). A no-model reference (the body's first 6 words
as the subject) is printed too, and the number of distinct generated subjects (a model that
ignores its input writes the same line for every e-mail). Prints a table; the last line is one
JSON object.

    python benchmarks/bench_subject_lines.py            # the documented run (docs/seq2seq.md)
    python benchmarks/bench_subject_lines.py --quick    # smoke run: small data, a few steps"""
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


def pick_threads(arg: str) -> int:
    """'auto': every core on an idle machine, 1 when the machine is already busy (OpenMP threads
    that wait on each other are much slower than one thread when the cores are shared)."""
    cores = os.cpu_count() or 1
    if arg != "auto":
        return int(arg)
    return 1 if (load_avg() or 0) >= cores else cores


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 300K chars of sotu, 200 e-mails, 10 + 10 steps")
    ap.add_argument("--pretrain-steps", type=int, default=None, help="default 150 (quick: 10)")
    ap.add_argument("--finetune-steps", type=int, default=None, help="default 150 (quick: 10)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--max-source", type=int, default=128)
    ap.add_argument("--max-target", type=int, default=24)
    ap.add_argument("--rows", default="t5,t5-pretrained,bart,bart-pretrained")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", default="1", help="an int, or auto (1 on a busy machine, else all cores); default 1:\n"
                    "on shared cores two OpenMP threads were up to 50x slower than one for these tiny models")
    ap.add_argument("--out", default=None, help="save each fine-tuned model (with its tokenizer) under this folder")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)
    threads = pick_threads(args.threads)
    torch.set_num_threads(threads)

    from allformers.recipes import seq2seq as S

    load0, t0 = load_avg(), time.perf_counter()
    data = S.prepare_data(vocab_size=args.vocab_size, max_source=args.max_source, max_target=args.max_target,
                          max_sotu_chars=300_000 if args.quick else None, max_records=200 if args.quick else None)
    pre_iters = args.pretrain_steps or (10 if args.quick else S.PRETRAIN.max_steps)
    ft_iters = args.finetune_steps or (10 if args.quick else S.FINETUNE.max_steps)
    pre_cfg = S.PRETRAIN.replace(max_steps=pre_iters, batch_size=args.batch_size, seed=args.seed, threads=threads)
    ft_cfg = S.FINETUNE.replace(max_steps=ft_iters, batch_size=args.batch_size, seed=args.seed, threads=threads)
    baseline = S.baseline_scores(data)
    print(f"data: {json.dumps(data.info)}\nbaseline (no model): {baseline}", flush=True)

    rows = []
    for row in args.rows.split(","):
        kind, pretrained = row.split("-")[0], row.endswith("-pretrained")
        t1 = time.perf_counter()
        model = S.build(kind, data.tokenizer, seed=args.seed)
        pre = None
        if pretrained:
            pre = S.pretrain(model, kind, data, S.for_kind(pre_cfg, kind), progress=args.progress)
            print(f"[{row}] pretrained {pre['step']} steps in {pre['train_time_s']:.0f} s: "
                  f"val loss {pre['val_loss']:.3f}", flush=True)
        model = S.with_dropout(model, 0.1)
        ft = S.finetune_subjects(model, data, S.for_kind(ft_cfg, kind), progress=args.progress)
        ev = S.evaluate_subjects(model, data)
        if args.out:
            model.save(os.path.join(args.out, row), tokenizer=data.tokenizer)
        r = {"row": row, "params": model.num_params(),
             "pretrain_steps": pre["step"] if pre else 0, "pretrain_s": pre["train_time_s"] if pre else 0.0,
             "pretrain_val_loss": pre["val_loss"] if pre else None,
             "finetune_steps": ft["step"], "finetune_epochs": ft["epochs"], "finetune_s": ft["train_time_s"],
             "heldout_loss": ft["val_loss"], "rouge_l": ev["rouge_l"], "generate_s": ev["generate_s"],
             "empty_predictions": ev["empty_predictions"], "distinct_predictions": ev["distinct_predictions"],
             "lr": S.LR[kind], "row_wall_s": time.perf_counter() - t1,
             "examples": ev["examples"][:4]}
        rows.append(r)
        print(f"[{row}] ROUGE-L {r['rouge_l']:.4f}, held-out loss {r['heldout_loss']:.3f} "
              f"({r['row_wall_s']:.0f} s)", flush=True)
        for ex in ev["examples"][:4]:
            print(f"    ref: {ex['reference'][:70]!r}\n    got: {ex['prediction'][:70]!r}")
    wall = time.perf_counter() - t0

    names = {"t5": "T5 from scratch", "t5-pretrained": "T5 + span corruption (sotu)", "bart": "BART from scratch",
             "bart-pretrained": "BART + infilling/permutation (sotu)"}
    head = ["model", "params", "pretrain", "fine-tune", "held-out loss", "distinct outputs", "ROUGE-L F1"]
    table = [[names.get(r["row"], r["row"]), f"{r['params'] / 1e6:.2f}M",
              f"{r['pretrain_steps']} steps, {r['pretrain_s']:.0f} s" + (f", val {r['pretrain_val_loss']:.2f}"
                                                                        if r["pretrain_val_loss"] else ""),
              f"{r['finetune_steps']} steps ({r['finetune_epochs']:.2f} ep), {r['finetune_s']:.0f} s",
              f"{r['heldout_loss']:.3f}", f"{r['distinct_predictions']} / {data.info['heldout_emails']}",
              f"{r['rouge_l']:.4f}"] for r in rows]
    table.append(["reference: body's first 6 words", "-", "-", "-", "-", "-", f"{baseline['first_6_words']:.4f}"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *table)]
    print()
    for line in [head, ["-" * w for w in widths], *table]:
        print("| " + " | ".join(str(x).ljust(w) for x, w in zip(line, widths)) + " |")
    print(f"\n{data.info['train_emails']} training / {data.info['heldout_emails']} held-out e-mails, "
          f"{data.info['sotu_tokens']} sotu tokens; wall time {wall:.0f} s; threads {threads}; "
          f"load avg {load0} -> {load_avg()}")
    summary = {"bench": "subject_lines", "quick": args.quick, "wall_time_s": round(wall, 1), "threads": threads,
               "load_avg": [load0, load_avg()], "python": platform.python_version(), "torch": torch.__version__,
               "pretrain_steps": pre_iters, "finetune_steps": ft_iters, "batch_size": args.batch_size,
               "data": {k: v for k, v in data.info.items()}, "baseline": baseline,
               "rows": [{k: v for k, v in r.items() if k != "examples"} for r in rows]}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
