"""`allformers` command line. Each subcommand lives in its own module with
`register(subparsers)`; the module's handler receives the parsed args."""
from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import AllformersError

# subcommand -> module under allformers.cli ("self-instruct" lives in self_instruct.py)
COMMANDS = ["train", "generate", "chat", "embed", "convert", "zoo", "demo", "finetune", "classify", "pretrain", "sft", "self-instruct",
            "reward", "ppo", "dpo", "rlhf", "best-of-n", "mmcot", "imagine", "serve", "zero-shot", "caption"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="allformers", description="The transformer family from one set of blocks.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name in COMMANDS:
        importlib.import_module(f"allformers.cli.{name.replace('-', '_')}").register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except AllformersError as e:  # our errors already say what to do: no traceback
        print(f"allformers {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
