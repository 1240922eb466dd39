"""The picture in docs/vision_language.md: test pictures of the synthetic shapes (captions never seen in training),
each with its caption, one of its questions and what the saved models answered (greedy, through models/vqa.py as
`allformers ask` asks them), right answers in green, wrong in red; with --coca, the CoCa's caption too.

    python benchmarks/bench_vision_language.py --sections palme --set "palme.save='runs/vl/palme'"
    python benchmarks/bench_vision_language.py --sections blip2 --set "blip2.save='runs/vl/blip2'"
    python benchmarks/bench_vision_language.py --sections coca --set "coca.save='runs/vl/coca'"
    python benchmarks/vl_figure.py --palme runs/vl/palme --blip2 runs/vl/blip2 --coca runs/vl/coca \
        --out docs/img/vision_language.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from allformers import load  # noqa: E402
from allformers.data.synthetic_shapes import SyntheticShapes, canonical_of  # noqa: E402
from allformers.models.vqa import ask  # noqa: E402


def pick(data: SyntheticShapes, n: int) -> list:
    """n pictures and one question each, the question types taken in turn (colour, shape, count, relation)."""
    order = ("what colour", "which shape", "how many", "is the")
    out, want, i = [], 0, 0
    while len(out) < n and i < len(data):
        scene = data[i]
        qs = [qa for qa in scene.questions if qa[0].startswith(order[want % len(order)])]
        if qs:
            out.append((i, *qs[0]))
            want += 1
        i += 1
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--palme", help="a saved VisionLanguageLM folder")
    p.add_argument("--blip2", help="a saved BLIP-2 folder")
    p.add_argument("--coca", help="a saved CoCa folder (its greedy caption is shown too)")
    p.add_argument("--n", type=int, default=8, help="pictures (two rows)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/img/vision_language.png")
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = SyntheticShapes(200, "test", args.seed, 32)
    chosen = pick(data, args.n)
    images = [data.image(i) for i, _, _ in chosen]
    questions = [q for _, q, _ in chosen]
    answers = {}
    for name, folder in (("PaLM-E", args.palme), ("BLIP-2", args.blip2)):
        if folder:
            answers[name] = ask(load(folder), images, questions, folder=folder, max_new_tokens=2)
    captions = None
    if args.coca:
        from allformers.data.image_processing import ImageProcessor

        coca = load(args.coca)
        captions = coca.caption(coca.tokenizer, ImageProcessor.from_name("shapes")(images))
    cols = (len(chosen) + 1) // 2
    fig, axes = plt.subplots(2, cols, figsize=(3.0 * cols, 8.0))
    for ax, (i, q, truth), img, k in zip(axes.flat, chosen, images, range(len(chosen))):
        ax.imshow(img, interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(data[i].caption, fontsize=8, wrap=True)
        lines = [(q, "black"), (f"truth: {truth}", "black")]
        lines += [(f"{name}: {said[k] or '(nothing)'}", "green" if said[k] == truth else "red") for name, said in answers.items()]
        if captions:
            right = canonical_of(captions[k]) == canonical_of(data[i].caption)  # "B below A" is "A above B"
            lines.append((f"CoCa: {captions[k]}", "green" if right else "red"))
        for j, (text, colour) in enumerate(lines):
            ax.text(0.5, -0.08 - 0.12 * j, text, transform=ax.transAxes, ha="center", va="top", fontsize=7.5,
                    color=colour)
    for ax in list(axes.flat)[len(chosen):]:
        ax.axis("off")
    fig.subplots_adjust(left=0.02, right=0.98, top=0.95, bottom=0.2, wspace=0.25, hspace=0.8)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    said = list(answers) + (["CoCa captions"] if captions else [])
    print(f"{args.out}: {len(chosen)} test pictures, answers of {', '.join(said) or 'no model'}")


if __name__ == "__main__":
    main()
