"""One GPT training step, allformers vs transformers: the same weights, batch, loss and optimizer.

GPT-2 124M's shape with random weights (no hub here), dropout off in both so the two compute the
same numbers (checked: the first step's losses agree). A step is zero_grad, forward, next-token
cross-entropy over every position, backward, gradient clipping at 1.0 and our Trainer's AdamW
(training/trainer.py's build_optimizer: decay groups, torch's fused AdamW; lr 1e-4, weight decay
0.1), built the same way for both models; the loss is objectives/causal_lm.py's for ours and the
same cross-entropy on GPT2LMHeadModel's logits for transformers. The two alternate step by step after a warm-up, and each median of
`--steps` steps is reported, so drifting machine load hits both alike.

    python benchmarks/bench_train_step.py                 # batch 4 x 256, 6 steps each, ~3 min on 2 cores
    python benchmarks/bench_train_step.py --layers 2 --steps 3   # a quick look

The last line is one JSON object: train_tok_s and train_tok_s_hf (tokens per second of a step),
train_step_ratio (ours over transformers), and the MFU of ours against the matmul peak measured here."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/devices.py
from devices import add_device_args, describe, pick, timed  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per library")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    add_device_args(ap)
    args = ap.parse_args(argv)
    device, dtype = pick(args)
    if min(args.batch, args.seq, args.steps, args.layers) < 1:
        ap.error("--batch, --seq, --steps and --layers must be positive")
    torch.set_num_threads(args.threads)

    import transformers as tf

    from allformers import load
    from allformers.objectives.causal_lm import causal_lm_loss
    from allformers.training.mfu import flops_per_token, measured_peak_flops
    from allformers.training.trainer import TrainConfig, build_optimizer

    torch.manual_seed(0)
    hf_config = tf.GPT2Config(n_layer=args.layers, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = tf.GPT2LMHeadModel(hf_config)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load(d)
    hf, ours = hf.to(device=device, dtype=dtype), ours.to(device=device, dtype=dtype)
    hf.train()
    ours.train()
    assert ours.config.dropout == 0.0
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, hf_config.vocab_size, (args.batch, args.seq + 1), generator=gen).to(device)
               for _ in range(args.steps + 1)]

    cfg = TrainConfig(lr=1e-4, weight_decay=0.1, beta1=0.9, beta2=0.99, max_steps=args.steps + 1, warmup_steps=0)

    def adamw(model):  # our Trainer's optimizer (decay groups, fused AdamW on CPU), built the same for both
        return build_optimizer(model, cfg, device)

    opt_ours, opt_hf = adamw(ours), adamw(hf)

    def step_ours(b):
        opt_ours.zero_grad(set_to_none=True)
        loss = causal_lm_loss(ours, (b[:, :-1], b[:, 1:]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ours.parameters(), 1.0)
        opt_ours.step()
        return loss.item()

    def step_hf(b):
        opt_hf.zero_grad(set_to_none=True)
        x = b[:, :-1]
        logits = hf(x).logits  # the same loss as ours, on the same targets
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), b[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt_hf.step()
        return loss.item()

    first_ours, first_hf = step_ours(batches[0]), step_hf(batches[0])  # warm-up, and the same maths
    tol = 1e-3 if dtype == torch.float32 else 5e-2  # bf16/fp16 round differently in each library
    assert abs(first_ours - first_hf) < tol, f"first-step losses differ: {first_ours} vs {first_hf}"
    times = {"ours": [], "hf": []}
    for b in batches[1:]:
        for name, fn in (("ours", step_ours), ("hf", step_hf)):
            times[name].append(timed(lambda: fn(b), device))
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = args.batch * args.seq
    n_params = sum(p.numel() for p in ours.parameters())
    flops = tokens * flops_per_token(ours, args.seq)  # the Trainer's count: 6 N + attention (PaLM appendix B)
    peak = measured_peak_flops(device, dtype)
    r = {"model": f"gpt2-124M shape, {args.layers} layers, random weights", **describe(device, dtype),
         "batch": args.batch, "seq": args.seq,
         "steps": args.steps, "threads": args.threads, "params": n_params,
         "train_tok_s": tokens / med["ours"], "train_tok_s_hf": tokens / med["hf"],
         "train_step_ratio": med["hf"] / med["ours"],
         "step_s": med["ours"], "step_s_hf": med["hf"], "first_loss": first_ours, "first_loss_hf": first_hf,
         "mfu": flops / med["ours"] / peak, "mfu_hf": flops / med["hf"] / peak, "peak_gflops": peak / 1e9,
         "torch": torch.__version__, "transformers": tf.__version__}
    print(f"train step  ours {r['train_tok_s']:.0f} tok/s ({med['ours']:.2f} s)   transformers "
          f"{r['train_tok_s_hf']:.0f} tok/s ({med['hf']:.2f} s)   {r['train_step_ratio']:.2f}x   "
          f"MFU {r['mfu']:.1%} vs {r['mfu_hf']:.1%}", file=sys.stderr)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}))


if __name__ == "__main__":
    main()
