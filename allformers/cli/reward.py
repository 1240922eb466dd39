"""`allformers reward --model smollm2 --pairs FILE.jsonl --out DIR`: train a reward model (the LM with a
scalar head on the last token) on {prompt, chosen, rejected} records."""
import json

from ..training.rlhf import RewardConfig
from .rlhf import add_pair_training_args, lora_from, read_pairs


def register(sub):
    p = sub.add_parser("reward", help="train a reward model on preference pairs (prompt, chosen, rejected)")
    add_pair_training_args(p, "reward model", steps=RewardConfig.steps, lr=RewardConfig.lr)
    p.add_argument("--eval-fraction", type=float, default=0.2, help="share of prompts held out for accuracy (all pairs of a prompt stay on one side)")
    p.set_defaults(handler=run)


def run(args):
    from ..checkpoints import save
    from ..training.rlhf import pairs_from_records, split_records, train_reward_model
    from .common import load_model

    lm = load_model(args.model)
    train, held = split_records(read_pairs(args.pairs), args.eval_fraction)
    cfg = RewardConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, lora=lora_from(args), seed=args.seed)
    rm, summary = train_reward_model(lm, lm.tokenizer, pairs_from_records(train, lm.tokenizer, args.seed), cfg,
                                     out=args.out, progress=not args.no_progress, threads=args.threads,
                                     eval_pairs=pairs_from_records(held, lm.tokenizer) if held else None)
    save(rm, args.out, tokenizer=lm.tokenizer)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        h = summary.get("heldout")
        print(f"reward model: {summary['steps']} steps in {summary['train_time_s']:.0f} s; "
              + (f"held-out pair accuracy {h['accuracy']:.3f} on {h['pairs']} pairs (margin {h['margin']:.2f})"
                 if h else "no held-out pairs"))
        print(f"saved to {args.out}")
    return 0
