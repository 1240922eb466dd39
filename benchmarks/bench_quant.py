"""int8 weight quantization (allformers/models/int8.py) against transformers fp32 on the same weights.

Two models:
  smollm2-135m     SmolLM2-135M-Instruct from the bundled GGUF (Q4_1, dequantized to fp32 by our loader:
                   that fp32 model is the reference; no fp32 original of SmolLM2 exists here)
  gpt2-124m-shape  GPT-2 124M's shape with random weights (seed 0): no GPT-2 weights are available offline,
                   so its perplexities are those of an untrained model (near the vocabulary size) and only its
                   speed figures mean anything

For each: transformers fp32 is built from our own export of the same weights (model.save(format="hf")),
its logits checked against ours; then
  decode   batch 1, a 32-token prompt, greedy new tokens with the KV cache, runs interleaved between
           transformers fp32, ours fp32 and ours int8; median tokens/s of each; int8_decode_ratio =
           ours int8 / transformers fp32
  ppl      perplexity on held-out State of the Union text (the last addresses of ../shared/data/sotu/sotu.txt,
           which nothing here trains on), non-overlapping windows, one window per forward pass (the dynamic
           scheme quantizes its input with one scale per call, so batching windows would couple them);
           int8_ppl_increase = ppl(int8) / ppl(our fp32) - 1

"The GGUF quantized path" (SmolLM2 only): allformers.load(the .gguf, quantized=True), which runs the file's
Q4_1 Linears on PyTorch's int4 kernel (their own grid) and its Q8_0 head on the weight-only int8 one; it is
decoded in the same interleaved runs, and its perplexity increase is over the dequantized fp32 reference
(the file's own Q4_1 error over an fp32 original cannot be measured without that original). --tiny
stands in a tiny model re-quantized to int4.

--quick: fewer tokens, windows and repeats (a couple of minutes); --tiny: tiny random configs and a byte
tokenizer (seconds; for tests/test_quantize.py). Threads: torch's default (OMP_NUM_THREADS) unless
--threads. The last line is one JSON object."""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def progress(iterable, **kw):
    try:
        from tqdm.auto import tqdm

        return tqdm(iterable, file=sys.stderr, leave=False, **kw)
    except ImportError:
        return iterable


def held_out_text(addresses: int) -> tuple:
    """The last `addresses` State of the Union addresses, joined, and how they are named."""
    from allformers.dialogue.retrieval import sotu_addresses

    picked = sotu_addresses()[-addresses:]
    return "\n\n".join(a.text for a in picked), [f"{a.date} {a.president}" for a in picked]


def build(name: str, tiny: bool):
    """-> (our fp32 model, tokenizer, note on its weights)."""
    from allformers import Config, TransformerLM, load
    from allformers.tokenization import Tokenizer
    from allformers.zoo.assets import smollm2_gguf_path

    torch.manual_seed(0)
    if tiny:
        tok = Tokenizer.byte_level()
        small = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=tok.vocab_size, block_size=256)
        extra = dict(n_kv_head=2, intermediate_size=128) if name == "smollm2-135m" else {}
        return TransformerLM(Config.from_name(name, **small, **extra)).eval(), tok, "tiny random config (--tiny)"
    if name == "smollm2-135m":
        path = smollm2_gguf_path()
        model = load(path)
        return model, model.tokenizer, f"{Path(path).name}: Q4_1 weights dequantized to fp32 (the reference)"
    model = TransformerLM(Config.from_name("gpt2")).eval()
    return model, Tokenizer.gpt2(), "random init, seed 0 (no GPT-2 weights offline): ppl of an untrained model"


def hf_twin(model, folder):
    """transformers fp32 on the same weights: our export, read back by transformers."""
    import transformers as T

    model.save(folder, format="hf")
    return T.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()


