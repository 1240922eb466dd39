"""`allformers train --recipe NAME`: run any named recipe of the one registry (allformers.recipes):
char LMs, encoder pretraining, fine-tuning, SFT, seq2seq, RLHF, self-instruct, Multimodal-CoT.
`allformers train --list` lists them. Also under torchrun for DDP:
`torchrun --nproc_per_node 2 -m allformers.cli.main train --recipe shakespeare-char-cpu`.

Settings: the flags below for the common ones, `--set KEY=VALUE` (repeatable) for any other field of
the recipe or of its nested settings (`--set epochs=2`, `--set ppo.kl_coef=0.5`); how a key finds
its place is in allformers/recipes/registry.py."""
import json

from .common import add_old_flag, add_run_args

# flag -> (override key, type, help); None values are left to the recipe
OVERRIDES = [
    ("--model", "model", str, "the model to start from or build (a zoo name, folder, .gguf, or 'smollm2'/'minilm')"),
    ("--batch-size", "batch_size", int, "sequences per optimizer step, over all ranks and micro-batches"),
    ("--grad-accum", "grad_accum", int, "micro-batches per step"),
    ("--lr", "lr", float, "peak learning rate"),
    ("--min-lr", "min_lr", float, "learning rate at the end of the cosine"),
    ("--warmup-steps", "warmup_steps", int, "linear warmup steps"),
    ("--lr-decay-steps", "lr_decay_steps", int, "cosine length (default: max steps)"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay on >= 2-D weights"),
    ("--beta2", "beta2", float, "AdamW beta2"),
    ("--grad-clip", "grad_clip", float, "gradient norm clip (0: off)"),
    ("--eval-interval", "eval_interval", int, "steps between evaluations"),
    ("--eval-iters", "eval_iters", int, "batches per evaluation set"),
    ("--log-interval", "log_interval", int, "steps between metrics records"),
    ("--checkpoint-interval", "checkpoint_interval", int, "steps between checkpoints (0: only at the end)"),
    ("--dropout", "dropout", float, "model dropout"),
    ("--block-size", "block_size", int, "context length"),
    ("--n-layer", "n_layer", int, "layers"),
    ("--n-head", "n_head", int, "attention heads"),
    ("--n-embd", "n_embd", int, "width"),
    ("--samples", "samples", int, "char LMs: texts to sample at the end"),
]


def add_recipe_args(p, default_recipe=None):
    """The flags every recipe command shares: which recipe, where to, how long, the run flags."""
    p.add_argument("--recipe", default=default_recipe, help="recipe name (see --list)")
    p.add_argument("--list", action="store_true", help="list the recipes and exit")
    p.add_argument("--data", help="the recipe's data (a file or folder; default: the recipe's own, under "
                   "../shared/data)")
    p.add_argument("--out", help="output folder (default: runs/RECIPE)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (every stage)")
    p.add_argument("--seed", type=int, help="seed (init, data order, dropout)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    add_run_args(p)
    p.set_defaults(device=None)
    for old, new, dest, typ in OLD_FLAGS:
        add_old_flag(p, old, new, dest, typ)


OLD_FLAGS = [("--data-dir", "--data", "data", None), ("--out-dir", "--out", "out", None),
             ("--max-iters", "--max-steps", "max_steps", int), ("--num-threads", "--threads", "threads", int),
             ("--warmup-iters", "--warmup-steps", "o_warmup_steps", int),
             ("--lr-decay-iters", "--lr-decay-steps", "o_lr_decay_steps", int)]


def register(sub):
    p = sub.add_parser("train", help="run any named recipe (allformers train --list)",
                       description="Run a named recipe: char LM, CTRL, encoder pretraining, fine-tuning, SFT (Alpaca, "
                                   "Koala), seq2seq, RLHF, self-instruct, Multimodal-CoT or text-to-image. "
                                   "--set KEY=VALUE changes any other setting.")
    add_recipe_args(p, default_recipe="shakespeare-char-cpu")
    for flag, dest, typ, text in OVERRIDES:
        p.add_argument(flag, dest=f"o_{dest}", type=typ, help=text)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", dest="settings",
                   help="any recipe setting (repeatable): --set epochs=2 --set ppo.kl_coef=0.5")
    p.set_defaults(handler=run, overrides=OVERRIDES)


def run(args, kind=None):
    """Run args.recipe with the flags' changes; print the recipe's report (or the JSON summary)."""
    from ..recipes import RECIPES, describe, get_recipe, parse_set, run_recipe
    from ..recipes.registry import printable

    if args.list:
        print(describe(r for r in RECIPES.values() if kind is None or isinstance(r, kind)))
        return 0
    recipe = get_recipe(args.recipe, kind)  # an unknown name fails before anything is loaded
    overrides = {dest: getattr(args, f"o_{dest}") for _, dest, _, _ in args.overrides}
    overrides.update(parse_set(getattr(args, "settings", None)))
    result = run_recipe(recipe.name, out=args.out, data=args.data, max_steps=args.max_steps, seed=args.seed,
                        threads=args.threads, device=args.device, overrides=overrides, progress=not args.no_progress,
                        resume=args.resume, verbose=not args.json)
    if result.get("samples") is None and recipe.kind == "char-lm":  # not rank 0 under torchrun: rank 0 reports
        return 0
    if args.json:
        print(json.dumps({k: v for k, v in printable(result).items()
                          if k not in ("model_config", "train_config", "generator_config")}, indent=2, default=str))
    else:
        print(recipe.report(result))
    return 0
