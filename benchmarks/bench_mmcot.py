"""Multimodal-CoT on the synthetic science set: does reading the picture help, and does writing a
rationale first help?

Five rows, each trained on the same training problems and scored on the same test problems
(allformers/data/synthetic_science.py: magnets, thermometers, counting, lengths, colours and map
questions whose answer is in the picture, plus text-only temperature and verb-tense questions):

  two-stage + vision     T5 + ViT, gated fusion: QCM-LE rationale, then QCMG-A answer (Multimodal-CoT)
  two-stage text-only    the same T5 without the picture (its context has only a generic caption)
  one-stage + vision     T5 + ViT trained straight to the answer (QCM-A)
  one-stage text-only    T5, QCM-A
  decoder-only + vision  PaLM-E style: a LLaMA-layout decoder with the projected ViT tokens in its input
                         (one-stage QCM-A by default, half the steps; --decoder-mode two-stage)
  SmolLM2 + vision       PaLM-E with a pretrained LM: the real SmolLM2-135M-Instruct (frozen, LoRA on its
                         top blocks) reading projected tokens of a frozen pretrained ViT: the first row's
                         stage-1 ViT (PaLM-E's frozen ViT); one-stage QCM-A, trained on the same problems
                         for --smollm2-steps, scored on the first --smollm2-test test problems

Models are trained from scratch (2+2-layer T5 / 4-layer decoder, --d-model wide, ViT with a conv
stem, one BPE trained on the training texts) with the same optimizer settings; stage 1 and the
one-stage rows get the same number of updates; stage 2 starts from the weights stage 1 started
from (the reference's choice; --stage2-init stage1 to change it). Prints the paper-layout
table (accuracy % by NAT/SOC/LAN, TXT/IMG/NO context, grade, plus rationale ROUGE-L), accuracy per
kind of problem next to chance, the mean fusion gate on questions with and without a picture, and
times. The last line is one JSON object.

    python benchmarks/bench_mmcot.py            # the documented run (docs/multimodal_cot.md)
    python benchmarks/bench_mmcot.py --quick    # smoke run: 300 problems, a few steps"""
import argparse
import collections
import json
import os
import platform
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore")

ROWS = ("two-stage-vision", "two-stage-text", "one-stage-vision", "one-stage-text", "decoder-vision",
        "smollm2-vision")


