"""`allformers convert SRC DST --to allformers|hf`: between our format, HF folders and GGUF (import only)."""


def register(sub):
    p = sub.add_parser("convert", help="convert a checkpoint (allformers / Hugging Face folder / .gguf)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", choices=["allformers", "hf"], default="allformers")
    p.set_defaults(handler=run)


def run(args):
    from .common import load_any

    model = load_any(args.src)
    model.save(args.dst, format=args.to, tokenizer=getattr(model, "tokenizer", None))
    print(f"wrote {args.to} checkpoint to {args.dst}")
    return 0
