"""`allformers caption IMAGE [IMAGE ...] --model FOLDER`: greedy captions of pictures with a saved captioning
model (CoCa: models/coca.py), one line per picture."""
from __future__ import annotations

import json


def register(sub):
    p = sub.add_parser("caption", help="write a caption for each picture (CoCa)", description=__doc__.split("\n\n")[0])
    p.add_argument("images", nargs="+", help="picture files (PNG, JPEG: anything PIL reads)")
    p.add_argument("--model", required=True, help="a saved CoCa folder (with its tokenizer)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="at most this many words (default: the context)")
    p.add_argument("--json", action="store_true", help="one JSON line per picture: {image, caption}")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.set_defaults(handler=run)


def run(args):
    import torch

    from ..errors import AllformersError
    from .common import load_image_model

    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise AllformersError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = load_image_model(args.model, "caption")
    pixels = processor(list(args.images))  # (B, 3, H, W); a missing or unreadable file is named
    captions = model.caption(model.tokenizer, pixels, max_new_tokens=args.max_new_tokens)
    for path, text in zip(args.images, captions):
        print(json.dumps({"image": path, "caption": text}) if args.json else f"{path}: {text}")
    return 0
