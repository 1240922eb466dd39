"""`allformers mmcot train|eval|ask`: Multimodal-CoT (details in allformers/training/mmcot.py).

    allformers mmcot train --data synthetic --n-train 5000 --out runs/mmcot          # T5 + ViT, two stages
    allformers mmcot train --data ../shared/data/scienceqa_subset --eval-split val --out runs/sqa
    allformers mmcot train --data ../shared/data/scienceqa_subset --variant decoder --base smollm2 --lora-rank 8 ...
    allformers mmcot eval --model runs/mmcot --split test
    allformers mmcot ask --model runs/mmcot --image x.png --question "Will these magnets attract or repel each other?" \\
        --choices attract repel --context "In the picture, north poles are red and south poles are blue."
"""
import json
import sys

VISION = ("vit", "detr", "features", "none")


def register(sub):
    p = sub.add_parser("mmcot", help="Multimodal-CoT: train / evaluate / ask a vision-fused model (two stages)",
                       description="Multimodal chain-of-thought on ScienceQA-format data or the synthetic science set: "
                                   "stage 1 writes a rationale, stage 2 answers from it.")
    cmds = p.add_subparsers(dest="mmcot_command", required=True, metavar="{train,eval,ask}")

    t = cmds.add_parser("train", help="train both stages (or a one-stage baseline), evaluate, save")
    _data_args(t)
    t.add_argument("--out", required=True, help="folder for the rationale and answer models and mmcot.json")
    m = t.add_argument_group("model")
    m.add_argument("--variant", default="t5", choices=("t5", "decoder"),
                   help="t5: T5 with gated fusion after the encoder; decoder: PaLM-E style (image tokens in the input)")
    m.add_argument("--vision", default="vit", choices=VISION, help="image encoder (none: text only; features: "
                   "precomputed --features)")
    m.add_argument("--base", help="decoder variant: a pretrained LM to start from (e.g. smollm2); default: from scratch")
    m.add_argument("--lora-rank", type=int, default=8, help="with --base: LoRA rank (0: train only the image projection)")
    m.add_argument("--lora-layers", type=int, default=None, help="with --base: adapt only the top N blocks")
    m.add_argument("--d-model", type=int, help="from-scratch width (default 64)")
    m.add_argument("--layers", type=int, help="from-scratch layers (T5: per stack)")
    m.add_argument("--vocab-size", type=int, default=2048, help="BPE size for from-scratch models")
    m.add_argument("--dropout", type=float, default=0.0)
    s = t.add_argument_group("pipeline and training")
    s.add_argument("--one-stage", action="store_true", help="a one-stage baseline instead of the two-stage pipeline")
    s.add_argument("--format", default="QCM-A", choices=("QCM-A", "QCM-ALE"), help="the one-stage format")
    s.add_argument("--stage2-init", default="base", choices=("base", "stage1"),
                   help="base: stage 2 starts from the weights stage 1 started from (the reference); stage1: from the "
                        "trained stage-1 model")
    s.add_argument("--rationale-steps", type=int, default=3000, help="stage 1 steps")
    s.add_argument("--answer-steps", type=int, default=800, help="stage 2 (or one-stage) steps")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--lr", type=float, default=None, help="peak learning rate (default 3e-3 from scratch, 2e-4 with --base)")
    s.add_argument("--train-split", default="train")
    s.add_argument("--max-source", type=int, default=320, help="source tokens (longer sources are cut at the end)")
    s.add_argument("--max-target", type=int, default=160, help="target tokens in training (rationales are cut)")
    s.add_argument("--max-rationale-tokens", type=int, default=96, help="tokens stage 1 may generate")
    s.add_argument("--max-train", type=int, help="use only the first N training questions")
    t.set_defaults(handler=run_train)

    e = cmds.add_parser("eval", help="evaluate a trained pipeline and print the paper's table")
    e.add_argument("--model", required=True, help="folder written by `mmcot train`")
    _data_args(e, default=None)
    e.set_defaults(handler=run_eval)

    a = cmds.add_parser("ask", help="one question (and picture): print the rationale and the answer")
    a.add_argument("--model", required=True, help="folder written by `mmcot train`")
    a.add_argument("--image", help="picture file (png, jpg, ...)")
    a.add_argument("--question", required=True)
    a.add_argument("--choices", nargs="+", required=True)
    a.add_argument("--context", default="", help="text context (ScienceQA's hint)")
    a.add_argument("--threads", type=int, default=1)
    a.add_argument("--json", action="store_true")
    a.set_defaults(handler=run_ask)


