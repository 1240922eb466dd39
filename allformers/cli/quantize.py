"""`allformers quantize MODEL -o OUT`: a decoder's Linears to int8 (models/int8.py), saved as an int8
folder that `allformers.load` (and generate, chat, serve) read back quantized.

MODEL is a folder (allformers or Hugging Face), a .gguf file, a bundled model ("smollm2") or a zoo
name (random weights: for trying the format). OUT must be new or empty: a folder that holds anything
(an earlier checkpoint included) is replaced only with --overwrite, and never when it is MODEL."""
from __future__ import annotations

import os
import sys
from pathlib import Path


def register(sub):
    p = sub.add_parser("quantize", help="int8-quantize a decoder's Linear weights and save the int8 folder")
    p.add_argument("model", help="a folder, a .gguf file, 'smollm2', or a zoo name (random weights)")
    p.add_argument("-o", "--out", required=True, help="the int8 folder to write (new or empty)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace what OUT holds (an earlier checkpoint's files; other files beside them are kept)")
    p.add_argument("--seed", type=int, default=0, help="seed of a zoo name's random weights")
    p.add_argument("--scheme", choices=("weight-only", "dynamic"), default="weight-only",
                   help="weight-only (default): int8 weights, bf16 activations, torch._weight_int8pack_mm; dynamic: "
                        "int8 activations too (torch.ao's dynamic Linear), after SmoothQuant")
    p.add_argument("--calibrate", default=None, metavar="TEXT",
                   help="the dynamic scheme's SmoothQuant calibration text: 'sotu-first' (its default: the first State "
                        "of the Union addresses, not bench_quant's held-out ones), 'shakespeare', a .txt file, or "
                        "'none' (no smoothing)")
    p.add_argument("--alpha", type=float, default=None, help="SmoothQuant migration strength (default 0.65)")
    p.add_argument("--exclude", default=None, metavar="NAMES",
                   help="comma-separated Linear names/suffixes kept fp32 (default: none; 'mlp.proj' when smoothing: "
                        "the down-projections' outliers defeat int8 activations)")
    p.set_defaults(handler=run)


def _check_out(out: Path, source: str, overwrite: bool) -> None:
    from ..checkpoints.atomic import check_destination
    from ..errors import OutputError
    from ..training.guards import check_out

    if Path(source).exists() and out.exists() and os.path.samefile(source, out):
        raise OutputError(f"-o {out} is MODEL itself; quantizing into it would replace the fp32 weights: give "
                          f"another folder")
    check_out(out, what="-o folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"-o {out} already holds files ({', '.join(sorted(e.name for e in out.iterdir())[:4])}); "
                          f"give a new or empty folder, or pass --overwrite to replace the checkpoint in it")
    check_destination(out, overwrite=overwrite)


def _load(source: str, seed: int):
    import torch

    from ..checkpoints.io import load_reporting
    from ..config import REGISTRY, Config
    from ..errors import CheckpointError, UnknownModelError
    from ..models import build_model
    from ..zoo.assets import BUNDLED

    if Path(source).exists() or source.lower() in BUNDLED:
        return load_reporting(source)
    if source in REGISTRY:
        torch.manual_seed(seed)
        model = build_model(Config.from_name(source)).eval()
        print(f"[allformers] {source}: random weights (seed {seed}), no tokenizer", file=sys.stderr)
        return model
    if "/" in source or source.endswith((".gguf", ".safetensors")):
        raise CheckpointError(f"{source} does not exist; pass an allformers or Hugging Face folder, a .gguf file, "
                              f"'smollm2' or a zoo name")
    raise UnknownModelError(source, list(REGISTRY) + list(BUNDLED))


def run(args):
    from ..errors import QuantizationError
    from ..models.int8 import int8_modules, linear_weight_bytes, quantize_int8

    out = Path(args.out)
    _check_out(out, args.model, args.overwrite)  # before the (slow) load
    if args.scheme != "dynamic" and ((args.calibrate or "none").lower() != "none" or args.alpha is not None):
        raise QuantizationError("--calibrate/--alpha are SmoothQuant's, for the dynamic scheme's int8 activations; "
                                "the weight-only scheme needs no calibration: drop them or pass --scheme dynamic")
    calibrate = args.calibrate or ("sotu-first" if args.scheme == "dynamic" else "none")
    cal = None if calibrate.lower() == "none" else calibrate
    if cal is not None and cal not in ("sotu-first", "shakespeare") and not Path(cal).is_file():
        raise QuantizationError(f"--calibrate {cal}: not 'sotu-first', 'shakespeare', 'none' or a text file")
    model = _load(args.model, args.seed)
    before = linear_weight_bytes(model)["fp32"]
    if cal is not None and cal not in ("sotu-first", "shakespeare"):
        cal = Path(cal).read_text(encoding="utf-8")
    if cal is not None and getattr(model, "tokenizer", None) is None:
        print("[allformers] the model has no tokenizer: not smoothed (SmoothQuant calibrates on text)", file=sys.stderr)
        cal = None
    exclude = args.exclude if args.exclude is not None else ("mlp.proj" if cal is not None else "")
    exclude = tuple(e.strip() for e in exclude.split(",") if e.strip())
    if cal is None:
        quantize_int8(model, exclude=exclude, scheme=args.scheme)
    else:
        quantize_int8(model, smooth=True, calibration=cal, alpha=args.alpha, exclude=exclude, scheme=args.scheme)
    after = linear_weight_bytes(model)["int8"]
    model.save(out, tokenizer=getattr(model, "tokenizer", None), overwrite=args.overwrite)
    n = len(int8_modules(model))
    print(f"wrote int8 folder {out} ({args.scheme}): {n} Linears, their weights {before / 2**20:.1f} MiB fp32 -> "
          f"{after / 2**20:.1f} MiB int8 + scales")
    return 0
