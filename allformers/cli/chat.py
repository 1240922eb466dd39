"""`allformers chat [MODEL]`: talk to a chat model with its own template, streaming replies.
With --message it answers once and exits (scripts, tests); otherwise it is a REPL."""
import sys

from .common import add_quantized_arg, add_sampling_args, load_model, sampling_kwargs, write


def register(sub):
    p = sub.add_parser("chat", help="chat with an instruction-tuned model")
    p.add_argument("model", nargs="?", default="smollm2", help="default: the bundled SmolLM2-135M-Instruct")
    p.add_argument("-m", "--message", action="append", help="a user message; answer and exit (repeatable)")
    p.add_argument("--system", default=None, help="system prompt")
    add_sampling_args(p)
    add_quantized_arg(p)
    p.set_defaults(handler=run, max_new_tokens=256)


def reply(model, messages, kw):
    from ..generation import chat

    text = chat(model, model.tokenizer, messages, stream=write, **kw)
    write("\n")
    messages.append({"role": "assistant", "content": text})
    return text


def run(args):
    model = load_model(args.model, quantized=args.quantized)
    kw = sampling_kwargs(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    if args.message:
        for m in args.message:
            messages.append({"role": "user", "content": m})
            write(f"> {m}\n")
            reply(model, messages, kw)
        return 0
    print("chat with the model; an empty line or Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        reply(model, messages, kw)
    return 0
