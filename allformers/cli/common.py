"""Pieces shared by the CLI commands."""
import argparse
import sys


class DeprecatedFlag(argparse.Action):
    """An old spelling of a flag: stores into the new flag's dest and says so on stderr."""

    def __init__(self, option_strings, dest, new: str = "", **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"allformers: {option_string} is deprecated, use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_old_flag(p, old: str, new: str, dest: str, type=None):
    """`old` keeps working as `new` (same dest and type), hidden from --help. Every command spells
    its common flags one way: --out, --data, --max-steps, --threads (issue 11)."""
    p.add_argument(old, dest=dest, type=type, action=DeprecatedFlag, new=new, help=argparse.SUPPRESS,
                   default=argparse.SUPPRESS)


def add_sampling_args(p):
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help=">= 0; 0 = greedy")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample among the k most likely tokens (0 or unset = off: every token is a candidate)")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample among the most likely tokens holding this share of probability, in (0, 1] "
                        "(unset or 1 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 0; 1 = off, above 1 discourages repeats")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)


def sampling_kwargs(args) -> dict:
    import torch

    gen = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                repetition_penalty=args.repetition_penalty, stop=args.stop, generator=gen)


def add_run_args(p):
    """Flags every training command takes: threads, device, progress bar, JSON summary."""
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def load_any(source: str):
    """A path (allformers folder, HF folder, .gguf) or the name of a bundled real model, its load report printed."""
    from ..checkpoints.io import load_reporting

    return load_reporting(source)


def load_model(source: str, quantized: bool = False):
    """load_any, for commands that need the model's tokenizer (quantized: a GGUF file on int4/int8 kernels)."""
    from ..checkpoints.io import load_reporting

    return load_reporting(source, need_tokenizer=True, quantized=quantized)


def add_quantized_arg(p):
    p.add_argument("--quantized", action="store_true",
                   help="a .gguf MODEL (or 'smollm2') runs its quantized weights on int4/int8 kernels instead of fp32")


def write(text: str):
    sys.stdout.write(text)
    sys.stdout.flush()




def load_image_model(folder: str, need: str):
    """A saved CLIP / SigLIP / CoCa folder (any `allformers.load` source) whose model has the method `need`
    ("get_image_features": it compares pictures with texts; "caption": it writes captions) and a tokenizer.
    -> (model, ImageProcessor). A model that cannot do it is refused naming what can."""
    from pathlib import Path

    from ..data.image_processing import ImageProcessor
    from ..errors import AllformersError

    model = load_any(folder)
    what = {"get_image_features": "compare pictures with texts: a CLIP, SigLIP or CoCa folder",
            "caption": "write captions: a CoCa folder (models/coca.py)"}[need]
    if not hasattr(model, need) or not hasattr(getattr(model, "config", None), "vision"):
        raise AllformersError(f"{folder} holds a {type(model).__name__}, which cannot {what}")
    if getattr(model, "tokenizer", None) is None:
        raise AllformersError(f"{folder} has no tokenizer.json; save the model with its tokenizer "
                              f"(model.save(folder, tokenizer=tok))")
    hf = Path(folder) / "preprocessor_config.json"
    if hf.is_file():  # a Hugging Face folder says how its pictures were prepared
        return model, ImageProcessor.from_hf(hf)
    size = model.config.vision.image_size  # allformers' own: resized to the tower's size, CLIP's mean / std
    return model, ImageProcessor.from_name("shapes", size=(size, size))
