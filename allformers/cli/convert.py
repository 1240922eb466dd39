"""`allformers convert SRC DST --to allformers|hf`: between our format, HF folders and GGUF (import only)."""


def register(sub):
    p = sub.add_parser("convert", help="convert a checkpoint (allformers / Hugging Face folder / .gguf)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", choices=["allformers", "hf"], default="allformers")
    p.add_argument("--overwrite", action="store_true",
                   help="write into DST although it holds files that are not a checkpoint (they are kept; only the "
                        "checkpoint's own files are written). Without it such a DST, or a file, is refused")
    p.set_defaults(handler=run)


def run(args):
    from .common import load_any

    from pathlib import Path

    from ..checkpoints.atomic import check_destination

    check_destination(Path(args.dst), overwrite=args.overwrite)  # before the (slow) load of SRC
    model = load_any(args.src)
    model.save(args.dst, format=args.to, tokenizer=getattr(model, "tokenizer", None), overwrite=args.overwrite)
    print(f"wrote {args.to} checkpoint to {args.dst}")
    return 0
