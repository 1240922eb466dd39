"""`allformers self-instruct --num 200 --out data.jsonl`: grow an Alpaca-format SFT data set
from a seed file of tasks with a chat model (see allformers.recipes.self_instruct; the same run as
`allformers train --recipe self-instruct-smollm2`)."""
import json


def register(sub):
    from ..recipes.self_instruct import SEED_TASKS, SelfInstructConfig

    d = SelfInstructConfig()
    p = sub.add_parser("self-instruct", help="generate instruction data from seed tasks (Alpaca's self-instruct)")
    p.add_argument("--model", default="smollm2", help="a chat model: folder, .gguf, or 'smollm2' (default)")
    p.add_argument("--seed-tasks", default=str(SEED_TASKS), help="JSONL of {instruction, input, output} "
                   "(default: the 20 tasks shipped with allformers)")
    p.add_argument("--num", type=int, default=d.num, help="machine-written tasks to keep")
    p.add_argument("--out", required=True, help="output JSONL; an existing one is resumed (see --fresh)")
    p.add_argument("--fresh", action="store_true", help="ignore (and overwrite) an existing --out instead of resuming")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--num-examples", type=int, default=d.num_examples, help="example tasks shown per prompt")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--threshold", type=float, default=d.threshold, help="reject at ROUGE-L >= this to a kept task")
    p.add_argument("--output-tokens", type=int, default=d.output_tokens, help="longest reply, in tokens")
    p.add_argument("--max-rounds", type=int, default=None, help="give up after this many rounds")
    p.add_argument("--seed", type=int, default=d.seed)
    p.set_defaults(handler=run)


def run(args):
    from ..recipes.self_instruct import SelfInstructConfig, run_self_instruct

    cfg = SelfInstructConfig(num=args.num, batch_size=args.batch_size, num_examples=args.num_examples,
                             threshold=args.threshold, output_tokens=args.output_tokens, seed=args.seed,
                             max_rounds=args.max_rounds)
    summary = run_self_instruct(args.model, args.seed_tasks, cfg, args.out, temperature=args.temperature,
                                top_p=args.top_p, fresh=args.fresh)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("out", "stats")}))
    return 0