def _data_args(p, default="synthetic"):
    d = p.add_argument_group("data")
    d.add_argument("--data", default=default, help="'synthetic' (generated) or a ScienceQA-format folder "
                   "(problems.json, captions.json, pid_splits.json, optional images/<qid>/image.png)"
                   + ("" if default else "; default: what the model was trained on"))
    d.add_argument("--n-train", type=int, default=5000, help="synthetic: training problems")
    d.add_argument("--n-val", type=int, default=500)
    d.add_argument("--n-test", type=int, default=500)
    d.add_argument("--data-seed", type=int, default=0, help="synthetic: generator seed")
    d.add_argument("--image-size", type=int, default=32, help="pictures are resized to this (0: do not read images/)")
    d.add_argument("--no-caption", action="store_true", help="do not add captions.json to the context")
    d.add_argument("--features", help="precomputed image features (.npy, (images, patches, dim))")
    d.add_argument("--name-map", help="question id -> feature row (JSON); default name_map.json beside --features")
    d.add_argument("--feature-kind", choices=("detr", "vit", "clip"), help="check the features' shape against this kind")
    d.add_argument("--eval-split", "--split", dest="eval_split", default="test" if default else None,
                   help="split to evaluate (ScienceQA subset: val)")
    d.add_argument("--max-eval", type=int, help="evaluate only the first N questions")
    d.add_argument("--eval-batch-size", type=int, default=64)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 suits tiny models on shared cores)")
    d.add_argument("--no-progress", action="store_true")
    d.add_argument("--json", action="store_true", help="print the scores as JSON")


def _load_data(args, tokenizer=None, chat=False, data_source=None):
    from ..blocks.vision import load_image_features
    from ..training.mmcot import MMCoTData

    source = data_source or {}
    which = args.data or ("synthetic" if source.get("kind") == "synthetic" else source.get("root"))
    if which is None:
        from ..training.mmcot import MMCoTError

        raise MMCoTError("say which data to evaluate on: --data synthetic or --data FOLDER")
    features = None
    if args.features:
        features = load_image_features(args.features, name_map=args.name_map, kind=args.feature_kind)
    kw = dict(use_caption=not args.no_caption, chat=chat)
    if which == "synthetic":
        if args.data is None and source:  # eval: regenerate exactly what the model was trained on
            n = (source["n_train"], source["n_val"], source["n_test"], source["seed"], source["image_size"])
        else:
            n = (args.n_train, args.n_val, args.n_test, args.data_seed, args.image_size or 32)
        data = MMCoTData.synthetic(*n[:3], seed=n[3], image_size=n[4], **kw)
        data.features = features
    else:
        data = MMCoTData.scienceqa(which, image_size=args.image_size or None, features=features, **kw)
    data.tokenizer = tokenizer
    return data


def _split(data, name, limit):
    from ..training.mmcot import MMCoTError

    if name not in data.splits:
        raise MMCoTError(f"split {name!r} is not in the data (splits: {sorted(data.splits)})")
    qids = data.splits[name]
    return qids[:limit] if limit else qids


def _report(result, args, title, paper: bool, data=None, qids=None):
    from ..data.scienceqa import PAPER, chance, format_table

    if args.json:
        print(json.dumps({"scores": result.scores, "rouge_l": result.rouge_l, "gate": result.gate,
                          "seconds": result.seconds}, indent=2))
        return
    rows = {title: {**result.scores, "ROUGE-L": 100 * result.rouge_l if result.rouge_l is not None else None},
            "Random chance (these questions)": chance(data.problems, qids)}
    print(format_table({**rows, **(PAPER if paper else {})}, extra=["ROUGE-L"]))
    s = result.scores
    print(f"{s['total']} questions, {s['unparseable']} unparseable answers (counted wrong); columns are accuracy %; "
          f"ROUGE-L is the rationale's F1 x 100" + ("; the paper's rows are its ScienceQA test results (4,241 "
                                                    "questions, with images)" if paper else ""))
    show = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for stage, g in result.gate.items():
        print(f"gate ({stage} model): mean {show(g['image'])} on {g['n_image']} questions with a picture, "
              f"{show(g['no_image'])} on {g['n_no_image']} without")


