"""`allformers generate MODEL "prompt" ...`: text in, text out, streamed."""
from .common import add_quantized_arg, add_sampling_args, load_model, sampling_kwargs, write


def register(sub):
    p = sub.add_parser("generate", help="continue one or more prompts")
    p.add_argument("model", help="allformers folder, Hugging Face folder, .gguf file, or 'smollm2'")
    p.add_argument("prompts", nargs="+")
    add_sampling_args(p)
    add_quantized_arg(p)
    p.add_argument("--num-beams", type=int, default=1, help="beam search, encoder-decoders only (T5, BART); "
                   "refused for a decoder-only model")
    p.add_argument("--control-code", help="CTRL: a control code whose token(s) go before every prompt "
                   "(e.g. Wikipedia, or a code the model was trained with)")
    p.add_argument("--speculative", metavar="ngram|PATH", help="speculative decoding, one prompt at a time: "
                   "'ngram' drafts by prompt lookup (no model), PATH is a smaller draft model of the same vocabulary")
    p.add_argument("--draft-tokens", type=int, default=4, help="tokens drafted per target pass (--speculative)")
    p.set_defaults(handler=run)


def run(args):
    from ..generation import generate_text

    model = load_model(args.model, quantized=args.quantized)
    kw = sampling_kwargs(args)
    if args.num_beams != 1:  # generate_text refuses it for a decoder-only model (it would be ignored)
        kw["num_beams"] = args.num_beams
    if args.control_code is not None:
        kw["control_code"] = args.control_code
    if args.speculative is not None:
        from ..errors import InputError
        from .common import load_any

        if model.config.is_encoder_decoder:
            raise InputError("--speculative drafts for decoder-only models; drop it for an encoder-decoder")
        kw["draft"] = "ngram" if args.speculative in ("ngram", "prompt-lookup") else load_any(args.speculative)
        kw["draft_tokens"] = args.draft_tokens
    if model.config.is_encoder_decoder:  # text in, text out: the output does not continue the input
        for text in generate_text(model, model.tokenizer, args.prompts, **kw):
            write(text + "\n")
        return 0
    if len(args.prompts) == 1 or "draft" in kw:  # stream each prompt token by token (speculation: batch 1)
        for prompt in args.prompts:
            write(prompt)
            generate_text(model, model.tokenizer, prompt, stream=write, **kw)
            write("\n" if len(args.prompts) == 1 else "\n---\n")
        return 0
    for prompt, text in zip(args.prompts, generate_text(model, model.tokenizer, args.prompts, **kw)):  # one batch
        write(f"{prompt}{text}\n---\n")
    return 0
