"""`allformers zero-shot IMAGE [IMAGE ...] --labels a,b,c --model FOLDER`: zero-shot classification with a saved
contrastive model (CLIP, SigLIP or CoCa): each label, written into --template, is a caption; prints each
picture's labels from the most to the least likely, with their probabilities."""
from __future__ import annotations

import json


def register(sub):
    p = sub.add_parser("zero-shot", help="classify pictures by labels no one trained for (CLIP, SigLIP, CoCa)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("images", nargs="+", help="picture files (PNG, JPEG: anything PIL reads)")
    p.add_argument("--labels", required=True, help="comma-separated labels, e.g. 'a red circle,a blue square'")
    p.add_argument("--model", required=True, help="a saved CLIP / SigLIP / CoCa folder (with its tokenizer)")
    p.add_argument("--template", default="{}", help="the caption each label is written into, e.g. 'a photo of {}'")
    p.add_argument("--top", type=int, default=None, help="show only the k most likely labels")
    p.add_argument("--json", action="store_true", help="one JSON line per picture: {image, labels: {label: p}}")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.set_defaults(handler=run)


def run(args):
    import torch

    from ..errors import AllformersError
    from ..models.clip import zero_shot
    from .common import load_image_model

    labels = [x.strip() for x in args.labels.split(",") if x.strip()]
    if len(labels) < 2:
        raise AllformersError(f"--labels {args.labels!r}: give at least two comma-separated labels to choose between")
    if args.top is not None and args.top < 1:  # [:0] would print no labels, [:-1] all but the last
        raise AllformersError(f"--top {args.top}: show at least one label (--top 1), or leave --top out for all")
    if "{}" not in args.template:
        raise AllformersError(f"--template {args.template!r} has no {{}} for the label; e.g. 'a photo of {{}}'")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = load_image_model(args.model, "get_image_features")
    pixels = processor(list(args.images))  # (B, 3, H, W); a missing or unreadable file is named
    probs = zero_shot(model, model.tokenizer, pixels, labels, template=args.template)
    for path, row in zip(args.images, probs.tolist()):
        ranked = sorted(zip(labels, row), key=lambda lp: -lp[1])[:args.top]
        if args.json:
            print(json.dumps({"image": path, "labels": dict(ranked)}))
        else:
            print(path)
            for label, p in ranked:
                print(f"  {p:6.3f}  {label}")
    return 0