def rounded(v):
    if isinstance(v, float):
        return float(f"{v:.4g}") if abs(v) < 1e-3 else round(v, 4)
    if isinstance(v, dict):
        return {k: rounded(x) for k, x in v.items()}
    return [rounded(x) for x in v] if isinstance(v, (list, tuple)) else v


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def nll_per_token(fn, windows) -> float:
    total, n = 0.0, 0
    for w in progress(windows, desc="ppl windows"):
        logits = fn(w[None, :-1])
        total += torch.nn.functional.cross_entropy(logits[0].float(), w[1:], reduction="sum").item()
        n += w.numel() - 1
    return total / n


def gguf_quantized(ours, tiny: bool):
    """The GGUF quantized path: the bundled file loaded with quantized=True (--tiny: the tiny model re-quantized
    to int4, the file's path having no tiny stand-in)."""
    from allformers import load
    from allformers.models.int4 import quantize_int4
    from allformers.zoo.assets import smollm2_gguf_path

    if tiny:
        return quantize_int4(copy.deepcopy(ours))
    return load(smollm2_gguf_path(), quantized=True)


def gguf_figures(gguf, tok_s, ppl, ppl32, outs, new) -> dict:
    from allformers.models.int4 import weight_bytes

    agree = (outs["ours_gguf"][0, new] == outs["ours_fp32"][0, new]).float()
    return {"gguf_layout": {k: len(v) for k, v in gguf.int4_layout.items()},
            "gguf_weight_mib": {k: round(v / 2**20, 1) for k, v in weight_bytes(gguf).items()},
            "gguf_decode_ratio": tok_s["ours_gguf"] / tok_s["hf_fp32"],
            "gguf_vs_ours_fp32_decode_ratio": tok_s["ours_gguf"] / tok_s["ours_fp32"],
            "gguf_greedy_same_tokens": float(agree.mean()),
            "ppl_gguf": ppl, "gguf_ppl_increase": ppl / ppl32 - 1}


