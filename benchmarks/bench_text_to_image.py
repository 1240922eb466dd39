"""Text to image on the synthetic captioned shapes: DALL-E, GLIDE, latent diffusion and Imagen, each
trained here from scratch (allformers/recipes/text_to_image.py) and scored by a judge on captions
that none of them saw in training (the caption-disjoint test split: new combinations of colours,
shapes, relations and counts that were each seen in other captions).

    python benchmarks/bench_text_to_image.py                 # the measured run (34 min here, ablation included)
    python benchmarks/bench_text_to_image.py --quick         # a couple of minutes: everything runs
    python benchmarks/bench_text_to_image.py --sections glide,ldm

Reported (the last line is one JSON object):
  * per system: the judge's caption-match accuracy on held-out captions (a match is the judge reading the
    caption's canonical form exactly: kind, colours, shapes, relation, count), per kind, seconds per
    picture (sampling on this CPU), training time and sizes;
  * glide_guidance_gain: GLIDE's accuracy at guidance 3 minus at guidance 1;
  * reconstruction MSE of the VQ autoencoder (DALL-E's codes) and the KL autoencoder (latent diffusion's),
    held-out pictures in [-1, 1], and the judge's caption match on their reconstructions of the held-out
    captions' own drawings (about the most DALL-E or latent diffusion can score);
  * ldm_caption_encoder: latent diffusion with its caption encoder pretrained as a caption parser and
    frozen (the recipe's default), against the same U-Net with the encoder trained alongside it, which
    is GLIDE's way (the second run is skipped with --no-ablation);
  * imagen_comparison: from Imagen's small baseline (small T5, small U-Net), the gain of a larger frozen
    text encoder and the gain of a larger U-Net (Saharia et al.: the encoder helps more);
  * the judge's own accuracy on new pictures drawn at 32 and at 16 pixels.
It also writes a grid of generated pictures under their held-out captions (docs/img/text_to_image.png
by default), one row per system, and saves each model (runs/bench-t2i/NAME, `allformers imagine --model`)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

SECTIONS = ("dalle", "glide", "ldm", "imagen")
RECIPE = {"dalle": "dalle-shapes", "glide": "glide-shapes", "ldm": "ldm-shapes", "imagen": "imagen-shapes"}
GRID_COLUMNS = 8


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny settings: proves every part runs (a couple of minutes)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/bench-t2i", help="folder for the trained models and summary")
    ap.add_argument("--grid", default=None, help="picture grid path (default docs/img/text_to_image.png; "
                                                  "with --quick: OUT/text_to_image.png)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--no-ablation", action="store_true",
                    help="skip latent diffusion's second run with the other caption encoder (~8 min)")
    args = ap.parse_args()
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {unknown}; choose from {','.join(SECTIONS)}")
    torch.set_num_threads(args.threads)

    from allformers.recipes import get_recipe
    from allformers.recipes.text_to_image import (T2ISettings, Workbench, drawn, public_report, quick_settings, run_t2i,
                                                  save_grid, to_unit)

    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    log = lambda msg: print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", flush=True)  # noqa: E731
    settings = quick_settings() if args.quick else T2ISettings()
    bench = Workbench(settings, seed=args.seed, progress=not args.no_progress, log=log)
    out = Path(args.out)
    bench.judge  # noqa: B018  (trained first: its own accuracy is part of the report)
    result = {"judge": {k: v for k, v in bench.judge_report.items() if k.startswith("accuracy") or k in ("params", "n_test")}}
    reports, pictures = {}, {}
    for section in sections:
        s0 = time.perf_counter()
        r = run_t2i(get_recipe(RECIPE[section]), out=out / RECIPE[section], bench=bench, log=log)
        reports[section] = r["report"]
        pictures[section] = r["pictures"]
        held = r["report"]["heldout"]
        result[section] = {"heldout_accuracy": held["accuracy"],
                           **{k: v for k, v in held.items() if k.startswith("accuracy_")},
                           "seconds_per_sample": held["seconds_per_sample"], "n_captions": held["n"],
                           **({"seen_accuracy": held["seen"]["accuracy"],
                               "seen_accuracy_pair": held["seen"].get("accuracy_pair")} if "seen" in held else {}),
                           "params": r["report"]["params"], "train_s": r["report"]["train_s"],
                           "section_s": time.perf_counter() - s0}
        cfg = r["model"].config
        if hasattr(cfg, "scheduler"):  # a diffusion system: the choices it was trained with
            result[section].update(prediction_type=cfg.scheduler["prediction_type"],
                                   coordinate_channels=cfg.coordinate_channels)
        if "caption_encoder" in r["report"]:
            result[section]["caption_encoder"] = r["report"]["caption_encoder"]
        if "caption_parser" in r["report"]:
            result[section]["caption_parser"] = {k: r["report"]["caption_parser"][k]
                                                 for k in ("params", "train_s", "heldout_parse_accuracy")}
    if "ldm" in reports and not args.no_ablation:
        main_kind = reports["ldm"]["caption_encoder"]
        other = "joint" if main_kind == "parsed" else "parsed"
        s0 = time.perf_counter()
        log(f"latent diffusion again, with the {other} caption encoder (the ablation)")
        _, alt = bench.ldm(caption_encoder=other)
        fields = lambda h: {"heldout_accuracy": h["accuracy"], "accuracy_pair": h.get("accuracy_pair"),  # noqa: E731
                            "seen_accuracy_pair": h.get("seen", {}).get("accuracy_pair")}
        result["ldm_caption_encoder"] = {main_kind: fields(reports["ldm"]["heldout"]), other: fields(alt["heldout"]),
                                         "section_s": time.perf_counter() - s0}
    if "glide" in reports:
        g = reports["glide"]
        result["glide"]["accuracy_guidance_1"] = g["heldout_guidance_1"]["accuracy"]
        result["glide_guidance_gain"] = g["guidance_gain"]
    mse, ceiling = {}, {}
    for section, kind in (("dalle", "vq"), ("ldm", "kl")):
        if section in reports:
            mse[kind] = reports[section]["autoencoder"]["mse"]
            ceiling[kind] = reports[section]["autoencoder"]["caption_match_reconstructed"]
    if "dalle" in reports:
        result["dalle"]["codes_used"] = reports["dalle"]["autoencoder"].get("codes_used")
    if mse:
        result["reconstruction_mse"] = mse
        result["reconstruction_caption_match"] = ceiling  # the judge on reconstructed held-out drawings
    if "imagen" in reports:
        comp = reports["imagen"]["comparison"]
        result["imagen"]["base_accuracy_16px"] = reports["imagen"]["heldout_base"]["accuracy"]
        result["imagen_comparison"] = comp
        im = reports["imagen"]  # each frozen T5: its pretraining loss, and how alike it makes two captions
        result["imagen_text_encoders"] = {
            r["text_encoder"]["size"]: {"final_loss": r["text_encoder"]["final_loss"],
                                        "text_state_cosine": r["text_state_cosine"]}
            for r in (im, im["comparison_runs"]["small"])}
    systems = [s for s in SECTIONS if s in result]
    if systems:
        best = max(systems, key=lambda s: result[s]["heldout_accuracy"])
        result["best"] = {"system": best, "heldout_accuracy": result[best]["heldout_accuracy"]}
        result["targets"] = {"best_at_least_0.8": result[best]["heldout_accuracy"] >= 0.8}
        if "glide_guidance_gain" in result:
            result["targets"]["glide_gain_positive"] = result["glide_guidance_gain"] > 0
    if pictures:
        grid = Path(args.grid) if args.grid else (out / "text_to_image.png" if args.quick else Path("docs/img/text_to_image.png"))
        n = min(GRID_COLUMNS, len(bench.prompts))
        # the held-out captions of the first columns, as the generator draws them, then each system's picture
        real = to_unit(drawn(bench.prompts[:n]))
        rows = {"drawn": real, **{s: pictures[s][:n] for s in SECTIONS if s in pictures}}
        result["grid"] = str(save_grid(rows, [s.caption for s in bench.prompts[:n]], grid,
                                       title="held-out captions (top: the data's own drawing)"))
    result.update(times=bench.times, total_s=time.perf_counter() - t0, threads=args.threads, quick=args.quick,
                  seed=args.seed, load_average_start=load0, load_average_end=os.getloadavg()[0],
                  n_train=settings.n_train, n_eval=settings.n_eval, sample_steps=settings.sample_steps,
                  guidance=settings.guidance)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({"result": result, "reports": public_report(reports)}, indent=2,
                                                 default=str))
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
