"""`allformers dpo --model smollm2 --pairs FILE.jsonl --out DIR [--loss ipo]`: direct preference
optimisation with LoRA; the merged policy is saved into DIR."""
import json

from ..training.rlhf import DPOConfig
from .rlhf import add_pair_training_args, lora_from, read_pairs


def register(sub):
    p = sub.add_parser("dpo", help="DPO (or IPO) on preference pairs; saves the merged policy")
    add_pair_training_args(p, "policy", steps=DPOConfig.steps, lr=DPOConfig.lr)
    p.add_argument("--loss", default="dpo", choices=("dpo", "ipo"))
    p.add_argument("--beta", type=float, default=DPOConfig.beta, help="strength of the implicit KL constraint")
    p.set_defaults(handler=run)


def run(args):
    from ..checkpoints import save
    from ..models.lora import merge_lora
    from ..training.rlhf import pairs_from_records, train_dpo
    from .common import load_model

    lm = load_model(args.model)
    pairs = pairs_from_records(read_pairs(args.pairs), lm.tokenizer, args.seed)
    cfg = DPOConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, beta=args.beta, loss=args.loss,
                    lora=lora_from(args), seed=args.seed)
    fit = train_dpo(lm, lm.tokenizer, pairs, cfg, out=args.out, progress=not args.no_progress,
                    threads=args.threads)
    save(merge_lora(lm), args.out, tokenizer=lm.tokenizer)
    last = [r for r in fit["history"] if r["event"] == "train"][-1]
    fit.pop("history")
    if args.json:
        print(json.dumps(fit, indent=2))
    else:
        print(f"{args.loss}: {fit['step']} steps in {fit['train_time_s']:.0f} s; last batch loss {last['loss']:.4f}, "
              f"pair accuracy {last['accuracy']:.2f}, margin {last['margin']:.3f}")
        print(f"saved to {args.out} (allformers chat {args.out}); plot: {fit['plot']}")
    return 0