def run_train(args):
    import torch

    from ..training.mmcot import (DETR, VIT, ModelFactory, ModelSpec, PipelineConfig, run_pipeline, save_pipeline,
                                  train_tokenizer)
    from ..training.trainer import TrainConfig

    torch.set_num_threads(args.threads)
    lm = None
    if args.base:
        from .common import load_any

        lm = load_any(args.base)
    data = _load_data(args, chat=lm is not None)
    data.max_source, data.max_target = args.max_source, args.max_target
    train_qids = _split(data, args.train_split, args.max_train)
    eval_qids = _split(data, args.eval_split, args.max_eval)
    if lm is not None:
        data.tokenizer = lm.tokenizer
    else:
        texts = [s + " " + t for s, t in data.texts(train_qids, "QCM-LE")]
        data.tokenizer = train_tokenizer(texts, args.vocab_size)
    vision = {"vit": VIT, "detr": DETR, "features": {"kind": "features"}, "none": None}[args.vision]
    if vision is not None and vision.get("kind") in ("vit", "detr"):
        vision = {**vision, "image_size": args.image_size} if vision["kind"] == "vit" and args.image_size else dict(vision)
        if not data.has_pictures:
            print("note: the data has no pictures (ScienceQA's images are not here); every question is text-only "
                  "for the vision model — pass --features for precomputed features", file=sys.stderr)
    size = {}
    if args.d_model:
        size.update(n_embd=args.d_model, head_dim=args.d_model // 4, intermediate_size=4 * args.d_model)
    if args.layers:
        size.update(n_layer=args.layers, **({"n_decoder_layer": args.layers} if args.variant == "t5" else {}))
    lora = None
    if args.base and args.lora_rank:
        lora = {"rank": args.lora_rank, "alpha": 2.0 * args.lora_rank}
        if args.lora_layers:
            lora["top_layers"] = args.lora_layers
    spec = ModelSpec(variant=args.variant, vision=vision, size=size, base=args.base, lora=lora, dropout=args.dropout,
                     seed=args.seed)
    lr = args.lr or (2e-4 if args.base else 3e-3)
    train = TrainConfig(batch_size=args.batch_size, lr=lr, min_lr=lr / 10, weight_decay=0.01, eval_interval=0,
                        eval_at_start=False, log_interval=10, seed=args.seed, num_threads=args.threads)
    cfg = PipelineConfig(two_stage=not args.one_stage, one_stage_format=args.format, stage2_init=args.stage2_init,
                         rationale_train=train.replace(max_iters=args.rationale_steps,
                                                       warmup_iters=max(1, args.rationale_steps // 20)),
                         answer_train=train.replace(max_iters=args.answer_steps, warmup_iters=max(1, args.answer_steps // 20)),
                         max_rationale_tokens=args.max_rationale_tokens, eval_batch_size=args.eval_batch_size)
    result = run_pipeline(ModelFactory(spec, data, lm=lm), data, train_qids, eval_qids, cfg,
                          progress=not args.no_progress)
    save_pipeline(result, args.out, data, cfg, extra={"model": {"variant": args.variant, "vision": args.vision,
                                                                  "base": args.base, "lora": lora},
                                                        "train_questions": len(train_qids), "eval_split": args.eval_split})
    title = f"{'two-stage' if cfg.two_stage else args.format} {args.variant}{'' if vision else ' text-only'}"
    _report(result, args, title, paper=data.source["kind"] != "synthetic", data=data, qids=eval_qids)
    print(f"saved to {args.out} (allformers mmcot ask --model {args.out} ...); "
          f"{result.seconds['total']:.0f} s", file=sys.stderr)
    return 0


def run_eval(args):
    import torch

    from ..training.mmcot import evaluate_pipeline, load_pipeline, pipeline_config

    torch.set_num_threads(args.threads)
    rationale, answer, meta = load_pipeline(args.model)
    data = _load_data(args, tokenizer=answer.tokenizer, chat=meta.get("chat", False), data_source=meta.get("data"))
    data.max_source, data.max_target = meta["max_source"], meta["max_target"]
    split = args.eval_split or meta.get("eval_split") or "test"
    qids = _split(data, split, args.max_eval)
    cfg = pipeline_config(meta, eval_batch_size=args.eval_batch_size)
    result = evaluate_pipeline(rationale, answer, data, qids, cfg, progress=not args.no_progress)
    _report(result, args, f"{args.model} ({split})", paper=data.source["kind"] != "synthetic", data=data, qids=qids)
    return 0


def run_ask(args):
    import torch

    from ..training.mmcot import ask, load_pipeline

    torch.set_num_threads(args.threads)
    rationale, answer, meta = load_pipeline(args.model)
    out = ask(rationale, answer, meta, args.question, args.choices, image=args.image, context=args.context)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    if out["rationale"] is not None:
        print(f"Rationale: {out['rationale']}")
    print(f"Answer: {out['answer']}")
    print(f"Choice: {out['choice_text']}" if out["choice"] is not None else "Choice: (the answer did not parse)")
    return 0
