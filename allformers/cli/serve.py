"""`allformers serve MODEL [MODEL ...]`: an OpenAI-compatible server with continuous batching
and a browser playground at /. Decoders serve chat and completions, encoders embeddings."""
import sys
from pathlib import Path

from .common import add_quantized_arg


def register(sub):
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat, completions, embeddings) + playground")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="'smollm2', 'minilm', an allformers or Hugging Face folder, a .gguf file, or a zoo name "
                        "(random weights: for trying the server out)")
    p.add_argument("--name", action="append", help="API name of each MODEL, in order (default: from the source)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* and /metrics")
    p.add_argument("--slots", type=int, default=16, help="sequences decoded together (KV-cache slots)")
    p.add_argument("--max-len", type=int, default=2048, help="tokens per slot: prompt + completion (capped at the "
                                                             "model's block_size)")
    p.add_argument("--max-queue", type=int, default=64, help="sequences that may wait for a slot; beyond: 429")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens a sequence feeds per step")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights' dtype (the batch-invariance guarantee is for float32 on CPU)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for a zoo name, e.g. --override n_layer=2 (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="seed for requests without one (and zoo-name weights)")
    add_quantized_arg(p)
    p.add_argument("--dialogue", choices=["tools", "lamda", "sparrow"], default=None,
                   help="answer chat completions through a dialogue system: tools (calculator, and search with "
                        "--corpus-addresses), lamda (SSI-ranked candidates) or sparrow (evidence + reward model)")
    p.add_argument("--corpus-addresses", type=int, default=None, metavar="N",
                   help="index N State of the Union addresses (MiniLM, cached) for the search tool and sparrow "
                        "(sparrow's default: 8)")
    p.add_argument("--reward", default=None, metavar="DIR",
                   help="sparrow's reward model: a RewardHead folder or an `allformers reward` folder")
    p.add_argument("--log-level", default="info")
    p.set_defaults(handler=run)


def _overrides(items) -> dict:
    import json

    from ..errors import AllformersError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise AllformersError(f"--override {item!r}: write KEY=VALUE, e.g. --override n_layer=2")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value  # a plain string, e.g. norm_class=RMSNorm
    return out


def load_served(source: str, name=None, *, args, overrides: dict):
    """One MODEL argument -> a Served model (with its engine for decoders)."""
    import torch

    from .. import Config
    from ..config import REGISTRY
    from ..errors import AllformersError
    from ..models import build_model
    from ..serve.app import Served
    from ..serve.engine import Engine
    from ..checkpoints.io import load_reporting
    from ..tokenization import Tokenizer
    from ..zoo.assets import BUNDLED

    bundled = source.lower() in BUNDLED  # 'minilm', 'all-minilm-l6-v2': the real weights, not the zoo config
    if source in REGISTRY and not bundled and not Path(source).exists():  # a zoo name: random weights, bytes as tokens
        torch.manual_seed(args.seed or 0)
        tokenizer = Tokenizer.byte_level()
        overrides = {"vocab_size": tokenizer.vocab_size, **overrides}
        model = build_model(Config.from_name(source, **overrides)).eval()
        print(f"[allformers] {source}: random weights ({model.num_params() / 1e6:.1f}M parameters), "
              f"byte-level tokenizer", file=sys.stderr)
    else:
        if overrides:
            raise AllformersError("--override changes a zoo name's config; a saved model keeps its own")
        model = load_reporting(source, need_tokenizer=True, quantized=getattr(args, "quantized", False))
        tokenizer = model.tokenizer
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if getattr(model, "quantization", None):  # its int8/int4 kernels keep their own dtypes, on the CPU
        if args.dtype != "float32" or device != "cpu":
            raise AllformersError(f"{source} runs on {model.quantization} kernels, which are CPU ones with their own "
                                  f"dtypes: drop --dtype and use --device cpu")
    else:
        model = model.to(device=device, dtype=getattr(torch, args.dtype))
    if name is None:
        name = source.lower() if bundled or source in REGISTRY else Path(source).stem or source
    if getattr(model.config, "task", "lm") == "embedding":
        return Served(name, model, tokenizer)
    engine = Engine(model, tokenizer, slots=args.slots, max_len=args.max_len, max_queue=args.max_queue,
                    prefill_chunk=args.prefill_chunk, seed=args.seed)
    return Served(name, model, tokenizer, engine=engine, dialogue=_dialogue(model, tokenizer, args))


def _dialogue(model, tokenizer, args):
    """The --dialogue mode's messages -> reply function, or None."""
    mode = getattr(args, "dialogue", None)
    if mode is None:
        return None
    from ..dialogue.modes import dialogue_mode, load_scorer
    from ..dialogue.retrieval import sotu_index
    from ..errors import AllformersError

    scorer = None
    if mode == "sparrow":
        if args.reward is None:
            raise AllformersError("--dialogue sparrow needs --reward DIR (a RewardHead folder, e.g. saved by "
                                  "benchmarks/bench_dialogue.py --save-reward DIR, or an `allformers reward` folder)")
        scorer = load_scorer(args.reward, model, tokenizer)
    n = args.corpus_addresses or (8 if mode == "sparrow" else None)
    if n:
        from .. import load
        from ..zoo.assets import minilm_path

        index = sotu_index(n, load(minilm_path()).eval(), progress=True)
    else:
        index = None
    print(f"[allformers] chat completions answer through the {mode} dialogue mode", file=sys.stderr)
    return dialogue_mode(mode, model, tokenizer, index=index, scorer=scorer, seed=args.seed or 0)


def run(args):
    import torch
    import uvicorn

    from ..errors import AllformersError
    from ..serve.app import create_app

    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.name or []
    if len(names) > len(args.models):
        raise AllformersError(f"{len(names)} --name values for {len(args.models)} models")
    overrides = _overrides(args.override)
    served = [load_served(src, names[i] if i < len(names) else None, args=args, overrides=overrides)
              for i, src in enumerate(args.models)]
    if len({s.name for s in served}) < len(served):
        raise AllformersError(f"two models share an API name ({', '.join(s.name for s in served)}); give --name for each")
    app = create_app(served, api_key=args.api_key)
    where = f"http://{args.host}:{args.port}"
    print(f"[allformers] serving {', '.join(s.name for s in served)} on {where} (playground: {where}/, "
          f"API: {where}/v1)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
