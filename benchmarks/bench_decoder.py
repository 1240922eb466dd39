"""allformers vs transformers on the same GPT-2 124M weights, in one run: fp32 on the CPU, or bf16 on a
GPU when one is present (--device / --dtype, benchmarks/devices.py).

  forward: batch 8 x 256 tokens, logits for every position
  decode:  batch 1, 32-token prompt, 128 greedy new tokens (KV cache on both sides)

Also the share of the machine's limits each reaches, both measured here: decode's weight bytes
per token x tokens/s over the read bandwidth of a 1 GB sum, and forward's FLOPs (a third of the
Trainer's training count: 2 per matmul weight per token plus attention) over the best 2048^3 fp32
matmul rate (training/mfu.py, the Trainer's MFU: the faster of MKL and oneDNN). This machine's
bandwidth moves by 2x within minutes, so it is measured in every repeat, right after the decode
runs, and the fraction uses the median of those (`bandwidth_gb_s_max` is the best one).

Runs alternate between the two libraries and the median of each is reported, so drifting
machine load hits both alike. The last line is one JSON object."""
import argparse
import json
import os
import statistics
import sys
import tempfile
import warnings

from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/devices.py, however this is run
from devices import add_device_args, describe, pick, read_bandwidth, timed  # noqa: E402

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def decode_profile(decode, new_tokens: int, top: int = 8) -> dict:
    """{op: self CPU ms per decoded token} of the `top` costliest ops of one decode run, the rest summed:
    where a token's time goes (matmuls reading weights, or per-op overhead)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        decode()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    per_token = {e.key: e.self_cpu_time_total / 1e3 / new_tokens for e in ops}
    out = dict(list(per_token.items())[:top])
    out["other ops"] = sum(list(per_token.values())[top:])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--profile", action="store_true",
                    help="also profile our greedy decode (torch.profiler): ms per token of its costliest ops")
    add_device_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = pick(args)

    import transformers as T

    from allformers import load
    from allformers.generation import generate
    from allformers.training.mfu import flops_per_token, measured_peak_flops

    torch.manual_seed(0)
    hf = T.GPT2LMHeadModel(T.GPT2Config()).eval()  # GPT-2 124M shape, random weights (no hub here)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load(d)
    hf, ours = hf.to(device=device, dtype=dtype), ours.to(device=device, dtype=dtype)
    x = torch.randint(0, 50257, (args.batch, args.seq), generator=torch.Generator().manual_seed(1)).to(device)
    prompt = x[:1, : args.prompt]

    with torch.inference_mode():
        exact = dtype == torch.float32
        diff = (hf(x[:1, :64]).logits.float() - ours(x[:1, :64]).float()).abs().max().item()
        assert diff < (1e-3 if exact else 0.5), f"same weights, same maths: logits differ by {diff}"
        ref = hf.generate(prompt, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0)
        out = generate(ours, prompt, max_new_tokens=args.new)
        identical = bool(torch.equal(ref, out))
        assert identical or not exact, "greedy outputs differ"  # in bf16/fp16 rounding may part them: reported

        fwd = {"ours": [], "hf": []}
        dec = {"ours": [], "hf": []}
        runs = {
            "fwd_ours": lambda: ours(x), "fwd_hf": lambda: hf(x).logits,
            "dec_ours": lambda: generate(ours, prompt, max_new_tokens=args.new),
            "dec_hf": lambda: hf.generate(prompt, max_new_tokens=args.new, min_new_tokens=args.new,
                                          do_sample=False, pad_token_id=0),
        }
        for fn in runs.values():  # warm-up
            fn()
        bandwidths = []
        for _ in range(args.reps):
            fwd["ours"].append(timed(runs["fwd_ours"], device))
            fwd["hf"].append(timed(runs["fwd_hf"], device))
            dec["ours"].append(timed(runs["dec_ours"], device))
            dec["hf"].append(timed(runs["dec_hf"], device))
            bandwidths.append(read_bandwidth(device, reps=3))

        profile = decode_profile(runs["dec_ours"], args.new) if args.profile else None

    ntok_f, ntok_d = args.batch * args.seq, args.new
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())  # tied head counted once
    bandwidth, peak = statistics.median(bandwidths), measured_peak_flops(device, dtype)
    fwd_flops = flops_per_token(ours, args.seq) / 3  # the Trainer's count (PaLM's), forward only: a third
    r = {
        "forward_tok_s": ntok_f / statistics.median(fwd["ours"]),
        "forward_tok_s_hf": ntok_f / statistics.median(fwd["hf"]),
        "decode_tok_s": ntok_d / statistics.median(dec["ours"]),
        "decode_tok_s_hf": ntok_d / statistics.median(dec["hf"]),
    }
    r["forward_ratio"] = r["forward_tok_s"] / r["forward_tok_s_hf"]
    r["decode_ratio"] = r["decode_tok_s"] / r["decode_tok_s_hf"]
    # each decoded token reads every weight once: the share of the measured bandwidth that reaches
    r["decode_bandwidth_fraction"] = r["decode_tok_s"] * weight_bytes / bandwidth
    r["decode_bandwidth_fraction_hf"] = r["decode_tok_s_hf"] * weight_bytes / bandwidth
    r["forward_mfu"] = r["forward_tok_s"] * fwd_flops / peak
    r["forward_mfu_hf"] = r["forward_tok_s_hf"] * fwd_flops / peak
    if profile is not None:
        r["decode_profile_ms_per_token"] = profile
    r.update(bandwidth_gb_s=bandwidth / 1e9, bandwidth_gb_s_max=max(bandwidths) / 1e9, peak_gflops=peak / 1e9, weight_mb=weight_bytes / 2 ** 20,
             batch=args.batch, seq=args.seq, prompt=args.prompt, new_tokens=args.new)
    r.update(model="gpt2-124M", **describe(device, dtype), greedy_identical=identical, threads=args.threads, reps=args.reps,
             torch=torch.__version__, transformers=T.__version__)
    print(f"{'':10}{'allformers':>14}{'transformers':>14}{'ratio':>8}")
    print(f"{'forward':10}{r['forward_tok_s']:>11.0f} t/s{r['forward_tok_s_hf']:>11.0f} t/s{r['forward_ratio']:>7.2f}x")
    print(f"{'decode':10}{r['decode_tok_s']:>11.1f} t/s{r['decode_tok_s_hf']:>11.1f} t/s{r['decode_ratio']:>7.2f}x")
    print(f"decode reads {r['decode_bandwidth_fraction']:.0%} of the measured {r['bandwidth_gb_s']:.1f} GB/s "
          f"(transformers {r['decode_bandwidth_fraction_hf']:.0%}); forward MFU {r['forward_mfu']:.0%} of "
          f"{r['peak_gflops']:.0f} GFLOP/s (transformers {r['forward_mfu_hf']:.0%})")
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}))


if __name__ == "__main__":
    main()
