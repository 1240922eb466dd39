"""`allformers rlhf --out runs/rlhf`: the whole ChatGPT recipe on the real SmolLM2-135M-Instruct
(pairs -> reward model -> PPO, and DPO; held-out property rates and KL): the recipe rlhf-smollm2 of
`allformers train`. Details in allformers/recipes/rlhf.py. Also the shared flags of `reward`, `ppo` and `dpo`."""
import json

from .common import add_old_flag, add_run_args


def add_lora_args(p, rank: int = 8, top: int = 8):
    g = p.add_argument_group("LoRA adapters (the frozen base with adapters off is the reference model)")
    g.add_argument("--lora-rank", type=int, default=rank)
    g.add_argument("--lora-alpha", type=float, default=2.0 * rank)
    g.add_argument("--top-layers", type=int, default=top, help="adapt only the last K blocks (cheaper backward)")


def add_pair_training_args(p, what: str, *, steps: int, lr: float):
    """The flags `reward` and `dpo` share: where the model and pairs come from, where the result goes,
    the step settings, LoRA and the run flags."""
    p.add_argument("--model", default="smollm2", help="the LM to start from (folder, .gguf or 'smollm2')")
    p.add_argument("--pairs", required=True, help='JSON-lines file of {"prompt", "chosen", "rejected"} records')
    p.add_argument("--out", required=True, help=f"folder for the {what} (allformers format), metrics, plot")
    p.add_argument("--max-steps", dest="steps", type=int, default=steps, help="optimizer steps")
    add_old_flag(p, "--steps", "--max-steps", "steps", int)
    p.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--seed", type=int, default=0)
    add_lora_args(p)
    add_run_args(p)


def read_pairs(path) -> list[dict]:
    from ..training.data import read_jsonl

    return [r for _, r in read_jsonl(path)]


def lora_from(args):
    from ..models.lora import LoRAConfig

    return LoRAConfig(rank=args.lora_rank, alpha=args.lora_alpha, top_layers=args.top_layers)


def register(sub):
    p = sub.add_parser("rlhf", help="the ChatGPT recipe end to end: reward model, PPO and DPO on SmolLM2",
                       description="Sample preference pairs from the model (the chosen reply opens by agreeing to "
                                   "help), train a reward model, run PPO against it and, separately, DPO; print "
                                   "the held-out property rate and KL per reply for each, and save a plot.")
    p.add_argument("--model", default="smollm2", help="starting chat model (folder, .gguf or 'smollm2')")
    p.add_argument("--out", default="runs/rlhf", help="output folder: summary.json, pairs.jsonl, metrics, rlhf.png")
    p.add_argument("--quick", action="store_true", help="tiny settings that only check every stage runs")
    p.add_argument("--seed", type=int, default=0)
    add_run_args(p)
    p.set_defaults(handler=run)


def run(args):
    """The recipe rlhf-smollm2 (rlhf-smollm2-quick with --quick) of `allformers train`, from --model."""
    from ..recipes import get_recipe, run_recipe

    name = "rlhf-smollm2-quick" if args.quick else "rlhf-smollm2"
    summary = run_recipe(name, out=args.out, seed=args.seed, threads=args.threads, overrides={"model": args.model},
                         progress=not args.no_progress)
    print(json.dumps(summary, indent=2) if args.json else get_recipe(name).report(summary))
    print(f"summary: {args.out}/summary.json")
    return 0
