"""`allformers pretrain --recipe NAME [--data FILE.txt] [--out DIR] [--max-steps N]`: pretrain an
encoder from scratch on a text file (BERT's MLM or ELECTRA; details in
allformers/training/pretrain_encoders.py). The encoder to fine-tune lands in OUT/encoder:
`allformers finetune --model OUT/encoder`."""
import json

# flag -> (override key, type, help); None values are left to the recipe
OVERRIDES = [
    ("--batch-size", "batch_size", int, "sequences per optimizer step"),
    ("--lr", "lr", float, "peak learning rate"),
    ("--min-lr", "min_lr", float, "learning rate at the end of the cosine"),
    ("--warmup-iters", "warmup_iters", int, "linear warmup steps"),
    ("--eval-interval", "eval_interval", int, "steps between held-out evaluations (0: at the end)"),
    ("--log-interval", "log_interval", int, "steps between metrics records"),
    ("--checkpoint-interval", "checkpoint_interval", int, "steps between checkpoints (0: only at the end)"),
    ("--device", "device", str, "cpu, cuda or auto"),
    ("--num-threads", "num_threads", int, "torch CPU threads (on a busy shared CPU, 1 is often fastest)"),
    ("--vocab-size", "vocab_size", int, "WordPiece vocabulary size (when the tokenizer is trained here)"),
    ("--max-chars", "max_chars", int, "read only the first N characters of the text (smoke runs)"),
]


def register(sub):
    p = sub.add_parser("pretrain", help="pretrain an encoder from scratch (BERT MLM or ELECTRA) on a text file",
                       description="Pretrain an encoder from scratch on a plain text file with a named recipe "
                                   "(bert-mlm-sotu-tiny, electra-sotu-tiny). A WordPiece tokenizer is trained on "
                                   "the text unless --tokenizer is given. OUT/encoder is the model to fine-tune.")
    p.add_argument("--recipe", default="bert-mlm-sotu-tiny", help="recipe name (see --list)")
    p.add_argument("--list", action="store_true", help="list the recipes and exit")
    p.add_argument("--data", help="text file (default: the recipe's, sotu/sotu.txt under ../shared/data)")
    p.add_argument("--out", help="output folder (default: runs/RECIPE)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (default: the recipe's)")
    p.add_argument("--tokenizer", help="folder with tokenizer.json to use instead of training one")
    p.add_argument("--seed", type=int, help="seed for init, masking and sampling")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    for flag, dest, typ, text in OVERRIDES:
        p.add_argument(flag, dest=f"o_{dest}", type=typ, help=text)
    p.set_defaults(handler=run)


def run(args):
    from ..training.pretrain_encoders import describe_recipes, run_pretrain_recipe

    if args.list:
        print(describe_recipes())
        return 0
    overrides = {dest: getattr(args, f"o_{dest}") for _, dest, _, _ in OVERRIDES}
    r = run_pretrain_recipe(args.recipe, data=args.data, out_dir=args.out, max_steps=args.max_steps,
                            tokenizer=args.tokenizer, seed=args.seed, overrides=overrides, resume=args.resume,
                            progress=not args.no_progress, verbose=not args.json)
    if args.json:
        print(json.dumps({k: v for k, v in r.items() if k not in ("model_config", "generator_config")}, indent=2))
        return 0
    losses = ", ".join(f"{k} {v:.4f}" for k, v in {**r["train_parts"], **r["val_metrics"]}.items())
    print(f"--- {r['recipe']}: {r['steps']} steps of {r['batch_size']} x {r['seq_len']} tokens, "
          f"{r['train_flops'] / 1e12:.2f} TFLOP ({r['flops_per_step']['total'] / 1e9:.2f} GFLOP/step), "
          f"trained in {r['times_s']['train']:.0f} s, total {r['times_s']['total']:.0f} s")
    print(f"final train loss {r['final_train_loss']:.4f}, held-out loss {r['val_loss']:.4f}; {losses}")
    print(f"encoder: {r['encoder']} (allformers finetune --model {r['encoder']})"
          + (f"\ngenerator: {r['generator']}" if r["generator"] else "")
          + f"\nmetrics: {r['metrics']}\nplot: {r['plot']}")
    return 0
