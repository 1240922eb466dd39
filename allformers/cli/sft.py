"""`allformers sft --model smollm2 --data FILE.jsonl --template chatml --out runs/sft [--lora-rank 8 --merge]`:
supervised fine-tuning on prompt/response records (details in allformers/recipes/sft.py)."""
import json

from ..models.lora import LoRAConfig
from ..objectives.sft import TEMPLATES
from .common import add_old_flag, add_run_args


def register(sub):
    p = sub.add_parser("sft", help="supervised fine-tuning of a causal LM on prompt/response records (full or LoRA)",
                       description="Fine-tune a causal LM on a JSON-lines file of Alpaca records {instruction, input, "
                                   "output} or chat records {messages}; the loss is on the response tokens only. "
                                   "The result is saved into --out with its tokenizer (`allformers chat OUT`).")
    p.add_argument("--model", default="smollm2", help="model folder, .gguf file, or 'smollm2' (bundled)")
    p.add_argument("--data", required=True, help="JSON-lines file of SFT records")
    p.add_argument("--template", default="chatml", choices=TEMPLATES,
                   help="chatml: the tokenizer's chat template (built-in ChatML if it has none); alpaca: Stanford Alpaca's prompt")
    p.add_argument("--out", required=True, help="output folder: model (or adapters), sft.json, metrics, plot")
    g = p.add_argument_group("LoRA (without --lora-rank every weight is trained)")
    g.add_argument("--lora-rank", type=int, default=0, help="rank of the adapters (0: full fine-tuning)")
    g.add_argument("--lora-alpha", type=float, default=16.0, help="the update is scaled by alpha / rank")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input")
    g.add_argument("--lora-targets", nargs="+", default=list(LoRAConfig.targets),
                   help="Linear names (last path component) to adapt")
    g.add_argument("--merge", action="store_true", help="fold the adapters into the weights and save a plain model "
                                                        "(default: save only the adapters and the base's path)")
    p.add_argument("--pack", action="store_true", help="pack several examples per row (attention isolated per example)")
    p.add_argument("--max-length", type=int, help="tokens per example and per packed row (default: 512 or block_size)")
    p.add_argument("--max-steps", type=int, default=100, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, help="rows per optimizer step")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-4 with LoRA, 2e-5 without)")
    p.add_argument("--min-lr", type=float, default=None, help="end of the cosine (default lr / 10)")
    p.add_argument("--warmup-steps", type=int, default=None, help="default: max_steps / 10")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--eval-fraction", type=float, default=0.1, help="share of records held out (fixed by hash; 0: none)")
    p.add_argument("--eval-interval", type=int, default=0, help="steps between held-out evaluations (0: start and end)")
    p.add_argument("--max-records", type=int, help="use only the first N records")
    p.add_argument("--seed", type=int, default=0)
    add_run_args(p)
    add_old_flag(p, "--max-iters", "--max-steps", "max_steps", int)
    add_old_flag(p, "--warmup-iters", "--warmup-steps", "warmup_steps", int)
    p.set_defaults(handler=run)


def run(args):
    from ..recipes.sft import run_sft

    lora = (LoRAConfig(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                       targets=tuple(args.lora_targets)) if args.lora_rank else None)
    result = run_sft(args.model, args.data, args.out, template=args.template, lora=lora,
                     merge=args.merge, pack=args.pack, max_length=args.max_length, max_steps=args.max_steps,
                     batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, min_lr=args.min_lr,
                     warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
                     eval_fraction=args.eval_fraction, eval_interval=args.eval_interval,
                     max_records=args.max_records, seed=args.seed, threads=args.threads, device=args.device,
                     progress=not args.no_progress)
    result.pop("trained_model")
    if result["saved"] is None:  # not rank 0 under torchrun
        return 0
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    print(f"trained {result['settings']['max_steps']} steps in {result['times_s']['train']:.0f} s "
          f"({result['trainable_params']:,} of {result['total_params']:,} parameters trained)")
    print(f"held-out response loss: {fmt(result['heldout_loss_before'])} -> {fmt(result['heldout_loss_after'])}; "
          f"train loss {fmt(result['first_train_loss'])} -> {fmt(result['final_train_loss'])}")
    print(f"saved {result['saved']} to {result['out']} (allformers chat {result['out']})\n"
          f"metrics: {result['metrics_file']}\nplot: {result['plot']}")
    return 0
