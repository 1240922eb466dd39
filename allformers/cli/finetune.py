"""`allformers finetune --model minilm --task classification --data FILE.jsonl --out runs/spam`:
turn an encoder into a sequence classifier (details in allformers/recipes/finetune.py)."""
import json

from .common import add_run_args

TASKS = ("classification", "sequence-classification")


def register(sub):
    p = sub.add_parser("finetune", help="fine-tune an encoder into a text classifier (e.g. spam / ham)",
                       description="Fine-tune an encoder (an allformers or Hugging Face folder, or 'minilm') on a "
                                   "JSON-lines file of {text, label[, subject, id]} records. A fixed share of each "
                                   "label (by id hash) is held out and evaluated; the classifier is saved into --out.")
    p.add_argument("--model", default="minilm", help="encoder folder, or 'minilm' (the bundled all-MiniLM-L6-v2)")
    p.add_argument("--task", default="classification", choices=TASKS, help="what to fine-tune for")
    p.add_argument("--data", help="JSON-lines file (default: spam_assassin/train.jsonl under ../shared/data)")
    p.add_argument("--out", default="runs/spam", help="output folder: the model, finetune.json, metrics, plot")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the training part (fractions allowed)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (warmup, then cosine to lr/10)")
    p.add_argument("--batch-size", type=int, default=16, help="records per optimizer step")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--max-length", type=int, default=128, help="tokens per record (longer ones are truncated)")
    p.add_argument("--eval-fraction", type=float, default=0.2, help="share of each label held out (fixed by id hash)")
    p.add_argument("--seed", type=int, default=0, help="seed for the head's init, data order and dropout")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout while fine-tuning")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-fraction", type=float, default=0.06, help="share of the steps spent warming up")
    p.add_argument("--eval-interval", type=int, default=0, help="steps between held-out evaluations (0: at the end)")
    p.add_argument("--max-records", type=int, help="use a fixed subset of this many records (quick trials)")
    p.add_argument("--checkpoint-interval", type=int, default=0, help="steps between checkpoints (0: none)")
    p.add_argument("--keep-checkpoint", action="store_true", help="keep OUT/checkpoint (optimizer state) at the end")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    add_run_args(p)
    p.set_defaults(handler=run)


def run(args):
    from ..recipes.finetune import finetune

    result = finetune(args.model, args.data, args.out, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                      grad_accum=args.grad_accum, max_length=args.max_length, eval_fraction=args.eval_fraction,
                      seed=args.seed, dropout=args.dropout, weight_decay=args.weight_decay,
                      warmup_fraction=args.warmup_fraction, eval_interval=args.eval_interval,
                      max_records=args.max_records, checkpoint_interval=args.checkpoint_interval,
                      keep_checkpoint=args.keep_checkpoint or args.checkpoint_interval > 0, resume=args.resume,
                      threads=args.threads, device=args.device, progress=not args.no_progress)
    if "table" not in result:  # not rank 0 under torchrun
        return 0
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "table"}, indent=2))
        return 0
    t = result["times_s"]
    print(result["table"])
    print(f"trained {result['settings']['steps']} steps ({result['settings']['epochs']} epochs, max_length "
          f"{result['settings']['max_length']}) in {t['train']:.0f} s; total {t['total']:.0f} s")
    print(f"model: {result['out']} (allformers classify {result['out']} --input FILE.jsonl)\n"
          f"metrics: {result['metrics_file']}\nplot: {result['plot']}")
    return 0
