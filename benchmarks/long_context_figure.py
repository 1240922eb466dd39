"""The picture in docs/long_context.md, drawn from bench_long_context.py's JSON (its last line): prefill time
of the local and the dense stack against the length, on log-log axes beside the linear slope, and the
validation losses of the compared pairs (MoE vs dense, Transformer-XL with and without memory).

    python benchmarks/bench_long_context.py --threads 2 | tail -1 > runs/long_context.json
    python benchmarks/long_context_figure.py runs/long_context.json --out docs/img/long_context.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def draw(result: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "local_attention_prefill_ms" not in result:
        raise SystemExit("the JSON has no local section: run bench_long_context.py with --sections local (or all)")
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 2]})
    for key, label, style in (("local_attention_prefill_ms", "local (window 256)", "o-"),
                              ("dense_attention_prefill_ms", "dense causal", "s-")):
        n = sorted(int(k) for k in result[key])
        left.plot(n, [result[key][str(k)] for k in n], style, label=label)
    n = sorted(int(k) for k in result["local_attention_prefill_ms"])
    first = result["local_attention_prefill_ms"][str(n[0])]
    left.plot(n, [first * k / n[0] for k in n], ":", color="grey", label="linear in length")
    left.set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="prefill ms (median)",
             title="prefill, 4 layers x 256")
    left.minorticks_off()
    left.set_xticks(n, [f"{k // 1024}k" for k in n])
    left.legend()

    pairs = [(name, result[a], result[b], la, lb) for name, a, b, la, lb in (
        ("MoE", "moe_loss", "dense_loss", "top-2 of 8", "dense"),
        ("Transformer-XL", "xl_memory_loss", "xl_no_memory_loss", "memory", "no memory")) if a in result]
    for i, (name, a, b, la, lb) in enumerate(pairs):
        bars = right.bar([2 * i, 2 * i + 0.8], [a, b], width=0.7, color=["tab:blue", "tab:grey"])
        for bar, label, v in zip(bars, (la, lb), (a, b)):
            right.text(bar.get_x() + bar.get_width() / 2, v, f"{label}\n{v:.3f}", ha="center", va="bottom", fontsize=8)
    right.set_xticks([2 * i + 0.4 for i in range(len(pairs))], [p[0] for p in pairs])
    losses = [v for p in pairs for v in p[1:3]]
    if losses:
        right.set_ylim(min(losses) - 0.15, max(losses) + 0.12)
    right.set(ylabel="validation loss (nats per character)", title="same steps, same active parameters")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", help="a file whose last line is bench_long_context.py's JSON object")
    p.add_argument("--out", default="docs/img/long_context.png")
    args = p.parse_args(argv)
    lines = [x for x in Path(args.json).read_text().splitlines() if x.strip()]
    if not lines:
        raise SystemExit(f"{args.json} is empty: give it the benchmark's output")
    draw(json.loads(lines[-1]), Path(args.out))
    print(args.out)


if __name__ == "__main__":
    main()
