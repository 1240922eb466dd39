"""`allformers` command line. Each subcommand lives in its own module with
`register(subparsers)`; the module's handler receives the parsed args."""
from __future__ import annotations

import argparse
import difflib
import importlib
import re
import sys

from ..errors import AllformersError

# subcommand -> module under allformers.cli ("self-instruct" lives in self_instruct.py)
COMMANDS = ["train", "generate", "chat", "embed", "convert", "zoo", "demo", "finetune", "classify", "pretrain", "sft", "self-instruct",
            "reward", "ppo", "dpo", "rlhf", "best-of-n", "mmcot", "imagine", "serve", "zero-shot", "caption", "ask",
            "quantize"]


class OneLineParser(argparse.ArgumentParser):
    """A flag argparse cannot read (--batch-size abc) is one line too, like every other error: the
    problem and where the usage is, not the whole usage block (exit code 2 as argparse's)."""

    def error(self, message):
        wrong = re.match(r"argument \{.*\}: invalid choice: '([^']*)'", message)
        if wrong:  # a mistyped command: the close ones, not argparse's list of every choice twice
            close = difflib.get_close_matches(wrong[1], COMMANDS, n=3, cutoff=0.7)
            message = f"unknown command {wrong[1]!r}" + (f"; did you mean {', '.join(close)}?" if close else
                                                          f"; the commands are {', '.join(COMMANDS)}")
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="allformers", description="The transformer family from one set of blocks.")
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
