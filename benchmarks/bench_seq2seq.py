"""Seq2seq decoding speed: allformers vs transformers on the same T5 weights (t5-small shape,
random init: no hub here), greedy and beam search with 4 beams: fp32 on the CPU, or bf16 on a GPU
when one is present (--device / --dtype, benchmarks/devices.py).

Both libraries encode once, cache decoder self-attention and reuse cross-attention keys/values.
EOS is disabled so both produce exactly max_new_tokens tokens; outputs are checked equal.
Runs alternate between the libraries and medians are reported. The last line is one JSON object."""
import argparse
import json
import os
import statistics
import tempfile
import warnings

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/devices.py, however this is run
from devices import add_device_args, describe, pick, timed  # noqa: E402

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--src", type=int, default=64)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    add_device_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = pick(args)

    import transformers as T

    from allformers import load

    torch.manual_seed(0)
    hf = T.T5ForConditionalGeneration(T.T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6,
                                                 num_heads=8, decoder_start_token_id=0)).eval()
    hf.generation_config.eos_token_id = None
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load(d)
    hf, ours = hf.to(device=device, dtype=dtype), ours.to(device=device, dtype=dtype)
    x = torch.randint(2, 32128, (args.batch, args.src), generator=torch.Generator().manual_seed(1)).to(device)
    mask = torch.ones_like(x)
    mask[1:, args.src // 2:] = 0  # padded sources, as real batches are

    def run_hf(beams):
        return hf.generate(x, attention_mask=mask, max_new_tokens=args.new, min_new_tokens=args.new,
                           num_beams=beams, do_sample=False, pad_token_id=0)

    def run_ours(beams):
        return ours.generate(x, mask, max_new_tokens=args.new, num_beams=beams)

    times = {k: [] for k in ("greedy", "greedy_hf", "beam", "beam_hf")}
    with torch.inference_mode():
        identical = all(torch.equal(run_hf(beams), run_ours(beams)) for beams in (1, 4))
        # in bf16/fp16 rounding may part the two: reported, not asserted
        assert identical or dtype != torch.float32, "outputs differ"
        for _ in range(args.reps):
            for beams, key in ((1, "greedy"), (4, "beam")):
                times[key].append(timed(lambda: run_ours(beams), device))
                times[key + "_hf"].append(timed(lambda: run_hf(beams), device))

    ntok = args.batch * args.new
    r = {k + "_tok_s": ntok / statistics.median(v) for k, v in times.items()}
    r["greedy_ratio"] = r["greedy_tok_s"] / r["greedy_hf_tok_s"]
    r["beam_ratio"] = r["beam_tok_s"] / r["beam_hf_tok_s"]
    r.update(model="t5-small shape (60M)", **describe(device, dtype), identical=identical, batch=args.batch, src_len=args.src, new_tokens=args.new, threads=args.threads,
             reps=args.reps, torch=torch.__version__, transformers=T.__version__)
    print(f"{'':8}{'allformers':>14}{'transformers':>14}{'ratio':>8}")
    for k in ("greedy", "beam"):
        print(f"{k:8}{r[k + '_tok_s']:>10.1f} t/s{r[k + '_hf_tok_s']:>10.1f} t/s{r[k + '_ratio']:>7.2f}x")
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}))


if __name__ == "__main__":
    main()
