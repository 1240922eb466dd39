"""`allformers best-of-n --model smollm2 --reward RM_DIR --n 8 "prompt"`: sample n replies and keep the
one the reward model ranks highest (Sparrow's reranking)."""
import json


def register(sub):
    p = sub.add_parser("best-of-n", help="sample n replies, return the one a reward model ranks highest")
    p.add_argument("prompt")
    p.add_argument("--model", default="smollm2", help="chat model (folder, .gguf or 'smollm2')")
    p.add_argument("--reward", required=True, help="reward model folder (from `allformers reward`)")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--all", action="store_true", help="print every candidate with its score")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=run)


def run(args):
    from .. import load
    from ..training.rlhf import best_of_n
    from .common import load_model

    lm = load_model(args.model)
    best, ranked = best_of_n(lm, lm.tokenizer, load(args.reward), args.prompt, args.n,
                             max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    if args.json:
        print(json.dumps({"best": best, "ranked": [{"score": s, "reply": r} for s, r in ranked]}))
    elif args.all:
        for s, r in ranked:
            print(f"{s:+.3f}  {r!r}")
    else:
        print(best)
    return 0
