"""`allformers train --recipe NAME`: run a named training recipe (also under torchrun for DDP:
`torchrun --nproc_per_node 2 -m allformers.cli.main train --recipe shakespeare-char-cpu`)."""
import json

# flag -> (override key, type, help); None values are left to the recipe
OVERRIDES = [
    ("--batch-size", "batch_size", int, "sequences per optimizer step, over all ranks and micro-batches"),
    ("--grad-accum", "grad_accum", int, "micro-batches per step"),
    ("--lr", "lr", float, "peak learning rate"),
    ("--min-lr", "min_lr", float, "learning rate at the end of the cosine"),
    ("--warmup-iters", "warmup_iters", int, "linear warmup steps"),
    ("--lr-decay-iters", "lr_decay_iters", int, "cosine length (default: max iters)"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay on >= 2-D weights"),
    ("--beta2", "beta2", float, "AdamW beta2"),
    ("--grad-clip", "grad_clip", float, "gradient norm clip (0: off)"),
    ("--eval-interval", "eval_interval", int, "steps between evaluations"),
    ("--eval-iters", "eval_iters", int, "batches per evaluation set"),
    ("--log-interval", "log_interval", int, "steps between metrics records"),
    ("--checkpoint-interval", "checkpoint_interval", int, "steps between checkpoints (0: only at the end)"),
    ("--device", "device", str, "cpu, cuda or auto"),
    ("--num-threads", "num_threads", int, "torch CPU threads"),
    ("--dropout", "dropout", float, "model dropout"),
    ("--block-size", "block_size", int, "context length"),
    ("--n-layer", "n_layer", int, "layers"),
    ("--n-head", "n_head", int, "attention heads"),
    ("--n-embd", "n_embd", int, "width"),
]


def register(sub):
    p = sub.add_parser("train", help="train a named recipe (e.g. shakespeare-char-cpu)")
    p.add_argument("--recipe", default="shakespeare-char-cpu", help="recipe name (see --list)")
    p.add_argument("--list", action="store_true", help="list the recipes and exit")
    p.add_argument("--data-dir", help="folder holding tinyshakespeare/input.txt (default: ../shared/data or download)")
    p.add_argument("--out-dir", help="output folder (default: runs/RECIPE)")
    p.add_argument("--max-iters", type=int, help="optimizer steps")
    p.add_argument("--seed", type=int, help="seed for init, data order and dropout")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--samples", type=int, default=2, help="samples to print at the end")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    for flag, dest, typ, text in OVERRIDES:
        p.add_argument(flag, dest=f"o_{dest}", type=typ, help=text)
    p.set_defaults(handler=run)


def run(args):
    from ..training import RECIPES, run_recipe

    if args.list:
        for r in RECIPES.values():
            print(f"{r.name:<24} {r.description}\n{'':<24} target: {r.target}")
        return 0
    overrides = {dest: getattr(args, f"o_{dest}") for _, dest, _, _ in OVERRIDES}
    result = run_recipe(args.recipe, data_dir=args.data_dir, out_dir=args.out_dir, max_iters=args.max_iters,
                        seed=args.seed, progress=not args.no_progress, resume=args.resume, overrides=overrides,
                        n_samples=args.samples)
    if "samples" not in result:  # not rank 0 under torchrun: rank 0 reports
        return 0
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k not in ("model_config", "train_config")}, indent=2))
        return 0
    for i, text in enumerate(result["samples"]):
        print(f"--- sample {i + 1}\n{text}")
    print(f"--- {args.recipe}: val loss {result['val_loss']:.4f}, train loss {result['train_loss']:.4f}, "
          f"{result['step']} steps in {result['wall_time_s']:.1f} s "
          f"({result['tokens_per_s'] or 0:.0f} tokens/s, MFU {100 * (result['mfu'] or 0):.1f}%)")
    print(f"checkpoint: {result['checkpoint']}\nmetrics: {result['metrics']}\nplot: {result['plot']}")
    return 0
