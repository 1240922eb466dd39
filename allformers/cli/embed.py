"""`allformers embed "sentence" ...`: sentence embeddings and their cosine similarities."""
import json


def register(sub):
    p = sub.add_parser("embed", help="sentence embeddings (default model: the bundled all-MiniLM-L6-v2)")
    p.add_argument("sentences", nargs="+")
    p.add_argument("--model", default="minilm", help="sentence encoder folder, or 'minilm'")
    p.add_argument("--json", action="store_true", help="print the embeddings as JSON lines")
    p.set_defaults(handler=run)


def run(args):
    from ..inference import embed
    from .common import load_any

    model = load_any(args.model)
    e = embed(model, args.sentences)
    if args.json:
        for s, v in zip(args.sentences, e.tolist()):
            print(json.dumps({"text": s, "embedding": v}))
        return 0
    sims = e @ e.T
    if len(args.sentences) == 2:
        print(f"cosine similarity: {sims[0, 1].item():.4f}")
        return 0
    for i, s in enumerate(args.sentences):
        print(f"[{i}] {s}")
    print("cosine similarities:")
    for i in range(len(args.sentences)):
        print("  " + " ".join(f"{sims[i, j].item():6.3f}" for j in range(len(args.sentences))))
    return 0