def smollm2_row(args, data, train_q, test_q, vision, train, results):
    """PaLM-E with the real SmolLM2-135M-Instruct: its weights frozen, LoRA on the top 8 blocks, a trained
    projection from a frozen ViT's tokens into its input embeddings (inside the chat template, before the
    question). The ViT is the two-stage + vision row's stage-1 encoder (run that row first), as PaLM-E
    reuses a pretrained ViT; without it the ViT starts random and stays frozen."""
    from allformers.cli.common import load_any
    from allformers.recipes.mmcot import ModelFactory, ModelSpec, PipelineConfig, run_pipeline

    lm = load_any("smollm2")
    view = data.with_tokenizer(lm.tokenizer, chat=True)
    donor = results.get("two-stage-vision")
    state = donor.models["rationale"].vision.state_dict() if donor is not None else None
    if state is None:
        print("note: smollm2-vision runs without the two-stage-vision row's ViT: a frozen random ViT",
              file=sys.stderr)
    spec = ModelSpec(variant="decoder", base="smollm2", vision=vision, train_vision=False, seed=args.seed,
                     lora=dict(rank=8, alpha=16.0, top_layers=8))
    steps, lr = args.smollm2_steps, args.smollm2_lr
    cfg = PipelineConfig(two_stage=False, eval_batch_size=32,
                         answer_train=train.replace(batch_size=8, lr=lr, min_lr=lr / 10, weight_decay=0.0,
                                                    max_steps=steps, warmup_steps=max(1, steps // 20), log_interval=10))
    result = run_pipeline(ModelFactory(spec, view, lm=lm, vision_state=state), view, train_q,
                          test_q[:args.smollm2_test], cfg, progress=True)
    return result, cfg, view


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 300 training problems, 20 steps a stage")
    ap.add_argument("--n-train", type=int, default=20000, help="training problems (the acceptance needs >= 5,000)")
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--rationale-steps", type=int, default=3000, help="stage 1 (QCM-LE) optimizer steps")
    ap.add_argument("--answer-steps", type=int, default=800, help="stage 2 (QCMG-A) optimizer steps")
    ap.add_argument("--one-stage-steps", type=int, default=None,
                    help="one-stage (QCM-A) rows (default: --rationale-steps, the updates stage 1 gets)")
    ap.add_argument("--decoder-steps", type=int, default=None,
                    help="the decoder row, each stage (default: half of --one-stage-steps, to keep the run near 20 min)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--no-conv-stem", action="store_true", help="ViT with one strided convolution as patch embedding")
    ap.add_argument("--vision", default="vit", choices=("vit", "detr"))
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--stage2-init", default="base", choices=("base", "stage1"))
    ap.add_argument("--decoder-mode", default="one-stage", choices=("two-stage", "one-stage"),
                    help="the decoder row's pipeline (one-stage keeps the whole run near 20 minutes on one thread)")
    ap.add_argument("--smollm2-steps", type=int, default=150, help="the SmolLM2 row's optimizer steps (batch 8)")
    ap.add_argument("--smollm2-lr", type=float, default=1e-3)
    ap.add_argument("--smollm2-test", type=int, default=300,
                    help="the SmolLM2 row is scored on the first N test problems (135M parameters on a CPU)")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: tiny models on shared cores)")
    ap.add_argument("--out", help="save each row's pipeline (allformers mmcot ask --model OUT/ROW ...)")
    args = ap.parse_args(argv)
    if args.quick:
        args.n_train, args.n_test, args.rationale_steps, args.answer_steps = 300, 60, 20, 20
        args.smollm2_steps, args.smollm2_test = 4, 16
    args.one_stage_steps = args.one_stage_steps or args.rationale_steps
    args.decoder_steps = args.decoder_steps or max(1, args.one_stage_steps // 2)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    from allformers.data.scienceqa import COLUMNS, chance as guessing, format_table
    from allformers.data.synthetic_science import KINDS, WITH_IMAGE
    from allformers.recipes.mmcot import (DETR, VIT, MMCoTData, ModelFactory, ModelSpec, PipelineConfig,
                                           run_pipeline, save_pipeline, train_tokenizer)
    from allformers.training.trainer import TrainConfig

    rows = [r for r in args.rows.split(",") if r]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        ap.error(f"unknown rows {bad}; known: {list(ROWS)}")
    t0 = time.perf_counter()
    data = MMCoTData.synthetic(args.n_train, 0, args.n_test, seed=args.data_seed)
    train_q, test_q = data.splits["train"], data.splits["test"]
    data.tokenizer = train_tokenizer([s + " " + t for s, t in data.texts(train_q, "QCM-LE")], args.vocab_size)
    t_data = time.perf_counter() - t0
    d = args.d_model
    vision = dict(VIT if args.vision == "vit" else DETR)
    if args.vision == "vit" and args.no_conv_stem:
        vision["conv_stem"] = False
    train = TrainConfig(batch_size=args.batch_size, lr=args.lr, min_lr=args.lr / 10, weight_decay=0.01,
                        eval_interval=0, eval_at_start=False, log_interval=50, seed=args.seed, threads=args.threads)

    def pipeline(two_stage, decoder=False):
        rationale_steps = args.decoder_steps if decoder else args.rationale_steps
        answer_steps = args.answer_steps if two_stage else args.one_stage_steps
        answer_steps = args.decoder_steps if decoder else answer_steps
        return PipelineConfig(two_stage=two_stage, stage2_init=args.stage2_init,
                              rationale_train=train.replace(max_steps=rationale_steps,
                                                            warmup_steps=max(1, rationale_steps // 20)),
                              answer_train=train.replace(max_steps=answer_steps, warmup_steps=max(1, answer_steps // 20)))

    t5 = dict(n_embd=d, head_dim=d // 4, intermediate_size=4 * d)
    specs = {"two-stage-vision": (ModelSpec(vision=vision, size=t5, seed=args.seed), True),
             "two-stage-text": (ModelSpec(vision=None, size=t5, seed=args.seed), True),
             "one-stage-vision": (ModelSpec(vision=vision, size=t5, seed=args.seed), False),
             "one-stage-text": (ModelSpec(vision=None, size=t5, seed=args.seed), False),
             "decoder-vision": (ModelSpec(variant="decoder", vision=vision, seed=args.seed,
                                          size=dict(n_embd=d, n_layer=4, intermediate_size=4 * d)),
                                args.decoder_mode == "two-stage")}
    results = {}
    for name in rows:
        print(f"--- {name}", file=sys.stderr, flush=True)
        if name == "smollm2-vision":
            results[name], cfg, row_data = smollm2_row(args, data, train_q, test_q, vision, train, results)
        else:
            spec, two = specs[name]
            cfg, row_data = pipeline(two, decoder=name.startswith("decoder")), data
            results[name] = run_pipeline(ModelFactory(spec, data), data, train_q, test_q, cfg, progress=True)
        if args.out:
            save_pipeline(results[name], os.path.join(args.out, name), row_data, cfg)

    # ------------------------------------------------------------------ report
    label = {"two-stage-vision": "Two-stage + vision (T5)", "two-stage-text": "Two-stage text-only (T5)",
             "one-stage-vision": "One-stage QCM-A + vision", "one-stage-text": "One-stage QCM-A text-only",
             "decoder-vision": f"Decoder-only + vision ({args.decoder_mode})",
             "smollm2-vision": f"SmolLM2 + LoRA + frozen ViT ({args.smollm2_test} test)"}
    print(f"\nMultimodal-CoT on the synthetic science set: {len(train_q)} training / {len(test_q)} test problems, "
          f"{args.vision} vision, d_model {d}, steps: rationale {args.rationale_steps}, answer {args.answer_steps}, "
          f"one-stage {args.one_stage_steps}, decoder {args.decoder_steps} (batch {args.batch_size})\n")
    table = {label[n]: {**r.scores, "ROUGE-L": 100 * r.rouge_l if r.rouge_l is not None else None}
             for n, r in results.items()}
    print(format_table(table, extra=["ROUGE-L"]))
    print("accuracy %; ROUGE-L: generated rationale vs the gold 'Solution: <lecture> <solution>.' (F1 x 100)")

    # per kind, next to chance (1 / number of choices, averaged over the kind's test problems)
    kinds = list(KINDS)
    chance = {k: [] for k in kinds}
    for q in test_q:
        p = data.problems[q]
        chance[p["kind"]].append(1 / len(p["choices"]))
    print("\nper kind of problem (* = the answer is in the picture):")
    print(f"{'':<34}" + " ".join(f"{(k + ('*' if k in WITH_IMAGE else ''))[:12]:>12}" for k in kinds))
    print(f"{'chance':<34}" + " ".join(f"{100 * sum(chance[k]) / max(1, len(chance[k])):>12.1f}" for k in kinds))
    per_kind = {}
    for n, r in results.items():
        hits = collections.defaultdict(list)
        for q, pred in r.predictions.items():
            p = data.problems[q]
            hits[p["kind"]].append(pred == p["answer"])
        per_kind[n] = {k: 100 * sum(v) / len(v) for k, v in hits.items()}
        print(f"{label[n]:<34}" + " ".join(f"{per_kind[n].get(k, float('nan')):>12.1f}" for k in kinds))
    chance_img = guessing(data.problems, test_q)["IMG"] or 0.0  # the paper's random-chance row, IMG column
    print(f"chance on the picture questions (IMG): {chance_img:.1f}%")

    print("\nmean fusion gate over the text tokens (T5 + vision rows), questions with / without a picture:")
    for n, r in results.items():
        for stage, g in r.gate.items():
            print(f"  {label[n]:<34} {stage:<9} image {g['image']:.3f} (n={g['n_image']})   "
                  f"no image {g['no_image']:.3f} (n={g['n_no_image']})")
    print("\nseconds:", {n: {k: round(v) for k, v in r.seconds.items()} for n, r in results.items()})
    summary = {"rows": {n: {**{c: r.scores[c] for c in COLUMNS}, "unparseable": r.scores["unparseable"],
                            "rouge_l": r.rouge_l, "per_kind": per_kind[n]} for n, r in results.items()},
               "gate": {n: r.gate for n, r in results.items() if r.gate}, "chance_img": chance_img,
               "seconds": {n: r.seconds for n, r in results.items()}, "data_s": t_data,
               "total_s": time.perf_counter() - t0,
               "settings": {k: v for k, v in vars(args).items() if k != "out"},
               "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                           "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                           "torch": torch.__version__}}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
