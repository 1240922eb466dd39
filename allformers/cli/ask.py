"""`allformers ask IMAGE "question" --model FOLDER`: a greedy answer about a picture from a saved image + text model:
a VisionLanguageLM (PaLM-E / LLaVA, asked in its chat format) or a BLIP-2 with a decoder LM ("Question: ...
Answer:" after its queries), as benchmarks/bench_vision_language.py saves them (`--set palme.save=...`) or as
transformers saves LLaVA / BLIP-2. The picture is prepared by the folder's preprocessor_config.json (else resized
to the vision tower's size with CLIP's mean and std)."""
from __future__ import annotations

from pathlib import Path


def register(sub):
    p = sub.add_parser("ask", help="answer a question about a picture with a saved PaLM-E / LLaVA / BLIP-2 model",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("image", help="the picture (PNG, JPEG, ... anything PIL reads)")
    p.add_argument("question", help='e.g. "what colour is the circle?"')
    p.add_argument("--model", required=True, help="a saved VisionLanguageLM or BLIP-2 folder (with its tokenizer)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.set_defaults(handler=run)


def run(args):
    import torch

    from ..models.vqa import ask, vision_kind
    from ..errors import AllformersError, InputError
    from .common import load_model

    # what can be checked without loading the model first
    if not Path(args.image).is_file():
        raise AllformersError(f"picture {args.image} does not exist; pass the path of a picture file")
    if not args.question.strip():
        raise InputError('the question is empty; ask something, e.g. allformers ask pic.png "what colour is the circle?"')
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    vision_kind(model)  # a model without vision: refused before the picture is read
    folder = args.model if Path(args.model).is_dir() else None
    print(ask(model, [args.image], [args.question], folder=folder, max_new_tokens=args.max_new_tokens)[0])
    return 0
