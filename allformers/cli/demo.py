"""`allformers demo`: the tour. (1) Chat with the real SmolLM2-135M-Instruct, loaded from its
GGUF file, streaming tokens; (2) train a small GPT on Tiny Shakespeare from scratch, with a
progress bar, samples and a loss plot."""
import time

from .common import add_old_flag, load_model, write
from .train import OLD_FLAGS

QUESTIONS = ["What is the capital of France?", "Give me three tips for learning to code."]


def register(sub):
    p = sub.add_parser("demo", help="chat with SmolLM2, then train a small GPT on Tiny Shakespeare")
    p.add_argument("--skip-chat", action="store_true")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--recipe", default="shakespeare-char-cpu")
    p.add_argument("--max-steps", type=int, default=None, help="shorten training (default: the recipe's)")
    p.add_argument("--data", default=None, help="default: ../shared/data when present, else download")
    p.add_argument("--out", default="runs/demo")
    for old, new, dest, typ in OLD_FLAGS[:3]:
        add_old_flag(p, old, new, dest, typ)
    p.set_defaults(handler=run)


def run(args):
    if not args.skip_chat:
        from ..generation import chat

        print("=== 1. Chat with SmolLM2-135M-Instruct (LLaMA architecture, loaded from GGUF by allformers)")
        model = load_model("smollm2")
        for q in QUESTIONS:
            write(f"\n> {q}\n")
            t0 = time.time()
            chat(model, model.tokenizer, [{"role": "user", "content": q}], max_new_tokens=120, stream=write)
            write(f"\n[{time.time() - t0:.1f} s]\n")
    if not args.skip_train:
        from ..recipes import run_recipe

        print(f"\n=== 2. Train a GPT from scratch: recipe {args.recipe!r}")
        result = run_recipe(args.recipe, data=args.data, out=args.out, max_steps=args.max_steps)
        for i, text in enumerate(result.get("samples", [])):
            print(f"\n--- sample {i + 1} ---\n{text}")
        print(f"\nval loss {result['val_loss']:.4f} after {result['wall_time_s']:.0f} s; "
              f"checkpoint and loss plot in {result['out']} (plot: {result['plot']})")
    return 0
