"""`allformers pretrain --recipe NAME [--data FILE.txt] [--out DIR] [--max-steps N]`: pretrain an
encoder from scratch on a text file (BERT's MLM or ELECTRA; details in
allformers/recipes/pretrain_encoders.py). The same as `allformers train --recipe NAME` for the
encoder-pretraining recipes. The encoder to fine-tune lands in OUT/encoder:
`allformers finetune --model OUT/encoder`."""
from . import train

# flag -> (override key, type, help); None values are left to the recipe
OVERRIDES = [
    ("--batch-size", "batch_size", int, "sequences per optimizer step"),
    ("--lr", "lr", float, "peak learning rate"),
    ("--min-lr", "min_lr", float, "learning rate at the end of the cosine"),
    ("--warmup-steps", "warmup_steps", int, "linear warmup steps"),
    ("--eval-interval", "eval_interval", int, "steps between held-out evaluations (0: at the end)"),
    ("--log-interval", "log_interval", int, "steps between metrics records"),
    ("--checkpoint-interval", "checkpoint_interval", int, "steps between checkpoints (0: only at the end)"),
    ("--vocab-size", "vocab_size", int, "WordPiece vocabulary size (when the tokenizer is trained here)"),
    ("--max-chars", "max_chars", int, "read only the first N characters of the text (smoke runs)"),
    ("--tokenizer", "tokenizer", str, "folder with tokenizer.json to use instead of training one"),
]


def register(sub):
    p = sub.add_parser("pretrain", help="pretrain an encoder from scratch (BERT MLM or ELECTRA) on a text file",
                       description="Pretrain an encoder from scratch on a plain text file with a named recipe "
                                   "(bert-mlm-sotu-tiny, electra-sotu-tiny). A WordPiece tokenizer is trained on "
                                   "the text unless --tokenizer is given. OUT/encoder is the model to fine-tune.")
    train.add_recipe_args(p, default_recipe="bert-mlm-sotu-tiny")
    for flag, dest, typ, text in OVERRIDES:
        p.add_argument(flag, dest=f"o_{dest}", type=typ, help=text)
    p.set_defaults(handler=run, overrides=OVERRIDES)


def run(args):
    from ..recipes.pretrain_encoders import PretrainRecipe

    return train.run(args, kind=PretrainRecipe)