def run_model(name: str, args, text: str) -> dict:
    import transformers as T

    from allformers.generation import generate
    from allformers.models.int8 import int8_modules, linear_weight_bytes, quantize_int8
    from allformers.models.smoothquant import DEFAULT_TOKENS, calibration_text

    ours, tok, note = build(name, args.tiny)
    gguf = gguf_quantized(ours, args.tiny) if name == "smollm2-135m" else None
    int8 = copy.deepcopy(ours)
    if not args.smooth:
        quantize_int8(int8, exclude=tuple(args.exclude), scheme=args.scheme)
    else:  # SmoothQuant calibrated on the first State of the Union addresses (never the held-out last ones)
        quantize_int8(int8, smooth=True, alpha=args.alpha, exclude=tuple(args.exclude), scheme=args.scheme,
                      calibration=torch.randint(0, tok.vocab_size, (512,)) if args.tiny else
                      torch.tensor(tok.encode(calibration_text())[:DEFAULT_TOKENS]))
    ids = torch.tensor(tok.encode(text), dtype=torch.long)
    need = args.windows * args.window + 1
    if ids.numel() < need + args.prompt:
        raise SystemExit(f"held-out text has {ids.numel()} tokens, {need + args.prompt} needed: use more --addresses")
    windows = [ids[i * args.window: i * args.window + args.window + 1] for i in range(args.windows)]
    prompt = ids[-args.prompt:][None]  # the very end of the text: not inside any ppl window
    with tempfile.TemporaryDirectory() as d, torch.inference_mode():
        hf = hf_twin(ours, d)
        probe = ids[None, :64]
        parity = (hf(probe).logits - ours(probe)).abs().max().item()
        assert parity < 1e-3, f"transformers and allformers disagree on the same weights ({parity:.2e})"

        def hf_decode():
            return hf.generate(prompt, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                               pad_token_id=0, attention_mask=torch.ones_like(prompt))

        runs = {"hf_fp32": hf_decode,
                "ours_fp32": lambda: generate(ours, prompt, max_new_tokens=args.new),
                "ours_int8": lambda: generate(int8, prompt, max_new_tokens=args.new)}
        if gguf is not None:
            runs["ours_gguf"] = lambda: generate(gguf, prompt, max_new_tokens=args.new)
        outs = {k: fn() for k, fn in runs.items()}  # warm-up, and the tokens compared below
        times = {k: [] for k in runs}
        for _ in progress(range(args.reps), desc=f"{name} decode (interleaved)"):
            for k, fn in runs.items():
                times[k].append(timed(fn))
        tok_s = {k: args.new / statistics.median(v) for k, v in times.items()}
        new = slice(prompt.shape[1], None)
        same_fp32 = bool(torch.equal(outs["hf_fp32"], outs["ours_fp32"]))
        agree = (outs["ours_int8"][0, new] == outs["ours_fp32"][0, new]).float()
        first_diff = int((agree == 0).nonzero()[0]) if bool((agree == 0).any()) else None

        nll32 = nll_per_token(lambda x: ours(x), windows)
        nll8 = nll_per_token(lambda x: int8(x), windows)
        nll_gguf = None if gguf is None else nll_per_token(lambda x: gguf(x), windows)
    ppl32, ppl8 = float(torch.tensor(nll32).exp()), float(torch.tensor(nll8).exp())
    extra = {} if gguf is None else gguf_figures(gguf, tok_s, float(torch.tensor(nll_gguf).exp()), ppl32, outs, new)
    bytes_ = {"fp32": linear_weight_bytes(ours)["fp32"], "int8": linear_weight_bytes(int8)["int8"]}
    return {
        "weights": note,
        "params_m": round(ours.num_params() / 1e6, 1),
        "scheme": args.scheme,
        "int8_linears": len(int8_modules(int8)),
        "smoothing": None if not args.smooth else {"alpha": args.alpha, "calibration": "sotu-first" if not args.tiny
                                                  else "random ids (--tiny)"},
        "fp32_linears_kept": list(args.exclude),
        "linear_weight_mib": {k: round(v / 2**20, 1) for k, v in bytes_.items()},
        "logits_parity_vs_transformers": parity,
        "decode_tok_s": tok_s,
        "int8_decode_ratio": tok_s["ours_int8"] / tok_s["hf_fp32"],
        "int8_vs_ours_fp32_decode_ratio": tok_s["ours_int8"] / tok_s["ours_fp32"],
        "fp32_decode_ratio": tok_s["ours_fp32"] / tok_s["hf_fp32"],
        "fp32_greedy_identical_to_transformers": same_fp32,
        "int8_greedy_same_tokens": float(agree.mean()),
        "int8_greedy_first_difference": first_diff,
        "ppl_fp32": ppl32,
        "ppl_int8": ppl8,
        "int8_ppl_increase": ppl8 / ppl32 - 1,
        "ppl_tokens": args.windows * args.window,
        **extra,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer tokens, windows and repeats (a couple of minutes)")
    ap.add_argument("--tiny", action="store_true", help="tiny random models and a byte tokenizer (seconds; tests)")
    ap.add_argument("--models", default="smollm2-135m,gpt2-124m-shape")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--new", type=int, help="greedy tokens per decode run")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--windows", type=int, help="perplexity windows")
    ap.add_argument("--window", type=int, help="tokens per perplexity window")
    ap.add_argument("--addresses", type=int, default=3, help="held-out text: the last N State of the Union addresses")
    ap.add_argument("--scheme", choices=("weight-only", "dynamic"), default="weight-only",
                    help="weight-only (int8 weights, bf16 activations) or dynamic (int8 activations too, SmoothQuant)")
    ap.add_argument("--alpha", type=float, default=0.65, help="SmoothQuant migration strength (dynamic scheme)")
    ap.add_argument("--no-smooth", action="store_true", help="the dynamic scheme without SmoothQuant")
    ap.add_argument("--exclude", default=None,
                    help="comma-separated Linear suffixes kept fp32 ('' none; default: none for weight-only, "
                         "'mlp.proj' for the smoothed dynamic scheme)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    small = args.quick or args.tiny
    args.smooth = args.scheme == "dynamic" and not args.no_smooth
    if args.exclude is None:
        args.exclude = "mlp.proj" if args.smooth else ""
    args.exclude = [e.strip() for e in args.exclude.split(",") if e.strip()]
    for k, full, quick in (("reps", 3, 2), ("new", 128, 32), ("windows", 16, 4), ("window", 512, 256)):
        if getattr(args, k) is None:
            setattr(args, k, quick if small else full)
    if args.tiny:
        args.window = min(args.window, 128)
    torch.set_num_threads(args.threads)
    import transformers as T

    text, held_out = held_out_text(args.addresses)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    zoo = {"smollm2-135m": "smollm2-135m", "gpt2-124m-shape": "gpt2"}
    bad = [n for n in names if n not in zoo]
    if bad:
        raise SystemExit(f"--models: unknown {bad}; choose from {sorted(zoo)}")
    t0 = time.perf_counter()
    results = {}
    for n in names:
        print(f"[bench_quant] {n} ...", file=sys.stderr)
        r = run_model(zoo[n], args, text)
        results[n] = r
        print(f"{n:18} decode t/s: transformers fp32 {r['decode_tok_s']['hf_fp32']:.1f}, ours fp32 "
              f"{r['decode_tok_s']['ours_fp32']:.1f}, ours int8 {r['decode_tok_s']['ours_int8']:.1f} -> int8 "
              f"{r['int8_decode_ratio']:.2f}x transformers; ppl fp32 {r['ppl_fp32']:.3f}, int8 {r['ppl_int8']:.3f} "
              f"({100 * r['int8_ppl_increase']:+.2f}%)")
        if "gguf_decode_ratio" in r:
            print(f"{'':18} GGUF quantized path: {r['decode_tok_s']['ours_gguf']:.1f} t/s -> "
                  f"{r['gguf_decode_ratio']:.2f}x transformers; ppl {r['ppl_gguf']:.3f} "
                  f"({100 * r['gguf_ppl_increase']:+.2f}%)")
    real = results.get("smollm2-135m")
    out = {
        # the acceptance figures: decode over every model measured (the slowest ratio); ppl on the real weights only
        "int8_decode_ratio": min(r["int8_decode_ratio"] for r in results.values()),
        "int8_ppl_increase": real["int8_ppl_increase"] if real else None,
        "gguf": None if real is None else {
            "what": "a tiny random model re-quantized to int4 (--tiny)" if args.tiny else
                    "allformers.load(SmolLM2's .gguf, quantized=True): the file's Q4_1 Linears on torch's int4 kernel "
                    "(group 32, their own grid), its Q8_0 tied head on the weight-only int8 kernel",
            "decode_ratio": real["gguf_decode_ratio"],
            "ppl": real["ppl_gguf"],
            "ppl_increase": real["gguf_ppl_increase"],
            "layout": real["gguf_layout"],
            "note": "the increase is over the dequantized fp32 model (the reference): no fp32 original of SmolLM2 is "
                    "available, so the file's own Q4_1 error cannot be measured",
        },
        "models": results,
        "held_out": {"text": "State of the Union: " + "; ".join(held_out), "windows": args.windows,
                     "window": args.window},
        "notes": ("tiny random configs and a byte tokenizer: the figures check the script, not int8" if args.tiny
                  else "gpt2-124m-shape has random weights (no GPT-2 weights offline): its decode ratio is real, its "
                       "perplexities are an untrained model's; int8_ppl_increase is SmolLM2's"
                  if "gpt2-124m-shape" in results else ""),
        "mode": "tiny" if args.tiny else "quick" if args.quick else "full",
        "decode": {"prompt": args.prompt, "new_tokens": args.new, "reps": args.reps, "batch": 1},
        "threads": args.threads, "torch": torch.__version__, "transformers": T.__version__,
        "scheme": args.scheme,
        "quantized_engine": torch.backends.quantized.engine,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(rounded(out)))


if __name__ == "__main__":
    main()
